"""
Playbooks for the guards (mitmproxy's C{test/mitmproxy/proxy/tutils.py} is
the model): a script of inputs (C{>>}) and the outputs expected right after
each (C{<<}), played against a fresh guard in one piece and again one byte
at a time::

    book = Playbook(lambda: RFBGuard(None, PASSWORD))
    book >> Start() << SendToClient(b"RFB 003.008\\n") >> ServerConnected()
    assert_plays(self, book)

Also L{RecordingSink}, the legacy sink that records every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from twisted.trial.unittest import SynchronousTestCase

from vaporproxy.errors import ConsoleError
from vaporproxy.guards.kit import Output, SendToClient, SendToServer


class RecordingSink:
    """
    A guard sink that records every call.

    @ivar calls: every call as C{(method, *args)}, in order (C{fail} as
        C{("fail", code, reason)}).
    """

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.to_client = b""
        self.to_server = b""

    def send_to_client(self, data: bytes) -> None:
        self.calls.append(("send_to_client", data))
        self.to_client += data

    def send_to_server(self, data: bytes) -> None:
        self.calls.append(("send_to_server", data))
        self.to_server += data

    def admit(self, is_main: bool) -> None:
        self.calls.append(("admit", is_main))

    def spice_session(self, session_id: int) -> None:
        self.calls.append(("spice_session", session_id))

    def established(self) -> None:
        self.calls.append(("established",))

    def fail(self, error: ConsoleError, reason: str) -> None:
        self.calls.append(("fail", error.code, reason))

    def start_tls(self, creator: object) -> None:
        self.calls.append(("start_tls", creator))

    def names(self) -> List[str]:
        """
        The names of the calls that are not data.
        """
        return [c[0] for c in self.calls if not c[0].startswith("send_")]

    def failure(self) -> Optional[tuple]:
        fails = [c for c in self.calls if c[0] == "fail"]
        return fails[-1] if fails else None


# -- inputs ----------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """C{guard.start()}."""


@dataclass(frozen=True)
class ClientData:
    """C{guard.client_data(data)}."""

    data: bytes


@dataclass(frozen=True)
class ServerConnected:
    """C{guard.server_connected()}."""


@dataclass(frozen=True)
class ServerData:
    """C{guard.server_data(data)}."""

    data: bytes


@dataclass(frozen=True)
class ServerLost:
    """C{guard.server_lost(reason)}."""

    reason: Any = None


INPUTS = (Start, ClientData, ServerConnected, ServerData, ServerLost)


def feed(guard: Any, event: Any, byte_at_a_time: bool = False) -> List[Output]:
    """
    Give the guard one input; return the outputs it handed out (for data
    fed one byte at a time, those of every byte, in order).
    """
    if isinstance(event, (ClientData, ServerData)):
        method = guard.client_data if isinstance(event, ClientData) else guard.server_data
        if not byte_at_a_time:
            return method(event.data)
        outputs: List[Output] = []
        for i in range(len(event.data)):
            outputs.extend(method(event.data[i : i + 1]))
        return outputs
    if isinstance(event, Start):
        return guard.start()
    if isinstance(event, ServerConnected):
        return guard.server_connected()
    if isinstance(event, ServerLost):
        return guard.server_lost(event.reason)
    raise TypeError(f"not a guard input: {event!r}")


class Placeholder:
    """
    An expected output of a known kind whose value the test cannot know in
    advance (a ticket encrypted with random padding): equal to any output
    of that kind, which it keeps as C{value} to be checked afterwards.
    """

    def __init__(self, kind: type):
        self.kind = kind
        self.value: Any = None

    def __eq__(self, other: object) -> bool:
        if type(other) is not self.kind:
            return False
        self.value = other
        return True

    def __repr__(self) -> str:
        return f"Placeholder({self.kind.__name__})"


def coalesced(entries: List[Any]) -> List[Any]:
    """
    The entries with adjacent L{SendToClient}s (and L{SendToServer}s) joined
    into one: for guards that relay a message as its bytes come.
    """
    joined: List[Any] = []
    for entry in entries:
        if joined and type(entry) in (SendToClient, SendToServer) and type(joined[-1]) is type(entry):
            joined[-1] = type(entry)(joined[-1].data + entry.data)
        else:
            joined.append(entry)
    return joined


class Playbook:
    """
    A guard's script: inputs added with C{>>}, each followed by the outputs
    expected from it, added with C{<<}.

    @param make_guard: makes a fresh guard for each play.
    """

    def __init__(self, make_guard: Callable[[], Any]):
        self.make_guard = make_guard
        self.script: List[Any] = []
        self.guard: Any = None

    def __rshift__(self, event: Any) -> "Playbook":
        if not isinstance(event, INPUTS):
            raise TypeError(f"{event!r} is not a guard input")
        self.script.append(event)
        return self

    def __lshift__(self, output: Any) -> "Playbook":
        if isinstance(output, INPUTS):
            raise TypeError(f"{output!r} is an input, not an output")
        self.script.append(output)
        return self

    def play(self, byte_at_a_time: bool = False) -> List[Any]:
        """
        Feed the script's inputs to a fresh guard (kept as C{self.guard});
        return each input followed by the outputs it actually produced.
        """
        self.guard = self.make_guard()
        played: List[Any] = []
        for entry in self.script:
            if isinstance(entry, INPUTS):
                played.append(entry)
                played.extend(feed(self.guard, entry, byte_at_a_time))
        return played


def assert_plays(case: SynchronousTestCase, book: Playbook, coalesce: bool = False) -> None:
    """
    Play C{book} in one piece and one byte at a time: both produce exactly
    the scripted outputs after each input.

    @param coalesce: compare with adjacent data outputs joined (L{coalesced}).
    """
    expected = coalesced(book.script) if coalesce else book.script
    for byte_at_a_time in (False, True):
        played = book.play(byte_at_a_time)
        if coalesce:
            played = coalesced(played)
        case.assertEqual(played, expected, "one byte at a time" if byte_at_a_time else "in one piece")
