"""
Instructions per console-info request, counted in memory (issue 8).

bench/setupcost.py counts a whole console set-up over TCP, within a few
per cent run to run; this script counts the console-info request alone,
deterministically (about 0.1 k): a real service tree (the bench's config,
the libvirt test driver) is fed keep-alive requests on one in-memory
connection, under callgrind, 1,000 and then 2,000 of them, and the slope is
what one more request costs.  The VM lookup cache is made to last and the
token store emptied every 250 requests, so neither adds noise.

    python3 bench/infocost.py            # slope over 1,000 vs 2,000 requests
    python3 bench/infocost.py --n 500

Not a test.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEY = "bench-key-0123456789"
NODE = """<node>
  <domain type='test'>
    <name>bench-vm</name><uuid>6f1c2a4e-3b5d-4c8e-9a7f-0123456789ab</uuid>
    <memory>131072</memory><vcpu>1</vcpu><os><type>hvm</type></os>
    <devices><graphics type='vnc' port='5999' listen='127.0.0.1'/></devices>
  </domain>
</node>
"""
REQUEST = (b"GET /api/v1/virtualization/virtualmachines/bench-vm/console HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n")  # fmt: skip


def config(work: str) -> str:
    """The bench's config (bench/run.py), for the test driver's one VM."""
    node = os.path.join(work, "node.xml")
    with open(node, "w") as f:
        f.write(NODE)
    path = os.path.join(work, "vapor.conf")
    with open(path, "w") as f:
        f.write(f"""server:
  listen: ["tcp:0:interface=127.0.0.1"]
auth:
  api_keys:
    - {{user: bench, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", vms: ["*"]}}
    - {{user: bench-admin, sha256: "{hashlib.sha256(b'admin').hexdigest()}", admin: true}}
  mint_rate: 0
  max_outstanding_tokens: 0
hypervisors:
  - uri: "test://{node}"
console:
  max_connections_per_vm: 100000
  max_total_connections: 100000
""")
    return path


def serve(n: int) -> None:
    """Run the service tree and answer C{n} requests (after a warm-up), then exit."""
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogBeginner

    path = config(tempfile.mkdtemp())
    sys.stdout = open(os.devnull, "w")  # the log (twistd -n writes it to stdout)
    from vaporproxy.tap import Options, makeService

    options = Options()
    options.parseOptions(["--config", path])
    root = makeService(options, reactor)
    globalLogBeginner.beginLoggingTo([root.log_setup.observer], redirectStandardIO=False, discardBuffer=True)
    root.log_setup.install()

    def run() -> None:
        addr = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = root.pieces["guard"].buildProtocol(addr)
        transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        protocol.makeConnection(transport)

        def ask() -> bytes:
            transport.clear()
            protocol.dataReceived(REQUEST)
            while not transport.value().endswith(b"}"):
                reactor.iterate(0.001)  # (the first lookup goes to libvirt's thread)
            return transport.value()

        answer = ask()
        if b" 200 " not in answer.split(b"\r\n", 1)[0]:
            raise SystemExit(f"console info failed: {answer!r}")
        root.pieces["locator"]._cache.ttl = 1e9
        store = root.pieces["token_store"].wrapped
        for _ in range(300):
            ask()
        gc.collect()
        gc.freeze()
        for i in range(n):
            if i % 250 == 0:
                store._entries.clear(), store._unused.clear(), store._by_key.clear()
            ask()
        os._exit(0)

    root.startService()
    reactor.callWhenRunning(lambda: reactor.callLater(0.2, run))
    reactor.run()


def counted(n: int) -> int:
    """Instructions of a run answering C{n} requests, under callgrind."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          os.path.abspath(__file__), "--serve", str(n)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))  # fmt: skip
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise SystemExit(f"no count: {out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="requests of the short run (the long one: twice)")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    short, long_ = counted(args.n), counted(2 * args.n)
    print(f"{(long_ - short) / args.n:,.0f} instructions per console-info request ({short:,} / {long_:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
