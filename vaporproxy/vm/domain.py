"""
Domain XML to graphics devices: pure, no libvirt.

L{graphics_from_domain_xml} turns domain XML (bytes, as
C{virDomainGetXMLDesc} gives it) into L{Graphics} values with a hardened
lxml parser: no DTD, no entities, no network, bounded size.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from lxml import etree
from twisted.logger import Logger

from vaporproxy.errors import ConsoleError, ErrorCode
from vaporproxy.interfaces import CONSOLE_TYPES, Graphics

log = Logger(namespace="vaporproxy.consoles")

#: Domain XML larger than this is refused (real domains are a few KB).
MAX_DOMAIN_XML = 4 * 1024 * 1024

#: The client-safe message for domain XML that cannot be used.
_BAD_XML_MESSAGE = "The virtual machine's console configuration could not be read"

# ---------------------------------------------------------------------------
# Domain XML
# ---------------------------------------------------------------------------


def _parser() -> etree.XMLParser:
    """
    A hardened parser: no DTD loading, no entity expansion, no network, no
    huge trees.
    """
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        collect_ids=False,
    )


class DomainXMLError(Exception):
    """
    Domain XML that cannot be used; C{detail} is for the log only.
    """

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def console_error(error: DomainXMLError, **context: Any) -> ConsoleError:
    """
    Log C{error}'s detail and answer the client-safe INTERNAL_ERROR.
    """
    log.error("unusable domain XML: {detail}", detail=error.detail, **context)
    return ConsoleError(ErrorCode.INTERNAL_ERROR, _BAD_XML_MESSAGE)


def parse_domain(xml: bytes) -> Any:
    """
    Parse domain XML into its root element, refusing anything that is not a
    plain C{<domain>} document.

    @raise DomainXMLError: with a log-only detail.
    """
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    if not isinstance(xml, (bytes, bytearray)):
        raise DomainXMLError(f"expected bytes, got {type(xml).__name__}")
    if len(xml) > MAX_DOMAIN_XML:
        raise DomainXMLError(f"{len(xml)} bytes is more than {MAX_DOMAIN_XML}")
    # Refuse DTDs outright: a domain document never has one, and a DTD is
    # the vehicle of entity expansion and external entity attacks.
    if b"<!DOCTYPE" in xml or b"<!ENTITY" in xml:
        raise DomainXMLError("document type declarations are not accepted")
    try:
        root = etree.fromstring(bytes(xml), _parser())
    except (etree.LxmlError, ValueError) as e:
        raise DomainXMLError(f"malformed: {e}")
    if root is None:
        raise DomainXMLError("empty document")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise DomainXMLError("document type declarations are not accepted")
    if root.tag != "domain":
        raise DomainXMLError(f"root element is {str(root.tag)[:40]!r}, not 'domain'")
    return root


def _port(value: Optional[str]) -> Optional[int]:
    """
    A TCP port attribute: C{None} when missing, C{-1} (autoport not yet
    assigned), out of range or not a number.
    """
    if value is None:
        return None
    try:
        port = int(value.strip())
    except ValueError:
        return None
    if 0 < port < 65536:
        return port
    return None


#: The SPICE channel modes libvirt writes (C{defaultMode}, C{<channel mode>}).
SPICE_MODES = ("any", "secure", "insecure")


def _listen(element: Any) -> Tuple[str, Optional[str], Optional[str]]:
    """
    Where a graphics device listens.

    @return: C{(listen_type, address, socket)}: C{listen_type} is
        C{"address"} (TCP, C{address} the listen address or C{None}; the
        C{<listen>} child wins over the C{listen} attribute), C{"socket"}
        (C{socket} the path, C{None} until libvirt has chosen it) or
        C{"none"}.  Only the first C{<listen>} child counts, as in QEMU.
    """
    if element.get("socket"):
        # The old spelling: <graphics type='vnc' socket='/path'/>.
        return "socket", None, element.get("socket")
    address = element.get("listen") or None
    child = element.find("listen")
    if child is not None:
        kind = child.get("type", "address")
        if kind == "socket":
            return "socket", None, child.get("socket") or None
        if kind == "none":
            return "none", None, None
        if kind in ("address", "network") and child.get("address"):
            address = child.get("address")
    return "address", address, None


def _mode(value: Optional[str]) -> str:
    """A SPICE channel mode; anything libvirt would not write is C{any}."""
    return value if value in SPICE_MODES else "any"


def _channel_modes(element: Any) -> Tuple[Tuple[str, str], ...]:
    """The SPICE C{<channel name=… mode=…/>} children, in order."""
    modes = []
    for channel in element.iterfind("channel"):
        name = channel.get("name")
        if name:
            modes.append((name, _mode(channel.get("mode"))))
    return tuple(modes)


def valid_to(value: Optional[str]) -> Optional[float]:
    """
    C{passwdValidTo} (UTC, C{YYYY-MM-DDTHH:MM:SS}, as libvirt writes it) as
    POSIX time; a value that cannot be read counts as long expired, so the
    console is refused rather than offered with a password QEMU may refuse.
    """
    if value is None:
        return None
    text = value.strip()
    for form in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f"):
        try:
            when = datetime.strptime(text, form)
        except ValueError:
            continue
        return when.replace(tzinfo=timezone.utc).timestamp()
    return 0.0


def graphics_from_domain_xml(xml: bytes) -> Tuple[Graphics, ...]:
    """
    The VNC and SPICE graphics devices of a domain, in document order.

    Other graphics types (sdl, rdp, egl-headless, dbus, ...) are ignored.
    C{index} counts devices of the same type.  A device that listens on a
    UNIX socket (or nowhere) has no ports.

    @param xml: domain XML as given by C{virDomainGetXMLDesc}.
    @raise ConsoleError: INTERNAL_ERROR (client-safe message; the detail is
        logged) when the XML is malformed or carries a DTD.
    """
    try:
        return graphics_of(parse_domain(xml))
    except DomainXMLError as e:
        raise console_error(e) from None


def graphics_of(root: Any) -> Tuple[Graphics, ...]:
    """The VNC and SPICE devices under an already parsed C{<domain>}."""
    counts: Dict[str, int] = {}
    found: List[Graphics] = []
    for device, element in enumerate(root.iterfind("devices/graphics")):
        kind = element.get("type")
        if kind not in CONSOLE_TYPES:
            continue
        index = counts.get(kind, 0)
        counts[kind] = index + 1
        found.append(_one(element, kind, index, device))
    return tuple(found)


def _one(element: Any, kind: str, index: int, device: int) -> Graphics:
    """One C{<graphics>} element of type C{kind}."""
    listen_type, address, socket = _listen(element)
    tcp = listen_type == "address"
    spice = kind == "spice"
    return Graphics(
        type=kind,
        index=index,
        port=_port(element.get("port")) if tcp else None,
        tls_port=_port(element.get("tlsPort")) if tcp and spice else None,
        listen=address,
        password=element.get("passwd"),
        autoport=element.get("autoport") == "yes",
        listen_type=listen_type,
        socket=socket,
        default_mode=_mode(element.get("defaultMode")) if spice else "any",
        channel_modes=_channel_modes(element) if spice else (),
        password_valid_to=valid_to(element.get("passwdValidTo")),
        device=device,
    )


def domain_identity(xml: bytes) -> Tuple[Optional[str], Optional[str]]:
    """
    The C{(uuid, name)} of a domain from its XML (lower-case UUID), each
    C{None} when absent.

    @raise ConsoleError: INTERNAL_ERROR as L{graphics_from_domain_xml}.
    """
    try:
        return identity_of(parse_domain(xml))
    except DomainXMLError as e:
        raise console_error(e) from None


def identity_of(root: Any) -> Tuple[Optional[str], Optional[str]]:
    uuid = root.findtext("uuid")
    name = root.findtext("name")
    return (
        uuid.strip().lower() if uuid else None,
        name.strip() if name else None,
    )

