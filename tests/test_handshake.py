"""The link handshake on real socket pairs: both ends must hold the key, the manifest and the link's stages."""

import socket
import threading
import time

import pytest

from dnnpipe.runtime.handshake import (HELLO, HandshakeError, LinkAuth, ProbeClosed, connect_side, listen_side,
                                       manifest_identity)

KEY = bytes(range(32))
IDENTITY = manifest_identity(b'{"format": "dnnpipe-manifest"}')


def run_pair(connector: LinkAuth, listener: LinkAuth, seconds: float = 2.0):
    """Both sides at once; the outcome of each, None for success or the exception."""
    a, b = socket.socketpair()
    outcome: dict[str, object] = {}

    def side(name, function, sock, auth):
        try:
            function(sock, auth, seconds)
            outcome[name] = None
        except HandshakeError as e:
            outcome[name] = e
            sock.close()

    threads = [threading.Thread(target=side, args=("connector", connect_side, a, connector)),
               threading.Thread(target=side, args=("listener", listen_side, b, listener))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    a.close()
    b.close()
    return outcome["connector"], outcome["listener"]


def test_both_ends_with_the_same_key_manifest_and_link_pass():
    auth = LinkAuth(KEY, IDENTITY, 1, 2)
    assert run_pair(auth, auth) == (None, None)


@pytest.mark.parametrize("connector", [
    LinkAuth(b"x" * 32, IDENTITY, 1, 2),  # another key
    LinkAuth(KEY, manifest_identity(b"stale"), 1, 2),  # a stale manifest on one side
])
def test_another_key_or_manifest_fails_on_both_ends(connector):
    connector_error, listener_error = run_pair(connector, LinkAuth(KEY, IDENTITY, 1, 2))
    assert "another pipeline key or another manifest" in str(connector_error)
    assert isinstance(listener_error, HandshakeError)


def test_the_wrong_link_is_named():
    _, listener_error = run_pair(LinkAuth(KEY, IDENTITY, 2, 3), LinkAuth(KEY, IDENTITY, 1, 2))
    assert "the peer says it is stage 2 sending to stage 3; this link is stage 1 to stage 2" in str(listener_error)


def test_a_silent_close_is_a_probe_and_a_truncated_hello_is_not():
    a, b = socket.socketpair()
    a.close()
    with pytest.raises(ProbeClosed):
        listen_side(b, LinkAuth(KEY, IDENTITY, 1, 2), 1.0)
    a, b = socket.socketpair()
    a.sendall(HELLO.pack(b"DNNH", 1, 1, 2, b"n" * 32)[:10])
    a.close()
    with pytest.raises(HandshakeError, match="closed during the handshake after 10 of 41 bytes"):
        listen_side(b, LinkAuth(KEY, IDENTITY, 1, 2), 1.0)


def test_a_trickler_is_dropped_at_the_deadline_not_per_byte():
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                a.send(b"D")
            except OSError:
                return
            time.sleep(0.1)

    thread = threading.Thread(target=trickle)
    thread.start()
    began = time.monotonic()
    with pytest.raises(HandshakeError, match="handshake not finished by its deadline"):
        listen_side(b, LinkAuth(KEY, IDENTITY, 1, 2), 0.8)
    assert 0.7 < time.monotonic() - began < 2.0
    stop.set()
    thread.join()
    a.close()
    b.close()
