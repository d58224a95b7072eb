"""serve/fleet.py's control links on their own: real sockets, no agent processes."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from dnnpipe.deploy.registry import Device
from dnnpipe.deploy.transport import SshOptions
from dnnpipe.runtime.control import ControlSession, encode
from dnnpipe.serve import fleet as fleet_module
from dnnpipe.serve.fleet import PUSH_PIECE, AgentLink, Fleet, pieces, send_each

SECONDS = 10


def agent_on(fleet: Fleet, sock: socket.socket) -> AgentLink:
    """Device 2's agent on one end of a socket pair, its link registered as Fleet._link registers one."""
    link = AgentLink(Device(2, "local"), time.monotonic())
    link.sock, link.last_beat = sock, time.monotonic()
    link.sender = threading.Thread(target=send_each, args=(link, ControlSession(sock), fleet.closed), daemon=True)
    link.sender.start()
    fleet.agents[2] = link
    return link


def test_a_send_to_a_silent_agent_holds_up_neither_the_caller_nor_reading_its_times():
    """A push to a frozen agent blocks in sendall once the socket buffers are full: on the link's own sender
    thread. The controller's loop goes on (its role lines to that agent, reading its times), finds the agent silent
    and hangs its link up, which ends the blocked write and the sender."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()  # the agent's end is never read: a frozen agent
    try:
        link = agent_on(fleet, near)
        queued: list[bool] = []
        caller = threading.Thread(target=lambda: queued.extend([fleet.send(2, {"kind": "model"}, b"x" * (64 << 20)),
                                                                fleet.send(2, {"kind": "role"})]), daemon=True)
        caller.start()
        caller.join(1.0)
        assert queued == [True, True], "the caller waited for a write to a frozen agent"
        time.sleep(0.2)
        assert link.sender.is_alive()  # blocked: nobody reads the other end
        taken: list[list[float]] = []
        reader = threading.Thread(target=lambda: taken.append(fleet.take_times(2)), daemon=True)
        reader.start()
        reader.join(SECONDS)
        assert taken == [[]], "reading the agent's times waited for the blocked send"
        fleet.lose(2)  # what the loop does with a silent agent: the write fails and the sender ends
        link.sender.join(SECONDS)
        assert not link.sender.is_alive()
        assert not fleet.send(2, {"kind": "stop"})  # nothing is queued for a lost agent
    finally:
        far.close()
        fleet.close()


def test_control_lines_go_out_in_order_and_close_delivers_stop_last():
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    agent_on(fleet, near)
    for k in range(50):
        fleet.send(2, {"kind": "pace", "generation": k}, b"p" * k)
    fleet.close()
    far.settimeout(SECONDS)
    received = bytearray()
    while chunk := far.recv(1 << 16):
        received += chunk
    far.close()
    expected = b"".join(encode({"kind": "pace", "generation": k}) + b"p" * k for k in range(50))
    assert bytes(received) == expected + encode({"kind": "stop"})


def test_a_files_payload_goes_out_a_piece_at_a_time_as_its_bytes_would(tmp_path):
    """A sub-model cut in the background is pushed from its file: the agent reads the same bytes as from memory."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    agent_on(fleet, near)
    data = os.urandom(2 * PUSH_PIECE + 12345)  # two whole pieces and a part
    (tmp_path / "sub_model").write_bytes(data)
    with (tmp_path / "sub_model").open("rb") as f:
        assert [len(p) for p in pieces(f)] == [PUSH_PIECE, PUSH_PIECE, 12345]
    with (tmp_path / "sub_model").open("rb") as f:
        assert b"".join(bytes(p) for p in pieces(f)) == b"".join(pieces(data)) == data
    received = bytearray()

    def read() -> None:
        far.settimeout(SECONDS)
        while chunk := far.recv(1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    fleet.send(2, {"kind": "pace", "size": len(data)}, tmp_path / "sub_model")  # (close drops pushes)
    fleet.send(2, {"kind": "pace", "size": 1}, tmp_path / "gone")  # nothing of it goes out; the link stays
    fleet.send(2, {"kind": "pace", "size": 3}, b"abc")
    fleet.close()
    reader.join(SECONDS)
    far.close()
    assert bytes(received) == (encode({"kind": "pace", "size": len(data)}) + data +
                               encode({"kind": "pace", "size": 3}) + b"abc" + encode({"kind": "stop"}))


def no_pause_seen(monkeypatch) -> None:
    """The tests set when the controller began listening; its clock thread, run late on a loaded host, would take
    that for a pause of the process and start counting again."""
    monkeypatch.setattr(fleet_module, "listening_since", lambda since, last_tick, now: since)


def test_a_pause_the_clock_has_not_ticked_past_yet_is_no_device_silence(monkeypatch):
    """The loop may look before the clock thread sees that the whole process was paused: its own late `now` says
    so too (once all agents at once were 'silent' 0.6 s, the controller's threads not running)."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    try:
        link = agent_on(fleet, near)
        assert fleet.silent(time.monotonic() + 1.0, 0.5) == []  # 1 s with no tick: the process was paused
        no_pause_seen(monkeypatch)
        fleet.listening = link.last_beat = time.monotonic() - 1.0  # listening, on time, for a second
        time.sleep(0.1)
        assert [d for d, _ in fleet.silent(time.monotonic(), 0.5)] == [2]  # really silent while listening
    finally:
        far.close()
        fleet.close()


def test_an_agent_loading_a_pushed_sub_model_has_the_loading_timeout_to_beat_again(monkeypatch):
    """A board of a sliver of a core may not beat while it takes a sub-model in: from the push to its "prepared"
    (or its refusal) the silence allowed is the loading timeout; before and after, the progress timeout."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    try:
        link = agent_on(fleet, near)
        no_pause_seen(monkeypatch)
        fleet.listening = link.last_beat = time.monotonic() - 1.0  # silent for a second while listening
        time.sleep(0.1)

        def silent() -> list[int]:
            return [d for d, _ in fleet.silent(time.monotonic(), 0.5, 3.0)]

        assert silent() == [2]
        fleet.send(2, {"kind": "model", "units": [1, 4]}, b"flatbuffer")
        fleet.send(2, {"kind": "model", "units": [5, 9]}, b"flatbuffer")
        assert silent() == []
        fleet._heard(link, {"kind": "prepared", "units": [1, 4]}, "agent")
        assert silent() == []  # one still loading
        fleet._heard(link, {"kind": "error", "generation": -1, "message": "units 5-9: does not run"}, "agent")
        assert silent() == [2]
        fleet.events.get_nowait()  # ("prepared", 2, (1, 4)), as the loop reads it
    finally:
        far.close()
        fleet.close()


def test_a_push_an_agent_does_not_take_in_gets_no_loading_grace_and_a_failed_write_hangs_the_link_up(monkeypatch):
    """A frozen agent does not read its push: while the sender is stuck writing it, the agent is not busy loading,
    so the progress timeout holds; a write that fails hangs the link up (its reader then reports the loss)."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    try:
        link = agent_on(fleet, near)
        no_pause_seen(monkeypatch)
        fleet.listening = link.last_beat = time.monotonic() - 1.0
        fleet.send(2, {"kind": "model", "units": [1, 4]}, b"x" * (64 << 20))
        time.sleep(0.2)
        assert link.writing and not fleet.settled(2)
        assert [d for d, _ in fleet.silent(time.monotonic(), 0.5, 3.0)] == [2]
        far.close()  # the agent's end goes: the blocked write fails
        deadline = time.monotonic() + SECONDS
        while near.fileno() != -1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert near.fileno() == -1, "the link was not hung up after its write failed"
    finally:
        far.close()
        fleet.close()


def test_a_lost_agent_is_hung_up_at_once_and_its_process_stopped_only_after_the_recovery():
    """Stopping a frozen agent wakes it to run its shutdown: CPU the recovering stages need on a host of a few
    cores. Its link goes at once; its process when the loop says the new plan is running (or at close)."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    far.settimeout(SECONDS)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        link = agent_on(fleet, near)
        link.process = process
        os.kill(process.pid, signal.SIGSTOP)  # frozen
        lost_at = time.monotonic()
        fleet.lose(2)
        link.sender.join(SECONDS)
        assert not link.sender.is_alive() and far.recv(1) == b""  # hung up at once
        fleet.stop_lost(before=lost_at)  # lost after that moment: not due yet
        time.sleep(0.2)
        assert process.poll() is None
        fleet.stop_lost()
        assert process.wait(SECONDS) == -signal.SIGTERM
    finally:
        far.close()
        fleet.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_close_stops_a_lost_agent_not_stopped_yet():
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        agent_on(fleet, near).process = process
        fleet.lose(2)
        fleet.close()
        assert process.wait(SECONDS) == -signal.SIGTERM
    finally:
        far.close()
        if process.poll() is None:
            process.kill()
            process.wait()
