"""The tensor wire format between stages (docs/protocol.md): one TCP connection per hop.

Frame = header (28 bytes) + descriptor block + raw tensor bytes, all integers big-endian:

    header:      magic "DNNP" | version u8 | kind u8 | tensor count u16 | sequence u64 | origin ns u64 |
                 descriptor block length u32
    descriptor:  per tensor: name length u16 | name UTF-8 | dtype code u8 | ndim u8 | dims u32 x ndim |
                 byte length u64
    payload:     the tensors' raw bytes (C order), in descriptor order

An ERROR frame carries its UTF-8 message as the descriptor block; END carries nothing. Every field of
an incoming frame is checked against the manifest's specs before any payload byte is read.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Sequence

import numpy as np

from .errors import DnnpipeError
from .manifest import TensorSpec

MAGIC = b"DNNP"
VERSION = 1
HEADER = struct.Struct("!4sBBHQQI")
MAX_DESCRIPTOR_BYTES = 1 << 16
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


def encode_header(kind: Kind, sequence: int, origin_ns: int, specs: Sequence[TensorSpec] = (),
                  message: str = "") -> bytes:
    """Header and descriptor block of a frame (its payload is the tensors' bytes, sent after it)."""
    if kind == Kind.ERROR:
        block = message.encode()[:MAX_DESCRIPTOR_BYTES]
    else:
        block = b"".join(_descriptor(spec) for spec in specs)
    return HEADER.pack(MAGIC, VERSION, kind, len(specs), sequence, origin_ns, len(block)) + block


def _descriptor(spec: TensorSpec) -> bytes:
    name = spec.name.encode()
    return (struct.pack("!H", len(name)) + name + struct.pack("!BB", DTYPE_CODE[spec.dtype], len(spec.shape))
            + struct.pack(f"!{len(spec.shape)}I", *spec.shape) + struct.pack("!Q", spec.nbytes))


def decode_header(data: bytes, peer: str) -> tuple[Kind, int, int, int, int]:
    """(kind, tensor count, sequence, origin ns, descriptor length) of a header, checked."""
    magic, version, kind, count, sequence, origin_ns, block = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"{peer}: bad magic {magic!r}, expected {MAGIC!r} (not a DNNPipe stage?)")
    if version != VERSION:
        raise ProtocolError(f"{peer}: protocol version {version}, this stage speaks {VERSION}")
    if kind not in Kind._value2member_map_:
        raise ProtocolError(f"{peer}: unknown message kind {kind}")
    if block > MAX_DESCRIPTOR_BYTES:
        raise ProtocolError(f"{peer}: descriptor block of {block} bytes exceeds {MAX_DESCRIPTOR_BYTES}")
    return Kind(kind), count, sequence, origin_ns, block


def check_descriptors(block: bytes | memoryview, count: int, specs: Sequence[TensorSpec], peer: str) -> None:
    """The descriptors must name the expected tensors, in order, with the manifest's dtype and shape."""
    if count != len(specs):
        raise ProtocolError(f"{peer}: frame has {count} tensors, expected {len(specs)} "
                            f"({', '.join(s.name for s in specs)})")
    offset = 0
    try:
        for spec in specs:
            (length,) = struct.unpack_from("!H", block, offset)
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


def send_frame(sock: socket.socket, kind: Kind, sequence: int, origin_ns: int,
               specs: Sequence[TensorSpec] = (), tensors: Sequence[np.ndarray] = (), message: str = "") -> None:
    sock.sendall(encode_header(kind, sequence, origin_ns, specs if kind == Kind.DATA else (), message))
    for tensor in tensors:
        sock.sendall(np.ascontiguousarray(tensor).data.cast("B"))


class FrameReader:
    """Reads frames from one upstream peer into caller-provided buffers, checking every field."""

    def __init__(self, sock: socket.socket, specs: Sequence[TensorSpec], peer: str, timeout: Optional[float]):
        self.sock, self.specs, self.peer = sock, list(specs), peer
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.expected_sequence = 0
        self._header = bytearray(HEADER.size)
        self._block = bytearray(MAX_DESCRIPTOR_BYTES)

    def read(self, buffers: Sequence[np.ndarray]) -> Frame:
        """The next frame; DATA tensors land in `buffers` (one per spec, right shape and dtype)."""
        self._fill(memoryview(self._header), at_boundary=True)
        kind, count, sequence, origin_ns, length = decode_header(bytes(self._header), self.peer)
        block = memoryview(self._block)[:length]
        self._fill(block)
        if kind == Kind.ERROR:
            raise PeerError(bytes(block).decode(errors="replace"))
        if sequence != self.expected_sequence:
            raise ProtocolError(f"{self.peer}: sequence {sequence} where {self.expected_sequence} was expected "
                                f"(frames lost or reordered)")
        if kind == Kind.END:
            return Frame(kind, sequence, origin_ns, [])
        check_descriptors(block, count, self.specs, self.peer)
        for buffer in buffers:
            self._fill(buffer.data.cast("B"))
        self.expected_sequence += 1
        return Frame(kind, sequence, origin_ns, list(buffers))

    def _fill(self, view: memoryview, at_boundary: bool = False) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except socket.timeout:
                raise ProtocolError(f"{self.peer}: no data for {self.timeout:g} s (--timeout)") from None
            except OSError as e:
                raise ProtocolError(f"{self.peer}: connection lost ({e.strerror or e})") from None
            if n == 0:
                if at_boundary and got == 0:
                    raise ProtocolError(f"{self.peer}: connection closed before end-of-stream "
                                        f"(upstream stage died?)")
                raise ProtocolError(f"{self.peer}: truncated frame: connection closed after {got} of "
                                    f"{len(view)} bytes")
            got += n
