"""runtime/control.py: a stage's control channel to a controller, on real socket pairs and a real listener.

The agent's side of the same lines (its roles, its pushed models) is tests/test_agent.py's."""

import json
import socket
import threading
import time

import pytest

from dnnpipe.errors import DnnpipeError
from dnnpipe.runtime.control import (MAX_LINE, MAX_PACE_MS, ControlLink, ControlSession, LineReader, check_command,
                                     encode, integer, number, text, times)
from dnnpipe.runtime.metrics import FrameTiming

PEER = "[stage 2] controller 127.0.0.1:1"
SECONDS = 20


@pytest.fixture
def pair():
    near, far = socket.socketpair()
    near.settimeout(SECONDS)
    far.settimeout(SECONDS)
    yield near, far
    near.close()
    far.close()


def test_encode_is_one_compact_json_line():
    line = encode({"kind": "beat", "sent": 3, "times": [1.5]})
    assert line == b'{"kind":"beat","sent":3,"times":[1.5]}\n'
    assert json.loads(line) == {"kind": "beat", "sent": 3, "times": [1.5]}


def test_lines_split_across_reads_and_joined_in_one_read_come_out_one_by_one(pair):
    near, far = pair
    reader = LineReader(near, PEER)
    first, second = encode({"kind": "pace", "ms": 2}), encode({"kind": "done"})
    far.sendall(first[:5])
    sender = threading.Timer(0.05, lambda: far.sendall(first[5:] + second))
    sender.start()
    assert reader.read() == {"kind": "pace", "ms": 2}
    assert reader.read() == {"kind": "done"}
    far.shutdown(socket.SHUT_WR)
    assert reader.read() is None  # a clean end
    sender.join()


def test_raw_bytes_after_a_line_are_read_exactly_including_those_already_buffered(pair):
    near, far = pair
    payload = bytes(range(256)) * 40
    far.sendall(encode({"kind": "model", "size": len(payload)}) + payload[:100])
    reader = LineReader(near, PEER)
    assert reader.read() == {"kind": "model", "size": len(payload)}
    far.sendall(payload[100:] + encode({"kind": "done"}))
    assert reader.read_exact(len(payload)) == payload
    assert reader.read() == {"kind": "done"}


def test_a_push_cut_short_names_the_peer_and_the_count(pair):
    near, far = pair
    far.sendall(encode({"kind": "model"}) + b"x" * 10)
    far.shutdown(socket.SHUT_WR)
    reader = LineReader(near, PEER)
    reader.read()
    with pytest.raises(DnnpipeError, match=r"controller 127.0.0.1:1: closed after 10 of 50 pushed bytes"):
        reader.read_exact(50)


def test_a_line_without_end_is_refused_once_it_passes_the_limit(pair):
    near, far = pair
    sender = threading.Thread(target=lambda: far.sendall(b"{" * (MAX_LINE + (1 << 14) + 1)), daemon=True)
    sender.start()
    with pytest.raises(DnnpipeError, match=f"controller 127.0.0.1:1: control line longer than {MAX_LINE} bytes"):
        LineReader(near, PEER).read()
    near.close()  # unblocks the sender
    sender.join(SECONDS)


@pytest.mark.parametrize("line, why", [(b"[1, 2]", "without a 'kind'"), (b'{"kind": 7}', "without a 'kind'"),
                                       (b"{nope", "not valid JSON"),
                                       (b'{"kind": "pace", "ms": NaN}', "not valid JSON")])
def test_a_bad_line_from_the_socket_names_the_peer(pair, line, why):
    near, far = pair
    far.sendall(line + b"\n")
    with pytest.raises(DnnpipeError, match=f"controller 127.0.0.1:1: control (line is|message) .*{why}"):
        LineReader(near, PEER).read()


def test_check_command_takes_a_pace_in_range_and_nothing_else():
    assert check_command({"kind": "pace", "ms": 12}, PEER) == {"kind": "pace", "ms": 12.0}
    assert check_command({"kind": "pace", "ms": MAX_PACE_MS}, PEER)["ms"] == MAX_PACE_MS
    for bad in (0, -1, MAX_PACE_MS * 2, True, "5", None, float("inf")):
        with pytest.raises(DnnpipeError, match=r"'pace' needs ms a finite number in \[0.001, 60000\]"):
            check_command({"kind": "pace", "ms": bad}, PEER)
    with pytest.raises(DnnpipeError, match="unknown control command 'reboot'"):
        check_command({"kind": "reboot"}, PEER)


def test_the_field_checks_name_the_field_and_what_came():
    message = {"kind": "beat", "sent": 4, "flag": True, "note": "ok\x1b[31m", "times": [1.0, 2]}
    assert integer(message, "sent", 0, 10, PEER) == 4
    with pytest.raises(DnnpipeError, match=r"'beat' needs flag a whole number in \[0, 10\], got 'True'"):
        integer(message, "flag", 0, 10, PEER)
    with pytest.raises(DnnpipeError, match=r"needs sent a whole number in \[5, 10\], got '4'"):
        integer(message, "sent", 5, 10, PEER)
    assert number(message, "absent", 0, 1, PEER, optional=True) is None
    with pytest.raises(DnnpipeError, match="needs absent a finite number"):
        number(message, "absent", 0, 1, PEER)
    assert text(message, "note", PEER) == "ok\\x1b[31m"  # no terminal escape reaches a log
    with pytest.raises(DnnpipeError, match="needs sent a string"):
        text(message, "sent", PEER)
    assert times(message, "times", PEER) == [1.0, 2.0]
    for bad in ([1, -1], [1, "2"], "1,2", [0.0] * 5000):
        with pytest.raises(DnnpipeError, match="'beat' needs times a"):
            times({"kind": "beat", "times": bad}, "times", PEER)


class Controller:
    """A real listener standing in for serve's controller: takes one stage's control connection."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SECONDS)
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.reader: LineReader | None = None

    def accept(self) -> LineReader:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(SECONDS)
        self.reader = LineReader(self.conn, "the stage")
        return self.reader

    def close(self):
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()


@pytest.fixture
def controller():
    c = Controller()
    yield c
    c.close()


def test_a_stage_says_hello_beats_its_new_frame_times_obeys_a_pace_and_says_how_it_ended(controller):
    timings = [FrameTiming(0, inference_ms=1.5, emulation_ms=0.5)]
    commands: list = []
    lost: list = []
    accepted = threading.Thread(target=controller.accept, daemon=True)
    accepted.start()
    link = ControlLink("[stage 2]", 2, "127.0.0.1", controller.port, SECONDS, timings, commands.append, lost.append)
    accepted.join(SECONDS)
    reader = controller.reader
    assert reader is not None
    hello = reader.read()
    assert hello is not None and hello["kind"] == "hello" and hello["stage"] == 2
    beat = reader.read()
    assert beat == {"kind": "beat", "sent": 1, "times": [2.0]}
    timings.append(FrameTiming(1, inference_ms=3.0))
    while (beat := reader.read()) is not None and beat["sent"] < 2:
        assert beat["times"] == []  # nothing new, nothing repeated
    assert beat == {"kind": "beat", "sent": 2, "times": [3.0]}
    assert controller.conn is not None
    controller.conn.sendall(encode({"kind": "pace", "ms": 7}))
    while not commands:
        reader.read()
    assert commands == [{"kind": "pace", "ms": 7.0}] and not lost
    link.close("[stage 2] RuntimeError: gone")
    while (message := reader.read()) is not None and message["kind"] == "beat":
        pass
    assert message == {"kind": "error", "message": "[stage 2] RuntimeError: gone"}
    assert reader.read() is None


def test_a_controller_that_goes_away_or_sends_nonsense_is_reported_lost(controller):
    lost: list = []
    got = threading.Event()
    accepted = threading.Thread(target=controller.accept, daemon=True)
    accepted.start()
    link = ControlLink("[stage 3]", 3, "127.0.0.1", controller.port, SECONDS, [], lambda c: None,
                       lambda why: (lost.append(why), got.set()))
    accepted.join(SECONDS)
    assert controller.conn is not None
    controller.conn.sendall(encode({"kind": "reboot"}))
    assert got.wait(SECONDS)
    [why] = lost
    assert why.startswith(f"[stage 3] controller 127.0.0.1:{controller.port}: ") and \
        why.endswith("unknown control command 'reboot'")
    link.close(None)


def test_no_controller_listening_is_one_error_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
    with pytest.raises(DnnpipeError, match=f"\\[stage 2\\] controller 127.0.0.1:{port}: cannot connect within 1 s"):
        ControlLink("[stage 2]", 2, "127.0.0.1", port, 1.0, [], lambda c: None, lambda why: None)


def tls_sessions(folder) -> tuple:
    """Both ends of a TLS control link (socket buffers of 16 KB) as ControlSessions."""
    from dnnpipe.keygen import create_certificate
    from dnnpipe.pipeline_key import tls_context
    from dnnpipe.runtime.handshake import tls_wrap

    create_certificate(folder)
    near, far = socket.socketpair()
    for sock in (near, far):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
    wrapped: list = []
    server = threading.Thread(target=lambda: wrapped.append(tls_wrap(far, tls_context(folder, True), True)))
    server.start()
    near_end = ControlSession(tls_wrap(near, tls_context(folder, False), False))
    server.join(SECONDS)
    assert wrapped, "the TLS handshake did not complete"
    return near_end, ControlSession(wrapped[0])


def test_a_tls_control_link_closed_by_another_thread_ends_its_reader_and_writer_with_no_stray_error(tmp_path):
    """A close from another thread while a thread waits to read (no shutdown first: nothing wakes the wait): the
    read ends as a closed link within a second, and a write after it fails as an OSError, never as a ValueError
    of a closed SSL socket."""
    controller, agent = tls_sessions(tmp_path)
    ended: list = []

    def read() -> None:
        try:
            ended.append(controller.recv(100))
        except OSError as e:
            ended.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.2)  # (waiting for data by now)
    controller.sock.close()
    reader.join(SECONDS)
    assert ended and (ended[0] == b"" or isinstance(ended[0], OSError)), ended
    with pytest.raises(OSError):
        controller.sendall(b"x" * 100)
    agent.sock.close()


def test_a_tls_control_link_read_and_written_at_once_on_both_ends_carries_every_byte(tmp_path):
    """The control links' pattern over TLS: one end pushes megabytes (a sub-model after its line) while it reads
    lines, the other reads them while another thread of its own writes lines. Through ControlSession (one TLS
    call at a time, none waiting in the lock) every byte arrives in order both ways; small socket buffers make the
    writes wait for room."""
    controller, agent = tls_sessions(tmp_path)
    push = bytes(range(256)) * (8 << 12)  # 8 MB
    lines = b"".join(encode({"kind": "beat", "sent": k}) for k in range(3000))
    got: dict[str, bytearray] = {"push": bytearray(), "lines": bytearray()}

    def read(session: ControlSession, into: bytearray, size: int) -> None:
        while len(into) < size:
            chunk = session.recv(1 << 16)
            if not chunk:
                return
            into += chunk

    def beats() -> None:
        for k in range(0, len(lines), 600):
            agent.sendall(lines[k:k + 600])

    def pushed() -> None:  # as an agent takes a sub-model: its line, then the bytes (recv_into through TLS)
        reader = LineReader(agent, PEER)
        if reader.read() == {"kind": "model", "size": len(push)}:
            got["push"] += reader.read_exact(len(push))

    threads = [threading.Thread(target=pushed, daemon=True),
               threading.Thread(target=read, args=(controller, got["lines"], len(lines)), daemon=True),
               threading.Thread(target=beats, daemon=True)]
    for thread in threads:
        thread.start()
    controller.sendall(encode({"kind": "model", "size": len(push)}))
    for k in range(0, len(push), 1 << 20):
        controller.sendall(memoryview(push)[k:k + (1 << 20)])
    for thread in threads:
        thread.join(SECONDS)
    assert not any(thread.is_alive() for thread in threads)
    assert bytes(got["push"]) == push and bytes(got["lines"]) == lines
    controller.sock.close()
    agent.sock.close()
