"""The wire codec on bytes alone: layout, round trips, every check, and arbitrary bytes fuzzed at the decoder."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnnpipe.manifest import TensorSpec
from dnnpipe.protocol import (BLOCK_LENGTH_OFFSET, HEADER, MAGIC, MAX_DESCRIPTOR_BYTES, STAMP_OFFSET, Kind,
                              PeerError, ProtocolError, decode_frame, decode_header, encode_frame, encode_header)
from helpers import raw_header

SPECS = [TensorSpec("block1", "block1", (1, 4, 4, 2), "float32"), TensorSpec("ids", "ids", (1, 3), "int32")]


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((1, 4, 4, 2)).astype("float32"), rng.integers(0, 9, (1, 3)).astype("int32")]


def test_header_fields_sit_at_their_named_offsets():
    head = encode_header(Kind.DATA, 7, 123, SPECS)
    assert HEADER.size == 28 and head[:4] == MAGIC
    assert struct.unpack_from("!QQ", head, STAMP_OFFSET) == (7, 123)
    (length,) = struct.unpack_from("!I", head, BLOCK_LENGTH_OFFSET)
    assert length == len(head) - HEADER.size


def test_data_frames_round_trip_and_say_how_many_bytes_they_took():
    sent = [tensors(i) for i in range(2)]
    data = b"".join(encode_frame(Kind.DATA, i, 1000 + i, SPECS, t) for i, t in enumerate(sent))
    data += encode_frame(Kind.END, 2, 0)
    offset = 0
    for i, want in enumerate(sent):
        frame, used = decode_frame(data[offset:], SPECS, i, "peer")
        offset += used
        assert frame.kind == Kind.DATA and frame.sequence == i and frame.origin_ns == 1000 + i
        for got, expected in zip(frame.tensors, want):
            np.testing.assert_array_equal(got, expected)
    end, used = decode_frame(data[offset:], SPECS, 2, "peer")
    assert end.kind == Kind.END and end.sequence == 2 and offset + used == len(data)


def test_an_error_frame_raises_the_peers_message_cut_to_the_limit():
    with pytest.raises(PeerError, match=r"^\[stage 1\] boom$"):
        decode_frame(encode_frame(Kind.ERROR, 0, 0, message="[stage 1] boom"), SPECS, 0, "peer")
    with pytest.raises(PeerError) as error:
        decode_frame(encode_frame(Kind.ERROR, 0, 0, message="x" * (MAX_DESCRIPTOR_BYTES + 5)), SPECS, 0, "peer")
    assert str(error.value) == "x" * MAX_DESCRIPTOR_BYTES


@pytest.mark.parametrize("data, message", [
    (raw_header(magic=b"HTTP"), "bad magic b'HTTP'"),
    (raw_header(version=9), "protocol version 9, this stage speaks 1"),
    (raw_header(kind=7), "unknown message kind 7"),
    (raw_header(kind=0), "unknown message kind 0"),
    (raw_header(block=MAX_DESCRIPTOR_BYTES + 1), "descriptor block of 65537 bytes exceeds 65536"),
    (raw_header()[:27], "truncated frame: 27 of 28 header bytes"),
    (raw_header(block=10), "truncated frame: 28 of 38 header and descriptor bytes"),
    (raw_header(kind=2, count=1), "end-of-stream frame announces 1 tensors and 0 descriptor bytes"),
    (raw_header(count=1, block=0), "frame has 1 tensors, expected 2"),
    (encode_header(Kind.DATA, 0, 0, SPECS) + b"\0" * 10, "truncated frame: 95 of 225 bytes"),
    (encode_frame(Kind.DATA, 4, 0, SPECS, tensors()), "sequence 4 where 0 was expected"),
    (encode_header(Kind.DATA, 0, 0, [SPECS[1], SPECS[0]]), "got tensor 'ids' where 'block1' was expected"),
])
def test_every_broken_frame_is_a_protocol_error_naming_the_peer(data, message):
    with pytest.raises(ProtocolError, match=f"^peer 1.2.3.4:5: {message}"):
        decode_frame(data, SPECS, 0, "peer 1.2.3.4:5")


def test_unknown_kinds_are_refused_without_the_enums_private_table():
    for code in (0, 5, 255):
        with pytest.raises(ProtocolError, match=f"unknown message kind {code}"):
            decode_header(raw_header(kind=code), "peer")
    assert decode_header(raw_header(kind=3, count=0), "peer")[0] is Kind.ERROR


def is_error_frame(data: bytes) -> bool:
    """Bytes that start with a well-formed ERROR header: the one case where the peer's message is raised."""
    if len(data) < HEADER.size:
        return False
    magic, version, kind, _, _, _, block = HEADER.unpack_from(data)
    return magic == MAGIC and version == 1 and kind == Kind.ERROR and block <= MAX_DESCRIPTOR_BYTES


def decodes_or_refuses(data: bytes) -> None:
    """Arbitrary bytes: a frame, or ProtocolError (PeerError only for an ERROR frame); nothing else escapes."""
    offset, sequence = 0, 0
    try:
        while offset < len(data):
            frame, used = decode_frame(data[offset:], SPECS, sequence, "peer")
            assert used > 0
            offset, sequence = offset + used, sequence + 1
            if frame.kind == Kind.END:
                return
    except PeerError:
        assert is_error_frame(data[offset:])
    except ProtocolError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data):
    decodes_or_refuses(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_valid_frames_with_bytes_changed(draw):
    """Arbitrary bytes rarely get past the magic: change a few bytes of a valid stream instead."""
    frame = bytearray(encode_frame(Kind.DATA, 0, 5, SPECS, tensors()) + encode_frame(Kind.END, 1, 0))
    for _ in range(draw.draw(st.integers(1, 4))):
        frame[draw.draw(st.integers(0, len(frame) - 1))] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(frame)))
    decodes_or_refuses(bytes(frame[:cut]))
