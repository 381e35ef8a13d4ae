"""
Hostile clients against a real C{twistd vaporproxy} process on loopback
(issue #11): slow-header floods, huge request bodies, token minting floods.
The process runs with the common 1024-descriptor limit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.request
from typing import List, Optional, Tuple

from twisted.trial.unittest import TestCase

from tests.integration.libvirt_fixtures import domain_xml, graphics_xml, node_uri, write_node_file
from tests.integration.redis_server import RedisServer, stop_process
from tests.support import checkout_env, free_port, rss_kb, twistd_argv, wait

FD_LIMIT = 1024
SLOW_CLIENTS = 1100
KEY = "hostile-test-key"
VM = "flood-vm"
VM_UUID = "5c3a4a1e-2f0b-4d8e-9a77-1b2c3d4e5f60"


def open_files(pid: int, under: str) -> List[str]:
    """
    The files under C{under} (deleted ones too) process C{pid} holds open.
    """
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(under):
            found.append(target)
    return found


def limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class ProcessCase(TestCase):
    """
    One vaporproxy process (memory tokens, libvirt's test driver with one
    VNC VM) per test.
    """

    timeout = 300

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.tmp = os.path.join(self.dir, "tmp")
        os.makedirs(self.tmp)
        self.port, self.vnc_port = free_port(), free_port()
        self.log = os.path.join(self.dir, "twistd.log")
        self.process: Optional[subprocess.Popen] = None

    def write_config(self, keys: Tuple[Tuple[str, str], ...] = (("flood", KEY),), port: Optional[int] = None,
                     redis_url: Optional[str] = None, name: str = "") -> str:  # fmt: skip
        """
        Write vapor{name}.conf with API keys C{(user, key)} (memory tokens,
        or Redis at C{redis_url}); answer its path.
        """
        config = os.path.join(self.dir, f"vapor{name}.conf")
        node = write_node_file(self.dir, [domain_xml(VM, VM_UUID, [graphics_xml("vnc", self.vnc_port)])])
        api_keys = ", ".join(f'{{user: {user}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}"}}'
                             for user, key in keys)  # fmt: skip
        tokens = f'tokens: {{backend: redis, redis_url: "{redis_url}"}}\n' if redis_url else ""
        with open(config, "w") as f:
            f.write(
                f'hypervisors: [{{uri: "{node_uri(node)}"}}]\n'
                f'server: {{listen: ["tcp:{port or self.port}:interface=127.0.0.1"]}}\n'
                f"auth: {{api_keys: [{api_keys}]}}\n"
                "logging: {access_log: false}\n" + tokens
            )
        return config

    def start(self, keys: Tuple[Tuple[str, str], ...] = (("flood", KEY),), port: Optional[int] = None,
              redis_url: Optional[str] = None, name: str = "") -> subprocess.Popen:  # fmt: skip
        config = self.write_config(keys, port, redis_url, name)
        log = os.path.join(self.dir, f"twistd{name}.log")
        process = subprocess.Popen(
            twistd_argv(config, log), env=checkout_env(TMPDIR=self.tmp), cwd=self.dir,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit_descriptors,
        )  # fmt: skip
        self.addCleanup(stop_process, process)
        if not wait(lambda: self.healthy(port=port)):
            self.fail("vaporproxy did not start: " + self.tail(log))
        if not name:
            self.process = process
        return process

    def tail(self, log: Optional[str] = None) -> str:
        try:
            with open(log or self.log) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def healthy(self, timeout: float = 5.0, port: Optional[int] = None) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.port}/healthz", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False



class HostileTests(ProcessCase):
    """
    Slow clients and big bodies.
    """

    def test_slow_header_flood(self) -> None:
        """When 1,100 clients hold slow, unfinished requests open, a process with 1,024 descriptors still answers a fresh client at once."""
        process = self.start()
        flood: List[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in flood])
        for _ in range(SLOW_CLIENTS):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            flood.append(s)
        time.sleep(1.0)
        for s in flood:
            try:
                s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass  # shed already
        time.sleep(0.5)
        started = time.monotonic()
        self.assertTrue(self.healthy(timeout=10.0), self.tail())
        answered_in = time.monotonic() - started
        self.assertLess(answered_in, 5.0)
        descriptors = len(os.listdir(f"/proc/{process.pid}/fd"))
        print(f"\nslow-header flood: {SLOW_CLIENTS} connections; fresh client answered in {answered_in:.3f}s;"
              f" proxy holds {descriptors} descriptors")  # fmt: skip
        self.assertLess(descriptors, FD_LIMIT - 100)
        for s in flood:  # a byte more from every slow client: the fresh client is still answered
            try:
                s.send(b"X")
            except OSError:
                pass
        self.assertTrue(self.healthy(timeout=10.0), self.tail())

    def _send_body(self, head: bytes, chunks: int, chunk: bytes) -> Tuple[int, bytes]:
        """
        Send C{head} then up to C{chunks} times C{chunk}; answer the bytes
        of the body sent and what the server answered.
        """
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sent = 0
        with s:
            s.sendall(head)
            try:
                for _ in range(chunks):
                    s.sendall(chunk)
                    sent += len(chunk)
            except OSError as e:
                self.assertIn(e.errno, (errno.EPIPE, errno.ECONNRESET))
            answer = b""
            try:
                answer = s.recv(4096)
            except OSError:
                pass
        return sent, answer

    def test_huge_chunked_body(self) -> None:
        """When a client sends a 256 MB chunked body, neither temporary files nor the process's memory grow past a few MB."""
        process = self.start()
        before = rss_kb(process.pid)
        piece = b"x" * (1024 * 1024)
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        head = b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        sent, answer = self._send_body(head, 256, chunk)
        print(f"\n256 MB chunked body: {sent // 1024} KB accepted by the socket before the close;"
              f" RSS +{rss_kb(process.pid) - before} KB; answer {answer[:12]!r}")  # fmt: skip
        self.assertLess(sent, 64 * 1024 * 1024)
        self.assertEqual(open_files(process.pid, self.tmp), [])
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertLess(rss_kb(process.pid) - before, 8 * 1024)
        if answer:
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)

    def test_declared_huge_body(self) -> None:
        """When a request declares a 256 MB body, it is answered 413 before the body is read."""
        self.start()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        with s:
            s.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 268435456\r\n\r\n")
            answer = s.recv(4096)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertEqual(json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"], "BAD_REQUEST")


#: Token requests in the minting flood, sent pipelined in batches.
MINT_REQUESTS = 200_000
MINT_BATCH = 500


def count_answers(sock: socket.socket, expected: int, buffered: bytes) -> Tuple[int, int, bytes]:
    """
    Read until C{expected} answers have come; answer (200s, 429s, rest).
    """
    data = buffered
    while data.count(b"HTTP/1.1 ") < expected:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError("connection closed mid-flood")
        data += chunk
    # Cut after the expected-th answer's start; the rest belongs to the next batch.
    starts = []
    index = data.find(b"HTTP/1.1 ")
    while index >= 0 and len(starts) <= expected:
        starts.append(index)
        index = data.find(b"HTTP/1.1 ", index + 1)
    done = data if len(starts) <= expected else data[: starts[expected]]
    return done.count(b"HTTP/1.1 200 "), done.count(b"HTTP/1.1 429 "), data[len(done):]


class MintFloodTests(ProcessCase):
    """
    One key asking for tokens as fast as it can.
    """

    timeout = 900

    def test_mint_flood(self) -> None:
        """When one key asks for 200,000 tokens as fast as it can, it meets 429s and the process's memory grows by less than 32 MB."""
        process = self.start()
        request = (f"GET /api/v1/virtualization/virtualmachines/{VM}/console HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {KEY}\r\n\r\n").encode()  # fmt: skip
        ok = limited = 0
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
            s.sendall(request)
            first_ok, first_limited, rest = count_answers(s, 1, b"")
            self.assertEqual((first_ok, first_limited), (1, 0), self.tail())
            before = rss_kb(process.pid)
            for _ in range(MINT_REQUESTS // MINT_BATCH):
                s.sendall(request * MINT_BATCH)
                batch_ok, batch_limited, rest = count_answers(s, MINT_BATCH, rest)
                ok += batch_ok
                limited += batch_limited
        elapsed = time.monotonic() - started
        grown = rss_kb(process.pid) - before
        print(f"\nmint flood: {ok} tokens, {limited} refused 429 in {elapsed:.1f}s; RSS +{grown} KB")
        self.assertEqual(ok + limited, MINT_REQUESTS)
        self.assertGreater(limited, MINT_REQUESTS * 0.9)
        self.assertLessEqual(ok, 100)  # auth.max_outstanding_tokens
        self.assertLess(grown, 32 * 1024)


def console_info(port: int, key: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/virtualization/virtualmachines/{VM}/console",
        headers={"Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


class Console:
    """
    A console WebSocket's socket and the bytes read past its handshake.
    """

    def __init__(self, sock: socket.socket, pending: bytes):
        self.sock = sock
        self.pending = pending

    def close(self) -> None:
        self.sock.close()


def open_console(port: int, token: str) -> Console:
    """
    A console WebSocket with C{token}, its handshake answered 101.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(
        (f"GET /api/v1/virtualization/virtualmachines/{VM}/console/ws?token={token} HTTP/1.1\r\n"
         f"Host: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n").encode()
    )  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise AssertionError(f"closed during the handshake: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101 "):
        raise AssertionError(head)
    return Console(s, head.split(b"\r\n\r\n", 1)[1])


def close_code(console: Console, texts: Optional[List[str]] = None) -> int:
    """
    Read server frames until the close frame; answer its code (and add the
    text frames before it, the JSON errors, to C{texts}).
    """
    s, data = console.sock, console.pending

    def need(n: int) -> None:
        nonlocal data
        while len(data) < n:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError("closed without a close frame")
            data += chunk

    while True:
        need(2)
        opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            need(4)
            length, offset = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            need(10)
            length, offset = int.from_bytes(data[2:10], "big"), 10
        need(offset + length)
        payload, data = data[offset:offset + length], data[offset + length:]
        if opcode == 8:
            return int.from_bytes(payload[:2], "big")
        if opcode == 1 and texts is not None:
            texts.append(payload.decode("utf-8"))


class RevocationTests(ProcessCase):
    """
    A SIGHUP that removes a key, for real.
    """

    def test_removed_key(self) -> None:
        """When a SIGHUP removes a key, its unredeemed token is refused (4001 revoked) and its live console is closed with 4010; another key's console stays."""
        vnc = socket.socket()
        vnc.bind(("127.0.0.1", self.vnc_port))
        vnc.listen(8)  # accepted by the kernel, silent: the console waits for the VM's handshake
        self.addCleanup(vnc.close)
        keys = (("flood", KEY), ("mallory", "mallory-key-to-revoke"))
        process = self.start(keys)
        unredeemed = console_info(self.port, keys[1][1])["token"]
        live = open_console(self.port, console_info(self.port, keys[1][1])["token"])
        other = open_console(self.port, console_info(self.port, KEY)["token"])
        self.addCleanup(live.close)
        self.addCleanup(other.close)
        time.sleep(1.0)  # both consoles admitted and dialling
        self.write_config(keys[:1])
        os.kill(process.pid, signal.SIGHUP)
        self.assertTrue(wait(lambda: "SIGHUP: reloaded" in self.tail()), self.tail())
        texts: List[str] = []
        self.assertEqual(close_code(live, texts), 4010)
        self.assertEqual([json.loads(t)["error"] for t in texts], ["Your access to this VM was revoked"])
        late = open_console(self.port, unredeemed)
        self.addCleanup(late.close)
        self.assertEqual(close_code(late), 4001)
        other.sock.settimeout(0.5)
        self.assertRaises(socket.timeout, other.sock.recv, 1 << 16)

    def test_removed_key_on_redis(self) -> None:
        """When two nodes on one Redis reload without a key, a token it minted on one node is refused on the other (4001), and its console on the other node is closed with 4010."""
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        self.addCleanup(redis.stop)
        vnc = socket.socket()
        vnc.bind(("127.0.0.1", self.vnc_port))
        vnc.listen(8)
        self.addCleanup(vnc.close)
        keys = (("flood", KEY), ("mallory", "mallory-key-to-revoke"))
        port_b = free_port()
        node_a = self.start(keys, redis_url=redis.url, name="-a")
        node_b = self.start(keys, port=port_b, redis_url=redis.url, name="-b")
        unredeemed = console_info(self.port, keys[1][1])["token"]
        live = open_console(port_b, console_info(self.port, keys[1][1])["token"])
        self.addCleanup(live.close)
        time.sleep(1.0)
        for node, name in ((node_a, "-a"), (node_b, "-b")):
            self.write_config(keys[:1], self.port if name == "-a" else port_b, redis.url, name)
            os.kill(node.pid, signal.SIGHUP)
        log_b = os.path.join(self.dir, "twistd-b.log")
        self.assertTrue(wait(lambda: "SIGHUP: reloaded" in self.tail(log_b)), self.tail(log_b))
        texts: List[str] = []
        self.assertEqual(close_code(live, texts), 4010)
        self.assertEqual([json.loads(t)["error"] for t in texts], ["Your access to this VM was revoked"])
        late = open_console(port_b, unredeemed)
        self.addCleanup(late.close)
        self.assertEqual(close_code(late), 4001)
