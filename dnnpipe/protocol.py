"""The tensor wire format between stages (docs/protocol.md): one TCP connection per hop.

Frame = header (28 bytes) + descriptor block + raw tensor bytes, all integers big-endian:

    header:      magic "DNNP" | version u8 | kind u8 | tensor count u16 | sequence u64 | origin ns u64 |
                 descriptor block length u32
    descriptor:  per tensor: name length u16 | name UTF-8 | dtype code u8 | ndim u8 | dims u32 x ndim |
                 byte length u64
    payload:     the tensors' raw bytes (C order), in descriptor order

An ERROR frame carries its UTF-8 message as the descriptor block; END carries nothing. Every field of
an incoming frame is checked against the manifest's specs before any payload byte is read.

The fast path (issue 19): a hop's DATA descriptors are fixed by the manifest, so FrameWriter encodes
them once per connection and FrameReader checks them with one byte comparison, parsing field by
field only to name a difference. A frame leaves in one sendmsg call and its header and descriptors
arrive in one recv, on non-blocking sockets whose waits are bounded by one deadline per whole frame.
Frame I/O starts on a connected socket: connection set-up (and any handshake) happens before.
On a TLS socket (--tls), which has neither sendmsg nor recvmsg_into, a frame leaves as one SSL write
per buffer and arrives by recv_into, with the same checks and deadlines.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Sequence

import numpy as np

from .errors import DnnpipeError
from .manifest import TensorSpec

MAGIC = b"DNNP"
VERSION = 1
HEADER = struct.Struct("!4sBBHQQI")
STAMP = struct.Struct("!QQ")  # sequence and origin ns, at offset 8 of the header
MAX_DESCRIPTOR_BYTES = 1 << 16
IOV_LIMIT = 512  # buffers per sendmsg/recvmsg_into call, under Linux's IOV_MAX of 1024
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
          "uint64", "bool")
DTYPE_CODE = {name: code for code, name in enumerate(DTYPES, 1)}


class Kind(IntEnum):
    DATA = 1
    END = 2
    ERROR = 3


class ProtocolError(DnnpipeError):
    """A frame broke the protocol or disagreed with the manifest; the message names the peer."""


class PeerError(DnnpipeError):
    """The upstream stage reported an error and stopped; its message is passed on."""


@dataclass
class Frame:
    kind: Kind
    sequence: int
    origin_ns: int  # when the first stage read this input, for end-to-end latency
    tensors: list[np.ndarray]
    message: str = ""


def encode_descriptors(specs: Sequence[TensorSpec]) -> bytes:
    """The descriptor block of a DATA frame carrying `specs`."""
    return b"".join(_descriptor(spec) for spec in specs)


def encode_header(kind: Kind, sequence: int, origin_ns: int, specs: Sequence[TensorSpec] = (),
                  message: str = "") -> bytes:
    """Header and descriptor block of a frame (its payload is the tensors' bytes, sent after it)."""
    if kind == Kind.ERROR:
        block = message.encode()[:MAX_DESCRIPTOR_BYTES]
    else:
        block = encode_descriptors(specs)
    if len(block) > MAX_DESCRIPTOR_BYTES:
        raise ProtocolError(f"descriptor block of {len(block)} bytes exceeds {MAX_DESCRIPTOR_BYTES} "
                            f"({len(specs)} tensors)")
    return HEADER.pack(MAGIC, VERSION, kind, len(specs), sequence, origin_ns, len(block)) + block


def _descriptor(spec: TensorSpec) -> bytes:
    name = spec.name.encode()
    return (struct.pack("!H", len(name)) + name + struct.pack("!BB", DTYPE_CODE[spec.dtype], len(spec.shape))
            + struct.pack(f"!{len(spec.shape)}I", *spec.shape) + struct.pack("!Q", spec.nbytes))


def decode_header(data: bytes | bytearray | memoryview, peer: str) -> tuple[Kind, int, int, int, int]:
    """(kind, tensor count, sequence, origin ns, descriptor length) of a header, checked."""
    magic, version, kind, count, sequence, origin_ns, block = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"{peer}: bad magic {magic!r}, expected {MAGIC!r} (not a DNNPipe stage?)")
    if version != VERSION:
        raise ProtocolError(f"{peer}: protocol version {version}, this stage speaks {VERSION}")
    if kind not in Kind._value2member_map_:
        raise ProtocolError(f"{peer}: unknown message kind {kind}")
    if block > MAX_DESCRIPTOR_BYTES:
        raise ProtocolError(f"{peer}: descriptor block of {block} bytes exceeds {MAX_DESCRIPTOR_BYTES}")
    return Kind(kind), count, sequence, origin_ns, block


def check_descriptors(block: bytes | bytearray | memoryview, count: int, specs: Sequence[TensorSpec],
                      peer: str) -> None:
    """The descriptors must name the expected tensors, in order, with the manifest's dtype and shape."""
    if count != len(specs):
        raise ProtocolError(f"{peer}: frame has {count} tensors, expected {len(specs)} "
                            f"({', '.join(s.name for s in specs)})")
    offset = 0
    try:
        for spec in specs:
            (length,) = struct.unpack_from("!H", block, offset)
            if offset + 2 + length > len(block):
                raise struct.error
            name = bytes(block[offset + 2:offset + 2 + length]).decode(errors="replace")
            offset += 2 + length
            code, ndim = struct.unpack_from("!BB", block, offset)
            shape = struct.unpack_from(f"!{ndim}I", block, offset + 2)
            (nbytes,) = struct.unpack_from("!Q", block, offset + 2 + 4 * ndim)
            offset += 2 + 4 * ndim + 8
            if name != spec.name:
                raise ProtocolError(f"{peer}: got tensor {name!r} where {spec.name!r} was expected")
            if not 1 <= code <= len(DTYPES):
                raise ProtocolError(f"{peer}: tensor {name!r} has unknown dtype code {code}")
            if DTYPES[code - 1] != spec.dtype or tuple(shape) != spec.shape:
                raise ProtocolError(f"{peer}: tensor {name!r} is {DTYPES[code - 1]}{list(shape)}, the manifest "
                                    f"says {spec.dtype}{list(spec.shape)}")
            if nbytes != spec.nbytes:
                raise ProtocolError(f"{peer}: tensor {name!r} announces {nbytes} bytes, the manifest says "
                                    f"{spec.nbytes}")
    except struct.error:
        raise ProtocolError(f"{peer}: descriptor block ends early ({len(block)} bytes)") from None
    if offset != len(block):
        raise ProtocolError(f"{peer}: {len(block) - offset} unexpected bytes after the descriptors")
    if bytes(block) != encode_descriptors(specs):  # e.g. a name in invalid UTF-8 that decodes like the manifest's
        raise ProtocolError(f"{peer}: descriptor block differs from the manifest's encoding")


def _payload(tensors: Sequence[np.ndarray]) -> list[memoryview]:
    return [np.ascontiguousarray(tensor).data.cast("B") for tensor in tensors]


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first n bytes from a scatter-gather list after a partial send or receive."""
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
    if n:
        views[0] = views[0][n:]


def _send_views(sock: socket.socket, views: list[memoryview], waiter: Optional[_Waiter] = None) -> None:
    """Every byte of `views`, one sendmsg call per batch the kernel takes (one per frame unless buffers fill).

    A TLS socket writes one view at a time: OpenSSL takes a whole view or, when the socket buffer is full,
    asks to be called again with the same view once the socket is ready (never half of one)."""
    tls = isinstance(sock, ssl.SSLSocket)
    while views:
        try:
            sent = sock.send(views[0]) if tls else sock.sendmsg(views[:IOV_LIMIT])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError) as e:
            if waiter is None:
                raise
            waiter.wait(select.POLLIN if isinstance(e, ssl.SSLWantReadError) else None)
            continue
        _advance(views, sent)


def send_frame(sock: socket.socket, kind: Kind, sequence: int, origin_ns: int,
               specs: Sequence[TensorSpec] = (), tensors: Sequence[np.ndarray] = (), message: str = "") -> None:
    """One frame on a blocking socket or one with a timeout (the timeout bounds each call's progress), in one
    sendmsg call where the kernel takes it all. Encodes the descriptors every time: a connection that sends
    many frames uses FrameWriter."""
    head = encode_header(kind, sequence, origin_ns, specs if kind == Kind.DATA else (), message)
    _send_views(sock, [memoryview(head), *_payload(tensors)])


class _Waiter:
    """Waits for a non-blocking socket to become readable or writable, up to the current frame's deadline."""

    def __init__(self, sock: socket.socket, events: int, timeout: Optional[float]):
        self.timeout = timeout
        self.deadline: Optional[float] = None
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, events)

    def start(self) -> None:
        """A new frame: its deadline is the timeout from now."""
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout

    def wait(self, events: Optional[int] = None) -> None:
        """Until the socket is ready for its usual direction, or for `events` (TLS may need the other one)."""
        poll = self._poll
        if events is not None:
            poll = select.poll()
            poll.register(self._sock, events)
        if self.deadline is None:
            poll.poll()
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not poll.poll(math.ceil(remaining * 1000)):
            raise TimeoutError


class FrameWriter:
    """Sends one connection's frames to a downstream peer; owns the socket's sending side from here on.

    Header and descriptors of DATA frames are encoded once, at construction; a frame patches in its sequence
    and origin and leaves in one sendmsg call with its tensors' own buffers (no copy). `timeout` bounds each
    whole frame: a peer that does not take a frame within it is an error, however slowly it reads.
    """

    def __init__(self, sock: socket.socket, specs: Sequence[TensorSpec], peer: str, timeout: Optional[float]):
        self.sock, self.specs, self.peer = sock, list(specs), peer
        sock.setblocking(False)
        self._waiter = _Waiter(sock, select.POLLOUT, timeout)
        self._head = bytearray(encode_header(Kind.DATA, 0, 0, self.specs))
        self._head_view = memoryview(self._head)
        self._nbytes = [spec.nbytes for spec in self.specs]

    def send(self, sequence: int, origin_ns: int, tensors: Sequence[np.ndarray]) -> None:
        """A DATA frame; `tensors` in manifest order with the manifest's sizes."""
        views = _payload(tensors)
        if [len(view) for view in views] != self._nbytes:
            raise ProtocolError(f"tensors of {[len(view) for view in views]} bytes do not match the manifest's "
                                f"{self._nbytes} ({', '.join(spec.name for spec in self.specs)})")
        STAMP.pack_into(self._head, 8, sequence, origin_ns)
        self._send([self._head_view, *views])

    def end(self, sequence: int) -> None:
        """End of stream; `sequence` is the number of DATA frames sent."""
        self._send([memoryview(encode_header(Kind.END, sequence, 0))])

    def error(self, sequence: int, message: str) -> None:
        """Tell the peer this stage failed, with the one-line message it should pass on."""
        self._send([memoryview(encode_header(Kind.ERROR, sequence, 0, message=message))])

    def _send(self, views: list[memoryview]) -> None:
        self._waiter.start()
        try:
            _send_views(self.sock, views, self._waiter)
        except TimeoutError:
            raise ProtocolError(f"cannot send to {self.peer}: frame not taken within {self._waiter.timeout:g} s "
                                f"(--timeout)") from None
        except OSError as e:
            raise ProtocolError(f"cannot send to {self.peer}: {e.strerror or e}") from None


class FrameReader:
    """Reads frames from one upstream peer into caller-provided buffers, checking every field; owns the socket's
    receiving side from here on. `timeout` bounds each whole frame, from when read() starts waiting for it."""

    def __init__(self, sock: socket.socket, specs: Sequence[TensorSpec], peer: str, timeout: Optional[float]):
        self.sock, self.specs, self.peer = sock, list(specs), peer
        self.timeout = timeout
        sock.setblocking(False)
        self._waiter = _Waiter(sock, select.POLLIN, timeout)
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.expected_sequence = 0
        expected = encode_header(Kind.DATA, 0, 0, self.specs)
        self._expected_kind = expected[:8]  # magic, version, kind DATA, tensor count
        self._expected_block = expected[24:]  # block length and descriptors
        self._head_size = len(expected)
        self._nbytes = [spec.nbytes for spec in self.specs]
        self._head = bytearray(HEADER.size + MAX_DESCRIPTOR_BYTES)
        self._head_view = memoryview(self._head)
        self._ended = False

    def read(self, buffers: Sequence[np.ndarray]) -> Frame:
        """The next frame; DATA tensors land in `buffers` (one per spec, right shape and dtype)."""
        if self._ended:
            raise ProtocolError(f"{self.peer}: read after end-of-stream")
        self._waiter.start()
        head = self._head
        size = self._head_size
        got = self._receive([self._head_view[:size]], HEADER.size, True)
        if got < size and head[:8] == self._expected_kind and head[24:28] == self._expected_block[:4]:
            got += self._receive([self._head_view[got:size]], size - got, False)  # a DATA frame's head in pieces
        if got < size or head[:8] != self._expected_kind or head[24:size] != self._expected_block:
            return self._unexpected(got)
        sequence, origin_ns = STAMP.unpack_from(head, 8)
        self._check_sequence(sequence)
        views = [buffer.data.cast("B") for buffer in buffers]
        if [len(view) for view in views] != self._nbytes:
            raise ValueError(f"buffers of {[len(view) for view in views]} bytes for tensors of {self._nbytes}")
        self._receive(views, sum(self._nbytes), False)
        self.expected_sequence += 1
        return Frame(Kind.DATA, sequence, origin_ns, list(buffers))

    def _unexpected(self, got: int) -> Frame:
        """The slow path, for a frame that is not the manifest's DATA frame: an END or ERROR frame, or a broken
        one (then name the first field that differs)."""
        kind, count, sequence, origin_ns, length = decode_header(self._head, self.peer)
        end = HEADER.size + length
        if got < end:
            self._receive([self._head_view[got:end]], end - got, False)
        block = self._head_view[HEADER.size:end]
        if kind == Kind.ERROR:
            self._ended = True
            raise PeerError(bytes(block).decode(errors="replace"))
        self._check_sequence(sequence)
        if kind == Kind.END:
            self._ended = True
            if got > end:
                raise ProtocolError(f"{self.peer}: {got - end} unexpected bytes after end-of-stream")
            return Frame(kind, sequence, origin_ns, [])
        check_descriptors(block, count, self.specs, self.peer)
        raise AssertionError(f"{self.peer}: descriptors equal to the manifest's missed the fast path")

    def _check_sequence(self, sequence: int) -> None:
        if sequence != self.expected_sequence:
            raise ProtocolError(f"{self.peer}: sequence {sequence} where {self.expected_sequence} was expected "
                                f"(frames lost or reordered)")

    def _receive(self, views: list[memoryview], minimum: int, at_boundary: bool) -> int:
        """Receive into `views` until at least `minimum` bytes arrived (never past their end); the count."""
        total, got = sum(len(view) for view in views), 0
        while got < minimum:
            try:
                if len(views) == 1 or self._tls:
                    n = self.sock.recv_into(views[0])
                else:
                    n = self.sock.recvmsg_into(views[:IOV_LIMIT])[0]
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():  # decrypted, unseen by poll
                    continue
                self._wait(at_boundary and got == 0, select.POLLOUT if isinstance(e, ssl.SSLWantWriteError) else None)
                continue
            except OSError as e:
                raise ProtocolError(f"{self.peer}: connection lost ({e.strerror or e})") from None
            if n == 0:
                if at_boundary and got == 0:
                    raise ProtocolError(f"{self.peer}: connection closed before end-of-stream "
                                        f"(upstream stage died?)")
                raise ProtocolError(f"{self.peer}: truncated frame: connection closed after {got} of "
                                    f"{total if minimum == total else minimum} bytes")
            got += n
            _advance(views, n)
        return got

    def _wait(self, idle: bool, events: Optional[int] = None) -> None:
        try:
            self._waiter.wait(events)
        except TimeoutError:
            if idle:
                raise ProtocolError(f"{self.peer}: no data for {self.timeout:g} s (--timeout)") from None
            raise ProtocolError(f"{self.peer}: frame incomplete after {self.timeout:g} s (--timeout): the peer "
                                f"sends too slowly or stalled") from None
