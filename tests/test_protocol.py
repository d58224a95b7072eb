"""The wire format over real socket pairs: round trips and every malformed frame class."""

import socket
import struct
import threading

import numpy as np
import pytest

from dnnpipe.manifest import TensorSpec
from dnnpipe.protocol import (HEADER, MAGIC, FrameReader, Kind, PeerError, ProtocolError, encode_header,
                              send_frame)

SPECS = [TensorSpec("block1", "block1", (1, 4, 4, 2), "float32"), TensorSpec("ids", "ids", (1, 3), "int32")]


def buffers():
    return [np.empty(s.shape, s.dtype) for s in SPECS]


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((1, 4, 4, 2)).astype("float32"), rng.integers(0, 9, (1, 3)).astype("int32")]


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, FrameReader(b, SPECS, "peer 1.2.3.4:5", timeout=2.0)
    a.close()
    b.close()


def test_round_trip_data_then_end(pair):
    sender, reader = pair
    sent = [tensors(i) for i in range(3)]
    for i, t in enumerate(sent):
        send_frame(sender, Kind.DATA, i, 1000 + i, SPECS, t)
    send_frame(sender, Kind.END, 3, 0)
    for i, t in enumerate(sent):
        frame = reader.read(buffers())
        assert frame.kind == Kind.DATA and frame.sequence == i and frame.origin_ns == 1000 + i
        for got, want in zip(frame.tensors, t):
            np.testing.assert_array_equal(got, want)
    assert reader.read(buffers()).kind == Kind.END


def test_large_frame_arrives_whole_across_many_reads():
    big = [TensorSpec("x", "x", (1, 512, 512, 3), "float32")]
    a, b = socket.socketpair()
    data = np.random.default_rng(1).random(big[0].shape).astype("float32")
    threading.Thread(target=send_frame, args=(a, Kind.DATA, 0, 0, big, [data])).start()
    frame = FrameReader(b, big, "peer", 5.0).read([np.empty(big[0].shape, "float32")])
    np.testing.assert_array_equal(frame.tensors[0], data)
    a.close(), b.close()


def test_error_frame_carries_the_upstream_message(pair):
    sender, reader = pair
    send_frame(sender, Kind.ERROR, 0, 0, message="[stage 1] boom")
    with pytest.raises(PeerError, match=r"^\[stage 1\] boom$"):
        reader.read(buffers())


def raw_header(magic=MAGIC, version=1, kind=1, count=2, sequence=0, block=0):
    return HEADER.pack(magic, version, kind, count, sequence, 0, block)


@pytest.mark.parametrize("header, message", [
    (raw_header(magic=b"HTTP"), "bad magic b'HTTP'"),
    (raw_header(version=9), "protocol version 9, this stage speaks 1"),
    (raw_header(kind=7), "unknown message kind 7"),
    (raw_header(block=1 << 20), "descriptor block of 1048576 bytes exceeds"),
])
def test_bad_headers(pair, header, message):
    sender, reader = pair
    sender.sendall(header)
    with pytest.raises(ProtocolError, match=f"peer 1.2.3.4:5: {message}"):
        reader.read(buffers())


def frame_with(specs, sequence=0):
    return encode_header(Kind.DATA, sequence, 0, specs)


@pytest.mark.parametrize("specs, message", [
    ([SPECS[0]], "frame has 1 tensors, expected 2"),
    ([TensorSpec("other", "other", (1, 4, 4, 2), "float32"), SPECS[1]], "got tensor 'other' where 'block1'"),
    ([TensorSpec("block1", "b", (1, 4, 4, 3), "float32"), SPECS[1]], r"tensor 'block1' is float32\[1, 4, 4, 3\]"),
    ([TensorSpec("block1", "b", (1, 4, 4, 2), "float16"), SPECS[1]], r"is float16\[1, 4, 4, 2\], the manifest says"),
])
def test_descriptors_must_match_the_manifest(pair, specs, message):
    sender, reader = pair
    sender.sendall(frame_with(specs))
    with pytest.raises(ProtocolError, match=message):
        reader.read(buffers())


def test_unknown_dtype_and_oversized_length(pair):
    sender, reader = pair
    name = b"block1"
    bad_dtype = struct.pack("!H", len(name)) + name + struct.pack("!BB4IQ", 99, 4, 1, 4, 4, 2, 128)
    sender.sendall(raw_header(block=len(bad_dtype)) + bad_dtype)
    with pytest.raises(ProtocolError, match="unknown dtype code 99"):
        reader.read(buffers())


def test_length_over_the_manifest_size():
    a, b = socket.socketpair()
    name = b"block1"
    block = struct.pack("!H", len(name)) + name + struct.pack("!BB4IQ", 1, 4, 1, 4, 4, 2, 1 << 30)
    a.sendall(HEADER.pack(MAGIC, 1, 1, 1, 0, 0, len(block)) + block)
    with pytest.raises(ProtocolError, match="announces 1073741824 bytes, the manifest says 128"):
        FrameReader(b, SPECS[:1], "peer", 2.0).read([np.empty((1, 4, 4, 2), "float32")])


def test_truncated_frame_and_dead_peer(pair):
    sender, reader = pair
    sender.sendall(frame_with(SPECS) + b"\0" * 10)
    sender.close()
    with pytest.raises(ProtocolError, match="truncated frame: connection closed after 10 of 128 bytes"):
        reader.read(buffers())


def test_peer_closing_between_frames_is_not_an_end(pair):
    sender, reader = pair
    sender.close()
    with pytest.raises(ProtocolError, match="connection closed before end-of-stream"):
        reader.read(buffers())


def test_sequence_gap(pair):
    sender, reader = pair
    send_frame(sender, Kind.DATA, 0, 0, SPECS, tensors())
    send_frame(sender, Kind.DATA, 2, 0, SPECS, tensors())
    reader.read(buffers())
    with pytest.raises(ProtocolError, match="sequence 2 where 1 was expected"):
        reader.read(buffers())


def test_read_timeout():
    a, b = socket.socketpair()
    with pytest.raises(ProtocolError, match=r"no data for 0.2 s \(--timeout\)"):
        FrameReader(b, SPECS, "peer", 0.2).read(buffers())
    a.close(), b.close()
