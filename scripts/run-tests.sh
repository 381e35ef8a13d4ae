#!/usr/bin/env bash
# Run the whole suite (or the named trial targets) with trial, then print one
# plain summary line ("trial: N passed, N failed, N skipped") that CI can read.
set -uo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(tests)
log=$(mktemp)
python3 -m twisted.trial --temp-directory=_trial_temp "${targets[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
python3 scripts/trial_summary.py "$log"
rm -f "$log"
exit "$rc"
