"""A stage's links on real loopback sockets: readiness probes, deadlines, and what a waiting stage says."""

import collections
import socket
import ssl
import threading
import time

import numpy as np
import pytest

from dnnpipe.errors import DnnpipeError
from dnnpipe.manifest import TensorSpec
from dnnpipe.keygen import create_certificate
from dnnpipe.pipeline_key import link_tls
from dnnpipe.frameio import FrameReader
from dnnpipe.protocol import Kind
from dnnpipe.runtime.handshake import LinkAuth, manifest_identity
from dnnpipe.runtime.transport import (MAX_PENDING, MAX_PER_SOURCE, DropCounter, HeldLinks, _Gate, _Held,
                                       accept_link, accept_upstream, connect_downstream, listen, secure_dial)

SPEC = (TensorSpec("x", "x", (1, 4), "float32"),)


def test_a_probe_is_dropped_and_the_real_upstream_is_taken():
    listener = listen("[stage 2]", "127.0.0.1", 0)
    port = listener.getsockname()[1]
    said: list[str] = []
    data = np.arange(4, dtype="float32").reshape(1, 4)

    def upstream() -> None:
        socket.create_connection(("127.0.0.1", port)).close()  # the deployer's readiness probe
        link = connect_downstream("[stage 1]", "127.0.0.1", port, SPEC, 5, 5)
        link.send(0, 123, [data])
        link.end(1)
        link.close()

    thread = threading.Thread(target=upstream)
    thread.start()
    link = accept_upstream("[stage 2]", listener, SPEC, 5, 5, said.append)
    buffer = [np.empty((1, 4), "float32")]
    frame = link.read(buffer)
    assert frame.kind == Kind.DATA and frame.origin_ns == 123
    np.testing.assert_array_equal(buffer[0], data)
    assert link.read(buffer).kind == Kind.END
    thread.join()
    link.close()
    listener.close()
    assert said == [f"[stage 2] waiting for the upstream stage on 127.0.0.1:{port} (up to 5 s)"]


def test_waiting_for_the_upstream_says_so_and_gives_up_at_the_deadline(monkeypatch):
    monkeypatch.setattr("dnnpipe.runtime.transport.PROGRESS_SECONDS", 0.2)
    listener = listen("[stage 3]", "127.0.0.1", 0)
    said: list[str] = []
    with pytest.raises(DnnpipeError, match=r"\[stage 3\] no upstream stage connected to 127.0.0.1:\d+ within "
                                           r"0.7 s \(--connect-timeout\)"):
        accept_upstream("[stage 3]", listener, SPEC, 0.7, 5, said.append)
    assert said[0].startswith("[stage 3] waiting for the upstream stage")
    assert any("still waiting" in line for line in said[1:])
    listener.close()


def test_connecting_to_a_stage_that_never_comes_names_it():
    with socket.socket() as held:  # bound, never listening: refuses connections, and no other run can take it
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(DnnpipeError, match=rf"\[stage 1\] cannot reach the next stage at 127.0.0.1:{port} "
                                               r"within 0.5 s"):
            connect_downstream("[stage 1]", "127.0.0.1", port, SPEC, 0.5, 5)


def test_listening_on_a_taken_port_is_a_clear_error():
    taken = listen("[stage 2]", "127.0.0.1", 0)
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    port = taken.getsockname()[1]
    with pytest.raises(DnnpipeError, match=rf"\[stage 2\] cannot listen on 127.0.0.1:{port}"):
        listen("[stage 2]", "127.0.0.1", port)
    taken.close()


# --- a stranger cannot keep a keyed peer out (issue 29): slots, per-source limits, retries, counted drops

KEY = bytes(range(32))
AUTH = LinkAuth(KEY, manifest_identity(b"{}"), 1, 2)


def silent_clients(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


def test_silent_clients_ahead_of_the_keyed_peer_do_not_keep_it_out():
    """More silent connections than vetting slots arrive first; the real peer is still taken, and the drops are
    reported as a few lines, not one each."""
    listener = listen("[stage 2]", "127.0.0.1", 0)
    port = listener.getsockname()[1]
    crowd = silent_clients(port, MAX_PENDING + 24)
    said: list[str] = []
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(link=accept_link("[stage 2]", listener, 20, said.append,
                                                                             AUTH)))
    thread.start()
    link = connect_downstream("[stage 1]", "127.0.0.1", port, SPEC, 20, 5, auth=AUTH)
    thread.join(20)
    sock, peer = result["link"]
    assert peer.startswith("127.0.0.1:")
    link.send(0, 7, [np.ones((1, 4), "float32")])
    frame = FrameReader(sock, SPEC, "test", 5).read([np.empty((1, 4), "float32")])
    assert frame.origin_ns == 7
    for s in (*crowd, sock):
        s.close()
    link.close()
    listener.close()
    assert len(said) < 6, said


def test_a_connector_retries_the_handshake_until_the_peer_lets_it_in():
    """The next stage's port first drops two connections mid-handshake (as a flooded gate did); the connecting
    stage tries again instead of failing at once."""
    listener = listen("[stage 2]", "127.0.0.1", 0)
    port = listener.getsockname()[1]
    said: list[str] = []

    def flaky_then_real() -> None:
        for _ in range(2):
            sock, _ = listener.accept()
            sock.recv(1)
            sock.close()  # "connection lost during the handshake" at the connector
        accept_link("[stage 2]", listener, 10, auth=AUTH)[0].close()

    thread = threading.Thread(target=flaky_then_real)
    thread.start()
    connect_downstream("[stage 1]", "127.0.0.1", port, SPEC, 10, 5, said.append, AUTH).close()
    thread.join(10)
    listener.close()


def test_a_connector_gives_up_at_its_connect_timeout_naming_the_last_refusal():
    listener = listen("[stage 2]", "127.0.0.1", 0)
    port = listener.getsockname()[1]
    other = LinkAuth(b"x" * 32, AUTH.identity, 1, 2)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: pytest.raises(DnnpipeError, accept_link, "[stage 2]", listener, 30,
                                                           auth=other, stop=stop))
    thread.start()
    with pytest.raises(DnnpipeError, match=rf"\[stage 1\] the next stage at 127.0.0.1:{port} refused the link: the "
                                           r"peer failed the handshake.*\(retried for 1.5 s, --connect-timeout\)"):
        connect_downstream("[stage 1]", "127.0.0.1", port, SPEC, 1.5, 5, auth=AUTH)
    stop.set()
    thread.join(10)
    listener.close()


def test_one_source_takes_at_most_its_share_of_the_vetting_slots():
    gate = _Gate("[stage 2]", AUTH, lambda line: None)
    pairs = [socket.socketpair() for _ in range(MAX_PENDING + 4)]
    for i, (ours, _) in enumerate(pairs[:-1]):
        gate.take(ours, "10.0.0.1", f"10.0.0.1:{i}")  # silent: nothing sent on the far ends
    assert gate.vetting["10.0.0.1"] == MAX_PER_SOURCE
    gate.take(pairs[-1][0], "10.0.0.2", "10.0.0.2:1")
    assert gate.vetting["10.0.0.2"] == 1  # another host is vetted at once
    gate.close()
    for pair in pairs:
        pair[1].close()


def test_a_peer_that_has_spoken_is_vetted_before_older_silent_ones():
    gate = _Gate("[stage 2]", AUTH, lambda line: None)
    pairs = [socket.socketpair() for _ in range(MAX_PER_SOURCE + 3)]
    pairs[-1][1].sendall(b"DNNH")  # the youngest has sent its hello already
    for i, (ours, _) in enumerate(pairs):
        with gate.lock:  # fill the line first, then let the gate choose
            gate.waiting.setdefault("10.0.0.1", collections.deque()).append(_Held(ours, "10.0.0.1", str(i),
                                                                                  time.monotonic()))
    with gate.lock:
        chosen = [gate._next() for _ in range(1)]
    assert chosen[0] is not None and chosen[0].peer == str(len(pairs) - 1)
    gate.close()
    for pair in pairs:
        pair[1].close()


def test_drops_are_counted_not_logged_one_by_one():
    said: list[str] = []
    drops = DropCounter("[stage 2]", said.append, period=3600)
    for i in range(500):
        drops.add(f"10.0.0.{i % 7}:{1000 + i}", "silent for 1 s after connecting (not a stage)")
    drops.add("10.0.0.9:1", "not a DNNPipe handshake (starts with b'\\x1b[2J'; an unauthenticated peer?)")
    drops.report()  # not yet: once a period
    assert len(said) == 2
    drops.report(final=True)
    assert len(said) == 3
    assert said[-1].startswith("[stage 2] dropped 499 more connections from 7 addresses in the last ")
    assert said[-1].endswith(" s (499 silent for 1 s after connecting; 501 in all)")
    assert "\x1b" not in "".join(said)


def test_a_peer_cannot_make_every_drop_a_new_kind():
    said: list[str] = []
    drops = DropCounter("[stage 2]", said.append, period=3600)
    for sender in range(200):
        drops.add(f"10.0.0.1:{sender}", f"the peer says it is stage {sender} sending to stage 9; this link is stage 1 "
                                        f"to stage 2")
    for version in range(200):
        drops.add("10.0.0.1:1", f"handshake version {version}, expected 1")
    drops.report(final=True)
    assert len(said) == 3, said  # one line for each kind, then the counts


def test_tls_links_with_the_api_serve_and_agents_use(tmp_path):
    """accept_link and secure_dial with link_tls: the link inside TLS, then the key handshake, frames on it."""
    create_certificate(tmp_path)
    listening, connecting = link_tls(tmp_path)
    listener = listen("serve", "127.0.0.1", 0)
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(link=accept_link(
        "serve", listener, 10, auth=AUTH, tls=listening, what="stage 1's control channel")))
    thread.start()
    sock, (reason, refused) = secure_dial("127.0.0.1", listener.getsockname()[1], 10, AUTH, connecting)
    thread.join(10)
    assert isinstance(sock, ssl.SSLSocket) and not refused
    theirs, _ = result["link"]
    assert isinstance(theirs, ssl.SSLSocket) and theirs.version() == "TLSv1.3"
    sock.sendall(b"hello\n")
    assert theirs.recv(6) == b"hello\n"
    for s in (sock, theirs, listener):
        s.close()


def test_held_links_give_the_one_that_stays_first_and_close_what_no_role_takes():
    """A link that stays (after NEXT) beats one dialled for the same generation, which closes; links of stale
    generations close; a dialled link again for the same key replaces the first."""
    held = HeldLinks()
    pairs = [socket.socketpair() for _ in range(4)]
    dialled, kept, other, again = (a for a, _ in pairs)
    held.dialled((2, 1), dialled)
    held.kept((2, 1), kept, b"past NEXT")
    assert (2, 1) in held and dialled.fileno() == -1
    assert held.pop((2, 1)) == (kept, b"past NEXT") and (2, 1) not in held
    held.dialled((3, 1), other)
    held.dialled((3, 1), again)
    assert other.fileno() == -1 and held.pop((3, 1)) == (again, b"")
    late, peer = socket.socketpair()
    held.dialled((2, 1), late)  # dialled ahead for a generation whose link stayed and was taken: nobody reads it
    assert late.fileno() == -1 and (2, 1) not in held
    stale, stale_peer = socket.socketpair()
    held.dialled((4, 0), stale)
    held.drop(lambda generation: generation < 5)
    assert stale.fileno() == -1 and (4, 0) not in held
    for a, b in [*pairs, (peer, stale_peer)]:
        a.close(), b.close()
