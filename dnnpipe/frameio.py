"""Frames on a connected socket, plain TCP or TLS: sending and receiving with whole-frame deadlines.

The fast path (issue 19): a hop's DATA descriptors are fixed by the manifest, so FrameWriter encodes
them once per connection and FrameReader checks them with one byte comparison, parsing field by
field (dnnpipe.protocol, the codec) only to name a difference. A frame leaves in one sendmsg call and
its header and descriptors arrive in one recv, on non-blocking sockets whose waits are bounded by one
deadline per whole frame. Frame I/O starts on a connected socket: connection set-up (and any handshake)
happens before. On a TLS socket (--tls), which has neither sendmsg nor recvmsg_into, a frame leaves as one
SSL write per buffer and arrives by recv_into, with the same checks and deadlines.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import time
from typing import Optional, Sequence

import numpy as np

from .manifest import TensorSpec
from .protocol import (BLOCK_LENGTH_OFFSET, HEADER, MAX_DESCRIPTOR_BYTES, STAMP, STAMP_OFFSET, Frame, Kind,
                       ProtocolError, check_block, check_sequence, decode_header, encode_header)

IOV_LIMIT = 512  # buffers per sendmsg/recvmsg_into call, under Linux's IOV_MAX of 1024
# While a frame's payload arrives, the reader sleeps until most of what is left is there (SO_RCVLOWAT), not until
# each packet: a 0.6 MB cut over a shaped link woke a stage ~10 times, each a context switch that a board of 0.12
# cores pays 8x. Never more than the bytes still to come: a TLS reader's OpenSSL may hold part of one record.
LOW_WATER_MAX = 256 << 10
TLS_RECORD_SLACK = 32 << 10


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

    def wait(self, events: Optional[int] = None, forever: bool = False) -> None:
        """Until the socket is ready for its usual direction, or for `events` (TLS may need the other one);
        `forever`: no deadline, which then starts when the socket is ready."""
        poll = self._poll
        if events is not None:
            poll = select.poll()
            poll.register(self._sock, events)
        if self.deadline is None or forever:
            poll.poll()
            if forever:
                self.start()
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
        STAMP.pack_into(self._head, STAMP_OFFSET, sequence, origin_ns)
        self._send([self._head_view, *views])

    def end(self, sequence: int) -> None:
        """End of stream; `sequence` is the number of DATA frames sent."""
        self._send([memoryview(encode_header(Kind.END, sequence, 0))])

    def next(self, sequence: int, generation: int) -> None:
        """End of this generation's stream, the link going on as `generation`'s (its next writer takes the
        socket); `sequence` is the number of DATA frames sent."""
        self._send([memoryview(encode_header(Kind.NEXT, sequence, generation))])

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
    receiving side from here on. `timeout` bounds each whole frame, from when read() starts waiting for it; with
    `idle`, waiting for a frame's first byte has no deadline (a device agent between requests: its controller's
    heartbeats, not this link, tell a stalled peer) and the frame's deadline starts with that byte.

    `continues`: a NEXT frame may end the stream (a device agent's link that stays across a switch); read()
    then returns it, `continues` names the generation the link goes on as, and `leftover` holds the bytes read
    past it, which the next generation's reader takes as its `prefix`."""

    def __init__(self, sock: socket.socket, specs: Sequence[TensorSpec], peer: str, timeout: Optional[float],
                 idle: bool = False, continues: bool = False, prefix: bytes = b""):
        self.sock, self.specs, self.peer = sock, list(specs), peer
        self.timeout, self.idle = timeout, idle
        self.may_continue = continues
        self.continues: Optional[int] = None
        self.leftover = b""
        self._prefix = prefix
        sock.setblocking(False)
        self._waiter = _Waiter(sock, select.POLLIN, timeout)
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.expected_sequence = 0
        expected = encode_header(Kind.DATA, 0, 0, self.specs)
        self._expected_kind = expected[:STAMP_OFFSET]  # magic, version, kind DATA, tensor count
        self._expected_block = expected[BLOCK_LENGTH_OFFSET:]  # block length and descriptors
        self._head_size = len(expected)
        self._nbytes = [spec.nbytes for spec in self.specs]
        self._head = bytearray(HEADER.size + MAX_DESCRIPTOR_BYTES)
        self._head_view = memoryview(self._head)
        self._ended = False
        self._low_water = 1  # the socket's SO_RCVLOWAT (the kernel's default: wake on any byte)
        # The mark stays well inside the receive buffer: before Linux 4.18 setting it does not grow the buffer,
        # and a mark above the window the buffer allows would never be reached (no wake-up: a stall).
        try:
            self._low_water_max = max(1, min(LOW_WATER_MAX, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 4))
        except OSError:
            self._low_water_max = 1

    def read(self, buffers: Sequence[np.ndarray]) -> Frame:
        """The next frame; DATA tensors land in `buffers` (one per spec, right shape and dtype)."""
        if self._ended:
            raise ProtocolError(f"{self.peer}: read after end-of-stream")
        self._waiter.start()
        head = self._head
        size = self._head_size
        got = self._receive([self._head_view[:size]], HEADER.size, True)
        prefix, block_length = slice(0, STAMP_OFFSET), slice(BLOCK_LENGTH_OFFSET, HEADER.size)
        if got < size and head[prefix] == self._expected_kind and head[block_length] == self._expected_block[:4]:
            got += self._receive([self._head_view[got:size]], size - got, False)  # a DATA frame's head in pieces
        if got < size or head[prefix] != self._expected_kind or head[BLOCK_LENGTH_OFFSET:size] != self._expected_block:
            return self._unexpected(got)
        sequence, origin_ns = STAMP.unpack_from(head, STAMP_OFFSET)
        self._check_sequence(sequence)
        views = [buffer.data.cast("B") for buffer in buffers]
        if [len(view) for view in views] != self._nbytes:
            raise ValueError(f"buffers of {[len(view) for view in views]} bytes for tensors of {self._nbytes}")
        self._receive(views, sum(self._nbytes), False, whole=True)
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
        if kind != Kind.DATA:
            self._ended = True  # nothing may follow END or ERROR; after NEXT, the next generation's reader reads
        if kind == Kind.NEXT and not self.may_continue:
            raise ProtocolError(f"{self.peer}: the link goes on as generation {origin_ns}, which only a device "
                                f"agent's link does")
        check_block(kind, count, block, self.specs, self.peer)
        self._check_sequence(sequence)
        if kind == Kind.NEXT:  # what was read past it, and what a previous reader handed on and is still unread
            self.continues, self.leftover = origin_ns, bytes(self._head[end:got]) + self._prefix
            self._prefix = b""
            return Frame(kind, sequence, origin_ns, [])
        if kind == Kind.END:
            if got > end or self._prefix:
                raise ProtocolError(f"{self.peer}: {got - end + len(self._prefix)} unexpected bytes after "
                                    f"end-of-stream")
            return Frame(kind, sequence, origin_ns, [])
        # descriptors equal to the manifest's take the fast path; a DATA head that missed it differs somewhere
        raise ProtocolError(f"{self.peer}: DATA frame head differs from the manifest's encoding")

    def _check_sequence(self, sequence: int) -> None:
        check_sequence(sequence, self.expected_sequence, self.peer)

    def _receive(self, views: list[memoryview], minimum: int, at_boundary: bool, whole: bool = False) -> int:
        """Receive into `views` until at least `minimum` bytes arrived (never past their end); the count. `whole`:
        the peer sends all of them at once (a DATA frame's payload), so waits last until most have arrived."""
        try:
            return self._receive_into(views, minimum, at_boundary, whole)
        finally:
            if self._low_water != 1:
                self._set_low_water(1)

    def _set_low_water(self, size: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
            self._low_water = size
        except OSError:  # not a TCP socket (a socket pair in tests) or gone: wake on any byte, as before
            self._low_water = 1

    def _receive_into(self, views: list[memoryview], minimum: int, at_boundary: bool, whole: bool) -> int:
        total, got = sum(len(view) for view in views), self._take_prefix(views)
        while got < minimum:
            try:
                if self._tls:
                    n = self._tls_read(views[0])
                elif len(views) == 1:
                    n = self.sock.recv_into(views[0])
                else:
                    n = self.sock.recvmsg_into(views[:IOV_LIMIT])[0]
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():  # decrypted, unseen by poll
                    continue
                if whole:
                    left = minimum - got - (TLS_RECORD_SLACK if self._tls else 0)
                    if max(1, min(self._low_water_max, left)) != self._low_water:
                        self._set_low_water(max(1, min(self._low_water_max, left)))
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

    def _take_prefix(self, views: list[memoryview]) -> int:
        """Bytes the previous generation's reader took past its NEXT frame come first."""
        taken = 0
        while self._prefix and views:
            n = min(len(views[0]), len(self._prefix))
            views[0][:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            _advance(views, n)
            taken += n
        return taken

    def _tls_read(self, view: memoryview) -> int:
        """Up to len(view) decrypted bytes into view; 0 at the peer's close (as SSLSocket.recv_into says it)."""
        # A TLS frame arrives one record (16 KiB) per read: the SSL object's own read skips SSLSocket.recv_into's
        # two Python layers on each (~35 a frame for a 0.6 MB cut). Looked up on every read, and never on a closed
        # socket: OpenSSL would read the fd number, which a new link may already have been given.
        ssl_object = getattr(self.sock, "_sslobj", None)
        if ssl_object is None or self.sock.fileno() == -1:
            return self.sock.recv_into(view)  # raises on a closed socket
        try:
            return ssl_object.read(len(view), view)
        except ssl.SSLEOFError:
            return 0

    def _wait(self, idle: bool, events: Optional[int] = None) -> None:
        try:
            self._waiter.wait(events, forever=idle and self.idle)
        except TimeoutError:
            if idle:
                raise ProtocolError(f"{self.peer}: no data for {self.timeout:g} s (--timeout)") from None
            raise ProtocolError(f"{self.peer}: frame incomplete after {self.timeout:g} s (--timeout): the peer "
                                f"sends too slowly or stalled") from None
