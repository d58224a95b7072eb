"""The link handshake on real socket pairs: both ends must hold the key, the manifest and the link's stages."""

import socket
import threading
import time

import pytest

from dnnpipe.keygen import create_certificate
from dnnpipe.pipeline_key import tls_context
from dnnpipe.runtime.handshake import (HELLO, HandshakeError, LinkAuth, ProbeClosed, connect_side, listen_side,
                                       manifest_identity, tls_wrap)

KEY = bytes(range(32))
IDENTITY = manifest_identity(b'{"format": "dnnpipe-manifest"}')


def run_ends(connector, listener):
    """Both ends of a fresh link at once (each a function of its socket); the outcome of each."""
    a, b = socket.socketpair()
    outcome: dict[str, object] = {}

    def side(name, function, sock):
        try:
            function(sock)
            outcome[name] = None
        except HandshakeError as e:
            outcome[name] = e
            sock.close()

    threads = [threading.Thread(target=side, args=("connector", connector, a)),
               threading.Thread(target=side, args=("listener", listener, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    a.close()
    b.close()
    return outcome["connector"], outcome["listener"]


def run_pair(connector: LinkAuth, listener: LinkAuth, seconds: float = 2.0):
    """Both sides at once; the outcome of each, None for success or the exception."""
    return run_ends(lambda sock: connect_side(sock, connector, seconds),
                    lambda sock: listen_side(sock, listener, seconds))


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
    assert 0.7 < time.monotonic() - began < 3.5  # a deadline per byte: over 4 s
    stop.set()
    thread.join()
    a.close()
    b.close()


# --- --tls: a mutual TLS handshake pinning pipeline.crt first, then the same key handshake inside it

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """The pipeline's certificate folder, and another partition's."""
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    create_certificate(ours)
    create_certificate(theirs)
    return ours, theirs


def tls_end(folder, server_side, then=None, seconds=2.0):
    auth = LinkAuth(KEY, IDENTITY, 1, 2)

    def end(sock):
        tls = tls_wrap(sock, tls_context(folder, server_side), server_side, seconds)
        (listen_side if server_side else connect_side)(tls, auth, seconds)
        tls.close()

    return end


def test_tls_with_the_same_certificate_passes_and_carries_the_key_handshake(certificates):
    ours, _ = certificates
    assert run_ends(tls_end(ours, False), tls_end(ours, True)) == (None, None)


def test_another_certificate_fails_on_both_ends(certificates):
    ours, theirs = certificates
    connector_error, listener_error = run_ends(tls_end(theirs, False), tls_end(ours, True))
    assert isinstance(connector_error, HandshakeError), connector_error
    assert "failed the TLS handshake" in str(listener_error), listener_error


def test_a_plain_peer_fails_the_tls_handshake(certificates):
    ours, _ = certificates
    connector_error, listener_error = run_ends(lambda s: connect_side(s, LinkAuth(KEY, IDENTITY, 1, 2), 2.0),
                                               tls_end(ours, True))
    assert isinstance(connector_error, HandshakeError), connector_error
    assert "failed the TLS handshake" in str(listener_error) and "with --no-tls" in str(listener_error)


def test_tls_probe_and_trickler(certificates):
    ours, _ = certificates
    a, b = socket.socketpair()
    a.close()
    with pytest.raises(ProbeClosed):
        tls_wrap(b, tls_context(ours, True), True, 1.0)
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle():  # the start of a TLS record, a byte at a time
        for byte in b"\x16\x03\x01\x02\x00" + b"\x01" * 100:
            if stop.wait(0.1):
                return
            try:
                a.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    began = time.monotonic()
    with pytest.raises(HandshakeError, match="TLS handshake not finished by its deadline"):
        tls_wrap(b, tls_context(ours, True), True, 0.8)
    assert 0.7 < time.monotonic() - began < 3.5  # a deadline per byte: over 4 s
    stop.set()
    thread.join()
    a.close()
    b.close()


def test_the_key_is_in_no_repr_or_str():
    auth = LinkAuth(KEY, IDENTITY, 1, 2)
    for text in (repr(auth), str(auth), repr([auth]), f"{auth}", repr({"auth": auth})):
        assert KEY.hex() not in text and repr(KEY) not in text and "key=" not in text, text
    assert "sender=1" in repr(auth) and auth == LinkAuth(KEY, IDENTITY, 1, 2)  # still compared by value
