"""
Which TLS settings a VM's SPICE console is dialled with: the hypervisor's
C{spice_tls}, loaded once (L{spice_tls_by_uri}).  The dialling itself is
the relay's (L{vaporproxy.relay.dial}).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

from vaporproxy.config import HypervisorConfig
from vaporproxy.tls import tls_by_uri


def spice_tls_by_uri(hypervisors: Iterable[HypervisorConfig]) -> Dict[str, Any]:
    """
    The loaded C{spice_tls} settings of every hypervisor that has them, by
    URI (L{vaporproxy.tls.tls_by_uri}).

    @raise ConfigError: naming the key of the first unusable file.
    """
    return tls_by_uri(hypervisors, "spice_tls")
