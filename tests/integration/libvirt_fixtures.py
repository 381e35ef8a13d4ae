"""
Node files for libvirt's test driver (C{test:///ABS/PATH/node.xml}), for
integration tests that need real libvirt connections without a daemon.

Each connection to a node file gets its own copy of the state, so tests
may change domains freely.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence
from xml.sax.saxutils import quoteattr

#: The test driver's XML namespace (for C{<test:runstate>}).
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"

#: virDomainState values usable in C{<test:runstate>}.
RUNNING = 1
SHUTOFF = 5


def graphics_xml(
    kind: str,
    port: Optional[int] = None,
    *,
    listen: Optional[str] = "127.0.0.1",
    passwd: Optional[str] = None,
    tls_port: Optional[int] = None,
    autoport: bool = False,
) -> str:
    """
    One C{<graphics>} element.  With C{autoport} and no port the test
    driver reports C{port='-1'}.
    """
    attrs = [f"type={quoteattr(kind)}"]
    if port is not None:
        attrs.append(f"port='{int(port)}'")
    if tls_port is not None:
        attrs.append(f"tlsPort='{int(tls_port)}'")
    attrs.append("autoport='yes'" if autoport else "autoport='no'")
    if listen is not None:
        attrs.append(f"listen={quoteattr(listen)}")
    if passwd is not None:
        attrs.append(f"passwd={quoteattr(passwd)}")
    return f"<graphics {' '.join(attrs)}/>"


def domain_xml(name: str, uuid: str, graphics: Sequence[str] = (), running: bool = True) -> str:
    """
    A minimal test-driver domain with the given graphics elements.
    """
    state = RUNNING if running else SHUTOFF
    return f"""  <domain type='test' xmlns:test='{TEST_NS}'>
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <memory>65536</memory>
    <vcpu>1</vcpu>
    <os><type>hvm</type></os>
    <devices>
      {''.join(graphics)}
    </devices>
    <test:runstate>{state}</test:runstate>
  </domain>
"""


def write_node_file(directory: str, domains: Sequence[str], filename: str = "node.xml") -> str:
    """
    Write a node file holding C{domains} into C{directory}; answer its
    absolute path.
    """
    path = os.path.abspath(os.path.join(directory, filename))
    with open(path, "w", encoding="utf-8") as f:
        f.write("<node>\n" + "".join(domains) + "</node>\n")
    return path


def node_uri(path: str) -> str:
    """
    The libvirt test-driver URI of a node file: C{test:///ABS/PATH}.
    """
    return "test://" + os.path.abspath(path)
