"""
The demo VM: its domain XML, starting it on a L{SessionLibvirtd}, and
reading its console ports back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid as uuidlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from vaporproxy.demo.boot import SerialLog, make_serial_file
from vaporproxy.demo.common import QEMU_BINARY
from vaporproxy.demo.guest import GuestImage
from vaporproxy.demo.libvirtd import SessionLibvirtd


#: The demo domain; C{{boot}}, C{{vnc_pw}}, C{{spice_pw}} and C{{serial}} are
#: filled in by L{domain_xml}.
DOMAIN_TEMPLATE = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    {boot}
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'{vnc_pw}>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type='spice' autoport='yes'{spice_pw}>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video>
      <model type='qxl'/>
    </video>
    <memballoon model='none'/>{serial}
  </devices>
</domain>
"""

SERIAL_TEMPLATE = """
    <serial type='file'>
      <source path={path}/>
      <target port='0'/>
    </serial>"""


def domain_xml(
    name: str,
    uuid: str,
    vnc_password: Optional[str],
    spice_password: Optional[str],
    memory_mib: int = 128,
    emulator: str = QEMU_BINARY,
    guest: Optional[GuestImage] = None,
    serial_path: Optional[str] = None,
) -> str:
    """
    A diskless TCG domain with qxl video, a VNC and a SPICE console, both
    listening on 127.0.0.1 with automatically assigned ports.  Without
    C{guest} it boots SeaBIOS to "No bootable device", which shows "Machine
    UUID <uuid>"; with it, that kernel and initramfs, its serial port going
    to the file C{serial_path}.
    """
    if guest is None:
        boot = "<boot dev='hd'/>"
    else:
        boot = (
            f"<kernel>{escape(guest.kernel)}</kernel>\n"
            f"    <initrd>{escape(guest.initrd)}</initrd>\n"
            f"    <cmdline>{escape(guest.cmdline)}</cmdline>"
        )
    return DOMAIN_TEMPLATE.format(
        name=name,
        uuid=uuid,
        memory_mib=memory_mib,
        boot=boot,
        emulator=emulator,
        vnc_pw=f" passwd={quoteattr(vnc_password)}" if vnc_password else "",
        spice_pw=f" passwd={quoteattr(spice_password)}" if spice_password else "",
        serial="" if serial_path is None else SERIAL_TEMPLATE.format(path=quoteattr(serial_path)),
    )


def live_graphics_ports(xml: bytes) -> Dict[str, int]:
    """
    C{{"vnc": port, "spice": port}} from a running domain's live XML.
    """
    root = etree.fromstring(xml, parser=etree.XMLParser(resolve_entities=False, no_network=True))
    ports: Dict[str, int] = {}
    for g in root.iterfind("devices/graphics"):
        port = g.get("port")
        if port is not None and int(port) > 0:
            ports.setdefault(g.get("type"), int(port))
    return ports


@dataclass
class DemoVM:
    """
    A running VM defined on a L{SessionLibvirtd}.

    @ivar serial: the guest's serial port file, when it boots a
        L{GuestImage}; C{None} for the SeaBIOS VM.
    """

    name: str
    uuid: str
    vnc_password: str
    spice_password: str
    ports: Dict[str, int]
    serial: Optional[SerialLog] = None

    @classmethod
    def create(
        cls,
        daemon: SessionLibvirtd,
        name: str = "vapor-demo",
        vnc_password: Optional[str] = None,
        spice_password: Optional[str] = None,
        guest: Optional[GuestImage] = None,
    ) -> "DemoVM":
        """
        Define and start the VM (booting C{guest} with 256 MiB if given);
        wait until both console ports are known, not until the guest is up.
        """
        import libvirt

        vnc_password = vnc_password or secrets.token_hex(4)  # VNC: 8 chars max
        spice_password = spice_password or secrets.token_hex(8)
        vm_uuid = str(uuidlib.uuid4())
        serial: Optional[SerialLog] = None
        memory = 128
        if guest is not None:
            guest, serial = stage_guest(daemon, name, guest)
            memory = 256
        xml = domain_xml(
            name, vm_uuid, vnc_password, spice_password, memory, guest=guest,
            serial_path=serial.path if serial else None,
        )
        conn = daemon.connect()
        try:
            dom = conn.defineXML(xml)
            dom.create()
            ports = live_graphics_ports(dom.XMLDesc(0).encode())
            if set(ports) != {"vnc", "spice"}:
                raise RuntimeError(f"console ports not assigned: {ports}")
        except libvirt.libvirtError as e:
            raise RuntimeError(f"could not start the demo VM: {e}; see {daemon.log_path}") from e
        finally:
            conn.close()
        return cls(name, vm_uuid, vnc_password, spice_password, ports, serial)


def stage_guest(daemon: SessionLibvirtd, name: str, guest: GuestImage) -> Tuple[GuestImage, SerialLog]:
    """
    Copy C{guest}'s files where the daemon's user can read them (the cache
    is usually under root's home) and create the serial file it may write.
    """
    import pwd

    pw = pwd.getpwnam(daemon.user)
    directory = os.path.join(daemon.base, "guests", name)
    os.makedirs(directory, exist_ok=True)
    for path in (os.path.dirname(directory), directory):
        os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(path, 0o755)
    staged = []
    for path in (guest.kernel, guest.initrd):
        target = os.path.join(directory, os.path.basename(path))
        shutil.copyfile(path, target)
        os.chmod(target, 0o644)
        staged.append(target)
    serial = make_serial_file(os.path.join(directory, "serial.log"), pw.pw_uid, pw.pw_gid)
    return GuestImage(staged[0], staged[1], guest.cmdline), serial
