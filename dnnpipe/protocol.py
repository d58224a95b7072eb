"""The tensor wire format between stages (docs/protocol.md): a pure codec, frames to bytes and back.

Frame = header (28 bytes) + descriptor block + raw tensor bytes, all integers big-endian:

    header:      magic "DNNP" | version u8 | kind u8 | tensor count u16 | sequence u64 | origin ns u64 |
                 descriptor block length u32
    descriptor:  per tensor: name length u16 | name UTF-8 | dtype code u8 | ndim u8 | dims u32 x ndim |
                 byte length u64
    payload:     the tensors' raw bytes (C order), in descriptor order

An ERROR frame carries its UTF-8 message as the descriptor block; END carries nothing. NEXT ends one plan
generation's stream on a link that then carries the next one's (a device agent's link that stays across a
switch): like END, with the generation the link continues as in the origin field. Every field of
an incoming frame is checked against the manifest's specs before any payload byte is read.

Nothing here touches a socket: dnnpipe.frameio sends and receives frames on connected (TCP or TLS) sockets
with this codec, so every check can be tested on bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

import numpy as np

from .errors import DnnpipeError
from .manifest import TensorSpec

MAGIC = b"DNNP"
VERSION = 1
HEADER = struct.Struct("!4sBBHQQI")
# Byte offsets in the header: [0, STAMP_OFFSET) is fixed for a hop's DATA frames (magic, version, kind, tensor
# count); sequence and origin ns follow; the descriptor block length sits at BLOCK_LENGTH_OFFSET.
STAMP_OFFSET = 8
STAMP = struct.Struct("!QQ")  # sequence and origin ns
BLOCK_LENGTH_OFFSET = STAMP_OFFSET + STAMP.size
MAX_DESCRIPTOR_BYTES = 1 << 16
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
          "uint64", "bool")
DTYPE_CODE = {name: code for code, name in enumerate(DTYPES, 1)}


class Kind(IntEnum):
    DATA = 1
    END = 2
    ERROR = 3
    NEXT = 4  # end of this generation's stream; the link continues as generation `origin_ns`


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


def encode_frame(kind: Kind, sequence: int, origin_ns: int, specs: Sequence[TensorSpec] = (),
                 tensors: Sequence[np.ndarray] = (), message: str = "") -> bytes:
    """A whole frame as bytes (FrameWriter sends the same bytes without joining them)."""
    head = encode_header(kind, sequence, origin_ns, specs if kind == Kind.DATA else (), message)
    return head + b"".join(np.ascontiguousarray(tensor).tobytes() for tensor in tensors)


def _descriptor(spec: TensorSpec) -> bytes:
    name = spec.name.encode()
    return (struct.pack("!H", len(name)) + name + struct.pack("!BB", DTYPE_CODE[spec.dtype], len(spec.shape))
            + struct.pack(f"!{len(spec.shape)}I", *spec.shape) + struct.pack("!Q", spec.nbytes))


def decode_header(data: bytes | bytearray | memoryview, peer: str) -> tuple[Kind, int, int, int, int]:
    """(kind, tensor count, sequence, origin ns, descriptor length) of a header, checked."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"{peer}: truncated frame: {len(data)} of {HEADER.size} header bytes")
    magic, version, code, count, sequence, origin_ns, block = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"{peer}: bad magic {magic!r}, expected {MAGIC!r} (not a DNNPipe stage?)")
    if version != VERSION:
        raise ProtocolError(f"{peer}: protocol version {version}, this stage speaks {VERSION}")
    try:
        kind = Kind(code)
    except ValueError:
        raise ProtocolError(f"{peer}: unknown message kind {code}") from None
    if block > MAX_DESCRIPTOR_BYTES:
        raise ProtocolError(f"{peer}: descriptor block of {block} bytes exceeds {MAX_DESCRIPTOR_BYTES}")
    return kind, count, sequence, origin_ns, block


def check_block(kind: Kind, count: int, block: bytes | bytearray | memoryview, specs: Sequence[TensorSpec],
                peer: str) -> None:
    """A decoded header's block: an ERROR frame raises the peer's message, DATA descriptors must be the
    manifest's, END carries nothing."""
    if kind == Kind.ERROR:
        raise PeerError(bytes(block).decode(errors="replace"))
    if kind in (Kind.END, Kind.NEXT):
        if count or len(block):
            raise ProtocolError(f"{peer}: end-of-stream frame announces {count} tensors and {len(block)} "
                                f"descriptor bytes, expected none")
        return
    check_descriptors(block, count, specs, peer)

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


def decode_frame(data: bytes | bytearray | memoryview, specs: Sequence[TensorSpec], expected_sequence: int,
                 peer: str) -> tuple[Frame, int]:
    """The frame at the start of `data`, checked as FrameReader checks it, and the bytes it took.

    An ERROR frame raises PeerError with the peer's message; everything else a peer can send that is not
    the next frame of this hop raises ProtocolError, naming the peer.
    """
    view = memoryview(data).cast("B")
    kind, count, sequence, origin_ns, length = decode_header(view, peer)
    end = HEADER.size + length
    if len(view) < end:
        raise ProtocolError(f"{peer}: truncated frame: {len(view)} of {end} header and descriptor bytes")
    check_block(kind, count, view[HEADER.size:end], specs, peer)
    check_sequence(sequence, expected_sequence, peer)
    if kind in (Kind.END, Kind.NEXT):
        return Frame(kind, sequence, origin_ns, []), end
    total = end + sum(spec.nbytes for spec in specs)
    if len(view) < total:
        raise ProtocolError(f"{peer}: truncated frame: {len(view)} of {total} bytes")
    tensors = []
    for spec in specs:
        tensors.append(np.frombuffer(view[end:end + spec.nbytes], spec.dtype).reshape(spec.shape).copy())
        end += spec.nbytes
    return Frame(kind, sequence, origin_ns, tensors), end


def check_sequence(sequence: int, expected: int, peer: str) -> None:
    if sequence != expected:
        raise ProtocolError(f"{peer}: sequence {sequence} where {expected} was expected (frames lost or reordered)")
