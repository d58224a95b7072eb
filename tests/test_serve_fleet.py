"""serve/fleet.py's control links on their own: real sockets, no agent processes."""

import socket
import threading
import time

from dnnpipe.deploy.registry import Device
from dnnpipe.deploy.transport import SshOptions
from dnnpipe.serve.fleet import AgentLink, Fleet

SECONDS = 10


def test_a_send_blocked_on_a_silent_agent_does_not_hold_up_reading_its_times():
    """A push to a frozen agent blocks in sendall once the socket buffers are full; the controller's loop must
    still read that agent's times (and so find it silent and hang its link up, which frees the push)."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()  # the agent's end is never read: a frozen agent
    try:
        link = AgentLink(Device(2, "local"), time.monotonic())
        link.sock = near
        fleet.agents[2] = link
        pushed: list[bool] = []
        push = threading.Thread(target=lambda: pushed.append(fleet.send(2, {"kind": "model"}, b"x" * (64 << 20))),
                                daemon=True)
        push.start()
        time.sleep(0.2)
        assert push.is_alive()  # blocked: nobody reads the other end
        taken: list[list[float]] = []
        reader = threading.Thread(target=lambda: taken.append(fleet.take_times(2)), daemon=True)
        reader.start()
        reader.join(SECONDS)
        assert taken == [[]], "reading the agent's times waited for the blocked send"
        fleet.lose(2)  # what the loop does with a silent agent: the push fails instead of hanging
        push.join(SECONDS)
        assert pushed == [False]
    finally:
        far.close()
        fleet.close()


def test_a_pause_the_clock_has_not_ticked_past_yet_is_no_device_silence():
    """The loop may look before the clock thread sees that the whole process was paused: its own late `now` says
    so too (once all agents at once were 'silent' 0.6 s, the controller's threads not running)."""
    fleet = Fleet("127.0.0.1", None, b"m" * 32, b"s" * 16, "parts", "tiny", 5.0, SshOptions(), lambda line: None)
    near, far = socket.socketpair()
    try:
        link = AgentLink(Device(2, "local"), time.monotonic())
        link.sock, link.last_beat = near, time.monotonic()
        fleet.agents[2] = link
        assert fleet.silent(time.monotonic() + 1.0, 0.5) == []  # 1 s with no tick: the process was paused
        fleet.listening = link.last_beat = time.monotonic() - 1.0  # listening, on time, for a second
        time.sleep(0.1)
        assert [d for d, _ in fleet.silent(time.monotonic(), 0.5)] == [2]  # really silent while listening
    finally:
        far.close()
        fleet.close()
