"""Mutual challenge-response on a fresh link, before any frame is read (docs/security.md).

Both ends prove they hold the pipeline key with HMAC-SHA256 over two fresh nonces, the manifest's identity
and both ends' stage numbers, so a frame is accepted only from the stage that should send it, for this
very manifest, on this connection (a recorded handshake cannot be replayed: the other side's nonce is new).

    connector -> listener   HELLO   "DNNH" | version u8 | from stage u16 | to stage u16 | nonce_c (32)
    listener  -> connector  REPLY   nonce_l (32) | HMAC(key, "listener"  | identity | from | to | nonce_c | nonce_l)
    connector -> listener   FINISH  HMAC(key, "connector" | identity | from | to | nonce_c | nonce_l)

The whole exchange has one deadline; any failure closes the link.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
import time
from dataclasses import dataclass

from ..errors import DnnpipeError

MAGIC = b"DNNH"
VERSION = 1
HELLO = struct.Struct("!4sBHH32s")
NONCE = 32
MAC = 32
HANDSHAKE_SECONDS = 5.0  # the whole exchange; a peer that trickles bytes is dropped at this deadline


class HandshakeError(DnnpipeError):
    """The peer did not prove it holds the pipeline key for this manifest and link."""


class ProbeClosed(HandshakeError):
    """The peer closed before saying anything: a readiness probe, not an attack."""


@dataclass(frozen=True)
class LinkAuth:
    """What both ends of one link must agree on: the key, the manifest, and who sends to whom."""

    key: bytes
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


def listen_side(sock: socket.socket, auth: LinkAuth, seconds: float = HANDSHAKE_SECONDS) -> None:
    """The receiving end of a link, right after accept(); raises ProbeClosed for a silent close."""
    deadline = time.monotonic() + seconds
    magic, version, sender, receiver, nonce_c = HELLO.unpack(_receive(sock, HELLO.size, deadline, first=True))
    if magic != MAGIC:
        raise HandshakeError(f"not a DNNPipe handshake (starts with {magic!r}; an unauthenticated peer?)")
    if version != VERSION:
        raise HandshakeError(f"handshake version {version}, expected {VERSION}")
    if (sender, receiver) != (auth.sender, auth.receiver):
        raise HandshakeError(f"the peer says it is stage {sender} sending to stage {receiver}; this link is "
                             f"stage {auth.sender} to stage {auth.receiver}")
    nonce_l = secrets.token_bytes(NONCE)
    _send(sock, nonce_l + auth.mac(b"listener", nonce_c, nonce_l), deadline)
    if not hmac.compare_digest(_receive(sock, MAC, deadline), auth.mac(b"connector", nonce_c, nonce_l)):
        raise HandshakeError("the peer failed the handshake: it holds another pipeline key or another manifest")
