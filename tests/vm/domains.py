"""
Domain XML and VM values shared by the tests of L{vaporproxy.vm}.
"""

from __future__ import annotations

from typing import Optional

from vaporproxy.interfaces import Graphics, VMConsoles

UUID1 = "6c3f0d0e-3a4b-4f0e-9a43-0b1d2c3e4f51"
UUID2 = "0a9b8c7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d"


def domain(devices: str, name: str = "web1", uuid: str = UUID1, running: bool = True) -> bytes:
    """
    A domain XML shaped like what libvirt's live XMLDesc gives.
    """
    domid = " id='3'" if running else ""
    return f"""<domain type='kvm'{domid}>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/></disk>
    <input type='tablet' bus='usb'/>
{devices}
    <video><model type='qxl' ram='65536' vram='65536' heads='1' primary='yes'/></video>
  </devices>
</domain>""".encode()


VNC_LIVE = domain(
    """    <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1' passwd='s3cret'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>"""
)

SPICE_LIVE = domain(
    """    <graphics type='spice' port='5930' tlsPort='5931' autoport='yes' listen='0.0.0.0'>
      <listen type='address' address='0.0.0.0'/>
      <channel name='main' mode='secure'/>
      <image compression='auto_glz'/>
    </graphics>"""
)

BOTH = domain(
    """    <graphics type='spice' port='5930' autoport='no' listen='10.0.0.5'/>
    <graphics type='vnc' port='5901' autoport='no' listen='10.0.0.5'/>
    <graphics type='vnc' port='5902' autoport='no' listen='10.0.0.6' passwd=''/>"""
)

SHUT_OFF_AUTOPORT = domain(
    """    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>""",
    running=False,
)


def vm(*graphics: Graphics, running: bool = True, hypervisor: str = "qemu:///system",
       console_host: Optional[str] = None) -> VMConsoles:
    return VMConsoles(UUID1, "web1", running, tuple(graphics), hypervisor, console_host)
