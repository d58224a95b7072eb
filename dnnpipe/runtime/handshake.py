"""Mutual challenge-response on a fresh link, before any frame is read (docs/security.md).

Both ends prove they hold the pipeline key with HMAC-SHA256 over two fresh nonces, the manifest's identity
and both ends' stage numbers, so a frame is accepted only from the stage that should send it, for this
very manifest, on this connection (a recorded handshake cannot be replayed: the other side's nonce is new).

    connector -> listener   HELLO   "DNNH" | version u8 | from stage u16 | to stage u16 | nonce_c (32)
    listener  -> connector  REPLY   nonce_l (32) | HMAC(key, "listener"  | identity | from | to | nonce_c | nonce_l)
    connector -> listener   FINISH  HMAC(key, "connector" | identity | from | to | nonce_c | nonce_l)

The whole exchange has one deadline; any failure closes the link. A readiness probe (the deployer's --launch)
sends a HELLO from stage PROBE to the stage it expects: the listener answers with its REPLY, proving it holds the
key and is that stage of this manifest, and drops the connection (no FINISH, no link; the MAC names PROBE as the
sender, so it proves nothing on any real link). By default (not --no-tls), `tls_wrap` first runs a mutual TLS
handshake (both ends pin the pipeline certificate) and this exchange runs inside it, unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DnnpipeError

MAGIC = b"DNNH"
VERSION = 1
HELLO = struct.Struct("!4sBHH32s")
NONCE = 32
MAC = 32
HANDSHAKE_SECONDS = 5.0  # the whole exchange; a peer that trickles bytes is dropped at this deadline
PROBE = 0xFFFF  # the sender a readiness probe names: no stage has this number


class HandshakeError(DnnpipeError):
    """The peer did not prove it holds the pipeline key for this manifest and link."""


class ProbeClosed(HandshakeError):
    """The peer closed before saying anything: a readiness probe, not an attack."""


@dataclass(frozen=True)
class LinkAuth:
    """What both ends of one link must agree on: the key, the manifest, and who sends to whom."""

    key: bytes = field(repr=False)  # never in a repr, a log or a traceback's locals summary
    identity: bytes  # sha256 of manifest.json
    sender: int  # the stage that sends frames on this link (0: the controller's source)
    receiver: int  # the stage that receives them

    def mac(self, label: bytes, nonce_c: bytes, nonce_l: bytes) -> bytes:
        message = b"|".join([label, self.identity, struct.pack("!HH", self.sender, self.receiver), nonce_c,
                             nonce_l])
        return hmac.new(self.key, message, hashlib.sha256).digest()


def manifest_identity(manifest_bytes: bytes) -> bytes:
    return hashlib.sha256(manifest_bytes).digest()


def _receive(sock: socket.socket, size: int, deadline: float, first: bool = False) -> bytes:
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeError("handshake not finished by its deadline (a stalled or trickling peer)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(size - len(data))
        except socket.timeout:
            continue
        except OSError as e:
            raise HandshakeError(f"connection lost during the handshake ({e.strerror or e})") from None
        if not chunk:
            if first and not data:
                raise ProbeClosed("closed before the handshake")
            raise HandshakeError(f"closed during the handshake after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        sock.sendall(data)
    except OSError as e:
        raise HandshakeError(f"cannot complete the handshake ({e.strerror or e or 'timed out'})") from None


def connect_side(sock: socket.socket, auth: LinkAuth, seconds: float = HANDSHAKE_SECONDS) -> None:
    """The sending end of a link, right after connect()."""
    deadline = time.monotonic() + seconds
    nonce_c = secrets.token_bytes(NONCE)
    _send(sock, HELLO.pack(MAGIC, VERSION, auth.sender, auth.receiver, nonce_c), deadline)
    reply = _receive(sock, NONCE + MAC, deadline)
    nonce_l, mac_l = reply[:NONCE], reply[NONCE:]
    if not hmac.compare_digest(mac_l, auth.mac(b"listener", nonce_c, nonce_l)):
        raise HandshakeError("the peer failed the handshake: it holds another pipeline key or another manifest")
    _send(sock, auth.mac(b"connector", nonce_c, nonce_l), deadline)


def probe_side(sock: socket.socket, key: bytes, identity: bytes, stage: int,
               seconds: float = HANDSHAKE_SECONDS) -> None:
    """A readiness probe, right after connect(): returns once the listener proved it is `stage` of this
    manifest holding this key; raises HandshakeError for anything else."""
    deadline = time.monotonic() + seconds
    auth = LinkAuth(key, identity, PROBE, stage)
    nonce_c = secrets.token_bytes(NONCE)
    _send(sock, HELLO.pack(MAGIC, VERSION, PROBE, stage, nonce_c), deadline)
    reply = _receive(sock, NONCE + MAC, deadline)
    if not hmac.compare_digest(reply[NONCE:], auth.mac(b"listener", nonce_c, reply[:NONCE])):
        raise HandshakeError(f"the listener did not prove it is stage {stage} of this pipeline (another pipeline "
                             f"key, manifest or stage)")


def listen_side(sock: socket.socket, auth: LinkAuth, seconds: float = HANDSHAKE_SECONDS) -> None:
    """The receiving end of a link, right after accept(); raises ProbeClosed for a silent close."""
    def expected(sender: int, receiver: int) -> LinkAuth:
        if (sender, receiver) == (PROBE, auth.receiver):  # the deployer's readiness probe: answered, no link
            return LinkAuth(auth.key, auth.identity, PROBE, auth.receiver)
        if (sender, receiver) != (auth.sender, auth.receiver):
            raise HandshakeError(f"the peer says it is stage {sender} sending to stage {receiver}; this link is "
                                 f"stage {auth.sender} to stage {auth.receiver}")
        return auth

    listen_side_for(sock, expected, seconds)


def listen_side_for(sock: socket.socket, auth_for: Callable[[int, int], LinkAuth],
                    seconds: float = HANDSHAKE_SECONDS) -> LinkAuth:
    """listen_side for a listener that takes more than one link (a device agent): `auth_for(sender, receiver)`
    gives the link's LinkAuth from what the HELLO claims, or raises HandshakeError; the proven link's auth."""
    deadline = time.monotonic() + seconds
    magic, version, sender, receiver, nonce_c = HELLO.unpack(_receive(sock, HELLO.size, deadline, first=True))
    if magic.startswith(b"\x16\x03"):
        raise HandshakeError("the peer speaks TLS: it runs with TLS (the default) and this stage with --no-tls")
    if magic != MAGIC:
        raise HandshakeError(f"not a DNNPipe handshake (starts with {magic!r}; an unauthenticated peer?)")
    if version != VERSION:
        raise HandshakeError(f"handshake version {version}, expected {VERSION}")
    auth = auth_for(sender, receiver)
    nonce_l = secrets.token_bytes(NONCE)
    _send(sock, nonce_l + auth.mac(b"listener", nonce_c, nonce_l), deadline)
    if auth.sender == PROBE:  # its MAC names PROBE as the sender, so it proves nothing on any real link
        raise ProbeClosed("an authenticated readiness probe, answered")
    if not hmac.compare_digest(_receive(sock, MAC, deadline), auth.mac(b"connector", nonce_c, nonce_l)):
        raise HandshakeError("the peer failed the handshake: it holds another pipeline key or another manifest")
    return auth


def tls_wrap(sock: socket.socket, context: ssl.SSLContext, server_side: bool,
             seconds: float = HANDSHAKE_SECONDS) -> ssl.SSLSocket:
    """The link inside TLS, after a handshake bounded by one deadline (a trickling peer cannot hold it).

    A listener raises ProbeClosed for a peer that closes before its first byte, like listen_side."""
    deadline = time.monotonic() + seconds
    if server_side:
        _receive_first(sock, deadline)
    tls = context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    tls.setblocking(False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            left = deadline - time.monotonic()
            poll = select.poll()
            poll.register(tls, events)
            if left <= 0 or not poll.poll(int(left * 1000) + 1):
                raise HandshakeError("TLS handshake not finished by its deadline (a stalled or trickling peer)")
    except ssl.SSLError as e:
        tls.close()
        raise HandshakeError(f"failed the TLS handshake ({e.reason or e}; a peer with --no-tls or with another "
                             f"pipeline certificate?)") from None
    except OSError as e:
        tls.close()
        raise HandshakeError(f"connection lost during the TLS handshake ({e.strerror or e}; a peer with --no-tls?)") \
            from None
    except HandshakeError:
        tls.close()
        raise


def _receive_first(sock: socket.socket, deadline: float) -> None:
    """Wait for the peer's first byte without taking it; a close before it is a readiness probe."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except socket.timeout:
        raise HandshakeError("TLS handshake not started by its deadline (a silent peer)") from None
    except OSError as e:
        raise ProbeClosed(f"connection lost before the handshake ({e.strerror or e})") from None
    if not first:
        raise ProbeClosed("closed before the handshake")
