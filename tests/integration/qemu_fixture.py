"""
A plain QEMU (no libvirt) with a VNC and a SPICE server on loopback and a QMP
socket, for integration tests.

Usage in a trial test case::

    qemu = start_qemu(self, vnc_password="s3cret", spice_password="t1cket")
    qemu.vnc_port, qemu.spice_port, qemu.qmp("query-status")

C{start_qemu} skips the test (C{SkipTest}) only when C{qemu-system-x86_64}
is absent, and registers a cleanup that kills the process it started.

With C{vnc_tls_dir} (see L{write_x509_credentials}) the VNC server speaks
VeNCrypt with X.509 (C{tls-creds-x509}, no client certificate asked for).

The machine is diskless and runs TCG: its screen shows SeaBIOS
(C{start_guest_qemu}: a busybox shell, with its serial port in a file).  QMP is
spoken with a blocking socket: the calls take milliseconds and are made in
set-up, outside the code under test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address
from typing import Any, Callable, Dict, Optional, Sequence, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twisted.trial.unittest import SkipTest

from tests.support import free_port, free_vnc_display, listening, wait

QEMU = "qemu-system-x86_64"
Q = TypeVar("Q", bound="QemuProcess")


class QMPError(Exception):
    """
    QMP answered a command with an error.
    """


class QemuProcess:
    """
    A running QEMU with its QMP connection.

    @ivar vnc_port: the VNC TCP port on 127.0.0.1.
    @ivar spice_port: the SPICE TCP port on 127.0.0.1.
    """

    def __init__(self, process: subprocess.Popen, qmp_path: str, workdir: str, spice_port: Optional[int],
                 vnc_tcp: bool = True):  # fmt: skip
        """
        Connect QMP; with C{vnc_tcp}, ask QEMU for its VNC TCP port
        (otherwise C{vnc_port} is C{None}: no VNC, or VNC on a UNIX socket).
        """
        self.serial: Any = None
        self.boot_seconds: Optional[float] = None
        self.process = process
        self.workdir = workdir
        self.spice_port = spice_port
        self._qmp = self._connect_qmp(qmp_path)
        self._reader = self._qmp.makefile("rb")
        greeting = json.loads(self._reader.readline())
        if "QMP" not in greeting:
            raise QMPError("no QMP greeting: %r" % (greeting,))
        self.qmp("qmp_capabilities")
        self.vnc_port = int(self.qmp("query-vnc")["service"]) if vnc_tcp else None

    def _connect_qmp(self, path: str, timeout: float = 10.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    "qemu exited with %s: %s"
                    % (self.process.returncode, self._stderr())
                )
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _stderr(self) -> str:
        try:
            with open(os.path.join(self.workdir, "qemu.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def qmp(self, command: str, **arguments: Any) -> Any:
        """
        Run one QMP command and answer its C{return} value.

        @raise QMPError: when QEMU answers with an error.
        """
        message: Dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._qmp.sendall(json.dumps(message).encode("utf-8") + b"\n")
        while True:
            line = self._reader.readline()
            if not line:
                raise QMPError("QMP connection closed")
            answer = json.loads(line)
            if "return" in answer:
                return answer["return"]
            if "error" in answer:
                raise QMPError(answer["error"].get("desc", str(answer["error"])))
            # An asynchronous event: skip it.

    def set_password(self, protocol: str, password: str) -> None:
        """
        Set the C{"vnc"} or C{"spice"} password.
        """
        self.qmp("set_password", protocol=protocol, password=password)

    def stop(self) -> None:
        """
        Kill QEMU (the process this fixture started) and remove its files.
        """
        try:
            self._reader.close()
            self._qmp.close()
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_x509_credentials(
    directory: str,
    names: Sequence[str] = ("127.0.0.1",),
    ca_name: str = "vaporproxy test CA",
) -> Dict[str, str]:
    """
    Write a fresh CA and a server certificate it signs, in the layout
    QEMU's C{tls-creds-x509} reads: C{ca-cert.pem}, C{server-cert.pem},
    C{server-key.pem}.  C{names} go in the subject alternative name (IP
    addresses as IP entries) and the first one in the common name.

    @return: the paths by file name (and C{"ca-key.pem"}).
    """
    os.makedirs(directory, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca-cert.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca-key.pem": _key_pem(ca_key),
        "server-cert.pem": server_cert.public_bytes(serialization.Encoding.PEM),
        "server-key.pem": _key_pem(server_key),
    }
    paths = {}
    for name, data in files.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
    return paths


def write_dh_params(directory: str) -> str:
    """
    Write C{dh-params.pem} (the RFC 7919 ffdhe2048 group, so nothing is
    generated) for QEMU's C{tls-creds-anon}.

    @raise SkipTest: when the C{openssl} command is absent.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SkipTest("openssl is not installed")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "dh-params.pem")
    subprocess.run(
        [openssl, "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "dh_param:ffdhe2048", "-out", path],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return path


def qemu_available() -> Optional[str]:
    """
    The path of C{qemu-system-x86_64}, or C{None} when it is not installed.
    """
    return shutil.which(QEMU)


def start_qemu(
    testcase: Any,
    vnc_password: Optional[str] = None,
    spice_password: Optional[str] = None,
    vnc_tls_dir: Optional[str] = None,
    vnc_tls_anonymous: bool = False,
) -> QemuProcess:
    """
    Start a QEMU with VNC (C{password=on}) and SPICE on 127.0.0.1 and set
    the given passwords over QMP.  Cleaned up with C{testcase.addCleanup}.

    @param vnc_tls_dir: a directory of X.509 credentials (see
        L{write_x509_credentials}); the VNC server then offers VeNCrypt
        (X509Vnc) only.
    @param vnc_tls_anonymous: use anonymous TLS instead (C{tls-creds-anon},
        VeNCrypt TLSVnc); C{vnc_tls_dir} then holds C{dh-params.pem} (see
        L{write_dh_params}).

    @raise SkipTest: when QEMU is not installed.
    """
    spice_port = free_port()
    tls_args = []
    if vnc_tls_dir is not None:
        if vnc_tls_anonymous:
            creds = "tls-creds-anon,id=tls0,dir=%s,endpoint=server" % (vnc_tls_dir,)
        else:
            creds = "tls-creds-x509,id=tls0,dir=%s,endpoint=server,verify-peer=off" % (vnc_tls_dir,)
        tls_args = ["-object", creds]
    display = [
        *tls_args,
        "-vnc", "127.0.0.1:10,to=90,password=on" + (",tls-creds=tls0" if vnc_tls_dir else ""),
        "-spice", "port=%d,addr=127.0.0.1" % (spice_port,),
    ]  # fmt: skip
    qemu = start_diskless_qemu(testcase, lambda workdir: display, lambda *a: QemuProcess(*a, spice_port=spice_port))
    _set_passwords(qemu, vnc_password, spice_password)
    return qemu


def start_diskless_qemu(testcase: Any, display_args: Callable[[str], Sequence[str]],
                        connect: Callable[[subprocess.Popen, str, str], Q]) -> Q:  # fmt: skip
    """
    Start a diskless TCG QEMU (128 MiB, standard VGA) with the display
    arguments C{display_args(workdir)} gives (its files, sockets included,
    belong in C{workdir}) and QMP on a socket; C{connect(process, qmp_path,
    workdir)} answers the L{QemuProcess} (or subclass) for it.

    @raise SkipTest: when QEMU is not installed.
    """
    binary = qemu_available()
    if binary is None:
        raise SkipTest("%s is not installed" % (QEMU,))
    workdir = tempfile.mkdtemp(prefix="vaporproxy-qemu-")
    qmp_path = os.path.join(workdir, "qmp.sock")
    args = [
        binary,
        "-machine", "pc,accel=tcg",
        "-m", "128",
        "-nodefaults",
        "-vga", "std",
        "-display", "none",
        *display_args(workdir),
        "-qmp", "unix:%s,server=on,wait=off" % (qmp_path,),
    ]  # fmt: skip
    return launch(testcase, args, workdir, lambda process: connect(process, qmp_path, workdir))


def start_guest_qemu(
    testcase: Any,
    vnc_password: Optional[str] = None,
    spice_password: Optional[str] = None,
) -> QemuProcess:
    """
    Like L{start_qemu}, but booting the interactive test VM (a busybox
    shell, see L{vaporproxy.demo.guest}; built into its cache on first
    use) with qxl video and 256 MiB.  C{qemu.serial} is its serial port
    (a L{SerialLog}); this returns once the guest said C{vm: ready}.

    @raise SkipTest: when QEMU is not installed.
    """
    from vaporproxy.demo.boot import SerialLog, plain_qemu_argv
    from vaporproxy.demo.guest import ensure_guest

    binary = qemu_available()
    if binary is None:
        raise SkipTest("%s is not installed" % (QEMU,))
    guest = ensure_guest()
    workdir = tempfile.mkdtemp(prefix="vaporproxy-guest-")
    qmp_path = os.path.join(workdir, "qmp.sock")
    serial_path = os.path.join(workdir, "serial.log")
    spice_port = free_port()
    args = plain_qemu_argv(
        guest,
        serial_path,
        vnc="127.0.0.1:10,to=90,password=on",
        spice="port=%d,addr=127.0.0.1" % (spice_port,),
        binary=binary,
        extra=["-qmp", "unix:%s,server=on,wait=off" % (qmp_path,)],
    )
    qemu = launch(testcase, args, workdir, lambda process: QemuProcess(process, qmp_path, workdir, spice_port))
    _set_passwords(qemu, vnc_password, spice_password)
    qemu.serial = SerialLog(serial_path)
    qemu.boot_seconds = qemu.serial.wait_ready(alive=lambda: qemu.process.poll() is None)
    return qemu


def _set_passwords(qemu: QemuProcess, vnc_password: Optional[str], spice_password: Optional[str]) -> None:
    """
    Set the VNC and SPICE passwords that are given, over QMP.
    """
    if vnc_password is not None:
        qemu.set_password("vnc", vnc_password)
    if spice_password is not None:
        qemu.set_password("spice", spice_password)


def launch(testcase: Any, args: Sequence[str], workdir: str, connect: Callable[[subprocess.Popen], Q]) -> Q:
    """
    Start QEMU with C{args} (its log in C{workdir}/qemu.log), connect to it
    with C{connect(process)} and register its cleanup; when connecting
    fails, kill it and remove C{workdir}, so no failed start leaks a VM.
    """
    with open(os.path.join(workdir, "qemu.log"), "wb") as log:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        qemu = connect(process)
    except BaseException:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    testcase.addCleanup(qemu.stop)
    return qemu


def start_bios_qemu(testcase: Any, binary: str) -> int:
    """
    A diskless QEMU (64 MiB, no QMP) that only shows its BIOS screen, with
    password-less VNC on a free display, killed at clean-up; answer its VNC
    port once it accepts.

    @raise SkipTest: when no VNC display is free.
    """
    display = free_vnc_display()
    if display is None:
        raise SkipTest("no free VNC display")
    process = subprocess.Popen(
        [binary, "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-vga", "std", "-display", "none",
         "-vnc", f"127.0.0.1:{display}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    testcase.addCleanup(lambda: (process.kill(), process.wait(10)))
    port = 5900 + display
    wait(lambda: listening(port), timeout=20, interval=0.1)
    return port
