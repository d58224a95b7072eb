"""Frames over real socket pairs (TCP and TLS): round trips, every malformed frame class, whole-frame deadlines."""

import socket
import ssl
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnpipe.manifest import TensorSpec
from dnnpipe.frameio import FrameReader, FrameWriter, _advance
from dnnpipe.protocol import (HEADER, MAGIC, MAX_DESCRIPTOR_BYTES, Kind, PeerError, ProtocolError, encode_frame,
                              encode_header)
from dnnpipe.keygen import create_certificate
from dnnpipe.pipeline_key import tls_context
from dnnpipe.runtime.handshake import tls_wrap
from helpers import raw_header

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
        sender.sendall(encode_frame(Kind.DATA, i, 1000 + i, SPECS, t))
    sender.sendall(encode_frame(Kind.END, 3, 0))
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
    threading.Thread(target=a.sendall, args=(encode_frame(Kind.DATA, 0, 0, big, [data]),)).start()
    frame = FrameReader(b, big, "peer", 5.0).read([np.empty(big[0].shape, "float32")])
    np.testing.assert_array_equal(frame.tensors[0], data)
    a.close(), b.close()


def test_error_frame_carries_the_upstream_message(pair):
    sender, reader = pair
    sender.sendall(encode_frame(Kind.ERROR, 0, 0, message="[stage 1] boom"))
    with pytest.raises(PeerError, match=r"^\[stage 1\] boom$"):
        reader.read(buffers())


def test_a_bad_header_is_refused_by_the_reader(pair):
    """One case at the reader; every broken header is in test_protocol (the decoder the reader uses)."""
    sender, reader = pair
    sender.sendall(raw_header(magic=b"HTTP"))
    with pytest.raises(ProtocolError, match="peer 1.2.3.4:5: bad magic b'HTTP'"):
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
    with pytest.raises(ProtocolError, match="truncated frame: connection closed after 10 of 140 bytes"):
        reader.read(buffers())


def test_peer_closing_between_frames_is_not_an_end(pair):
    sender, reader = pair
    sender.close()
    with pytest.raises(ProtocolError, match="connection closed before end-of-stream"):
        reader.read(buffers())


def test_sequence_gap(pair):
    sender, reader = pair
    sender.sendall(encode_frame(Kind.DATA, 0, 0, SPECS, tensors()))
    sender.sendall(encode_frame(Kind.DATA, 2, 0, SPECS, tensors()))
    reader.read(buffers())
    with pytest.raises(ProtocolError, match="sequence 2 where 1 was expected"):
        reader.read(buffers())


def test_read_timeout():
    a, b = socket.socketpair()
    with pytest.raises(ProtocolError, match=r"no data for 0.2 s \(--timeout\)"):
        FrameReader(b, SPECS, "peer", 0.2).read(buffers())
    a.close(), b.close()


@pytest.mark.parametrize("tls", [False, True])
def test_writer_round_trip_data_end_and_error(tls, certificate):
    pair = (lambda: tls_socketpair(certificate)) if tls else socket.socketpair
    a, b = pair()
    writer, reader = FrameWriter(a, SPECS, "the next stage", 2.0), FrameReader(b, SPECS, "peer", 2.0)
    sent = [tensors(i) for i in range(3)]
    for i, t in enumerate(sent):  # all in flight at once: with TLS, later frames wait decrypted in its buffer
        writer.send(i, 1000 + i, t)
    writer.end(3)
    for i, t in enumerate(sent):
        frame = reader.read(buffers())
        assert frame.kind == Kind.DATA and frame.sequence == i and frame.origin_ns == 1000 + i
        for got, want in zip(frame.tensors, t):
            np.testing.assert_array_equal(got, want)
    end = reader.read(buffers())
    assert end.kind == Kind.END and end.sequence == 3
    with pytest.raises(ProtocolError, match="peer: read after end-of-stream"):
        reader.read(buffers())
    c, d = pair()
    FrameWriter(c, SPECS, "x", 2.0).error(0, "[stage 1] boom")
    with pytest.raises(PeerError, match=r"^\[stage 1\] boom$"):
        FrameReader(d, SPECS, "peer", 2.0).read(buffers())
    for s in (a, b, c, d):
        s.close()


def test_writer_refuses_tensors_that_disagree_with_the_manifest():
    a, b = socket.socketpair()
    with pytest.raises(ProtocolError, match=r"tensors of \[128, 16\] bytes do not match the manifest's \[128, 12\]"):
        FrameWriter(a, SPECS, "x", 2.0).send(0, 0, [tensors()[0], np.zeros((1, 4), "int32")])
    a.close(), b.close()


@pytest.mark.parametrize("tls", [False, True])
def test_large_multi_tensor_frames_survive_partial_sends_both_ways(tls, certificate):
    """Small socket buffers force many partial sendmsg and recvmsg_into calls within one frame (with TLS: OpenSSL
    asks again and again to retry a write and to read more)."""
    specs = [TensorSpec("a", "a", (1, 300, 301), "float32"), TensorSpec("b", "b", (7,), "uint8"),
             TensorSpec("c", "c", (1, 200, 99), "float64")]
    a, b = tls_socketpair(certificate, 4096) if tls else small_socketpair(4096)
    rng = np.random.default_rng(2)
    frames = [[rng.random(s.shape).astype(s.dtype) for s in specs] for _ in range(3)]
    writer = FrameWriter(a, specs, "x", 5.0)
    thread = threading.Thread(target=lambda: [writer.send(i, 0, f) for i, f in enumerate(frames)])
    thread.start()
    reader = FrameReader(b, specs, "peer", 5.0)
    for want in frames:
        got = reader.read([np.empty(s.shape, s.dtype) for s in specs])
        for x, y in zip(got.tensors, want):
            np.testing.assert_array_equal(x, y)
    thread.join()
    a.close(), b.close()


def small_socketpair(buffer_bytes=None):
    a, b = socket.socketpair()
    if buffer_bytes:
        for sock, option in ((a, socket.SO_SNDBUF), (b, socket.SO_RCVBUF)):
            sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
    return a, b


def test_header_and_descriptors_arriving_in_pieces_are_still_checked(pair):
    """A block that arrives after its header must be read, never taken from the previous frame's bytes."""
    sender, reader = pair
    sender.sendall(encode_frame(Kind.DATA, 0, 0, SPECS, tensors()))
    reader.read(buffers())
    renamed = [TensorSpec("block2", "b", (1, 4, 4, 2), "float32"), SPECS[1]]  # same block length
    head = encode_header(Kind.DATA, 1, 0, renamed)
    sender.sendall(head[:HEADER.size])
    threading.Timer(0.1, sender.sendall, [head[HEADER.size:]]).start()
    with pytest.raises(ProtocolError, match="got tensor 'block2' where 'block1' was expected"):
        reader.read(buffers())


def test_good_frame_arriving_in_pieces(pair):
    sender, reader = pair
    data = tensors(3)
    head = encode_header(Kind.DATA, 0, 7, SPECS)
    sender.sendall(head[:5])
    threading.Timer(0.05, lambda: (sender.sendall(head[5:40]), time.sleep(0.05),
                                   send_rest(sender, head[40:], data))).start()
    frame = reader.read(buffers())
    assert frame.origin_ns == 7
    for got, want in zip(frame.tensors, data):
        np.testing.assert_array_equal(got, want)


def send_rest(sock, head_tail, data):
    sock.sendall(head_tail)
    for t in data:
        sock.sendall(t.tobytes())


def test_name_in_invalid_utf8_is_not_the_manifests_name():
    specs = [TensorSpec("a\ufffd", "a", (2,), "uint8")]
    name = b"a\xff\xff\xff"  # decodes (with replacement) to 'a' + three U+FFFD: different length, so also its bytes
    block = struct.pack("!H", 2) + b"a\xff" + struct.pack("!BBIQ", 5, 1, 2, 2)
    block_long = struct.pack("!H", len(name)) + name + struct.pack("!BBIQ", 5, 1, 2, 2)
    for bad, message in ((block, "descriptor block differs from the manifest's encoding"),
                         (block_long, "got tensor")):
        a, b = socket.socketpair()
        a.sendall(HEADER.pack(MAGIC, 1, 1, 1, 0, 0, len(bad)) + bad)
        with pytest.raises(ProtocolError, match=message):
            FrameReader(b, specs, "peer", 2.0).read([np.empty((2,), "uint8")])
        a.close(), b.close()


@pytest.mark.parametrize("block, message", [
    (struct.pack("!H", 60000) + b"block1", "descriptor block ends early"),  # name longer than the block
    (struct.pack("!H", 6) + b"block1" + struct.pack("!BB", 1, 255), "descriptor block ends early"),  # 255 dims
    (struct.pack("!H", 6) + b"block1" + struct.pack("!BB4IQ", 1, 4, 1, 4, 4, 2, 128) + b"xx",
     "2 unexpected bytes after the descriptors"),
])
def test_sizes_inside_the_block_are_bounded_by_it(block, message):
    a, b = socket.socketpair()
    a.sendall(HEADER.pack(MAGIC, 1, 1, 1, 0, 0, len(block)) + block)
    with pytest.raises(ProtocolError, match=message):
        FrameReader(b, SPECS[:1], "peer", 2.0).read([np.empty((1, 4, 4, 2), "float32")])
    a.close(), b.close()


def test_oversized_error_message_is_refused_before_it_is_read(pair):
    sender, reader = pair
    sender.sendall(raw_header(kind=3, count=0, block=MAX_DESCRIPTOR_BYTES + 1))
    with pytest.raises(ProtocolError, match="descriptor block of 65537 bytes exceeds 65536"):
        reader.read(buffers())


def test_long_error_message_is_cut_to_the_limit(pair):
    sender, reader = pair
    sender.sendall(encode_frame(Kind.ERROR, 0, 0, message="x" * (MAX_DESCRIPTOR_BYTES + 10)))
    with pytest.raises(PeerError) as error:
        reader.read(buffers())
    assert str(error.value) == "x" * MAX_DESCRIPTOR_BYTES


def test_bytes_after_end_of_stream(pair):
    sender, reader = pair
    sender.sendall(encode_header(Kind.END, 0, 0) + b"junk!")
    with pytest.raises(ProtocolError, match="5 unexpected bytes after end-of-stream"):
        reader.read(buffers())


def test_buffers_must_fit_the_manifest(pair):
    sender, reader = pair
    sender.sendall(encode_frame(Kind.DATA, 0, 0, SPECS, tensors()))
    with pytest.raises(ValueError, match=r"buffers of \[128, 8\] bytes for tensors of \[128, 12\]"):
        reader.read([np.empty((1, 4, 4, 2), "float32"), np.empty((1, 2), "int32")])


def test_timeout_is_a_deadline_for_the_whole_frame():
    """A peer trickling a byte every 20 ms never lets one recv wait 0.3 s, but the frame misses its deadline."""
    a, b = socket.socketpair()
    frame = encode_header(Kind.DATA, 0, 0, SPECS) + b"\0" * 140
    stop = threading.Event()

    def trickle():
        for byte in frame:
            if stop.wait(0.02):
                return
            a.sendall(bytes([byte]))

    thread = threading.Thread(target=trickle)
    thread.start()
    with pytest.raises(ProtocolError, match=r"peer: frame incomplete after 0.3 s \(--timeout\)"):
        FrameReader(b, SPECS, "peer", 0.3).read(buffers())
    stop.set()
    thread.join()
    a.close(), b.close()


def test_send_deadline_covers_the_whole_frame():
    big = [TensorSpec("x", "x", (4 << 20,), "uint8")]
    a, b = socket.socketpair()  # b never reads
    with pytest.raises(ProtocolError, match=r"cannot send to the next stage at h:1: frame not taken within 0.2 s"):
        FrameWriter(a, big, "the next stage at h:1", 0.2).send(0, 0, [np.zeros(4 << 20, "uint8")])
    a.close(), b.close()


def test_send_to_a_closed_peer():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(ProtocolError, match="cannot send to the next stage at h:1: Broken pipe"):
        FrameWriter(a, SPECS, "the next stage at h:1", 2.0).send(0, 0, tensors())
    a.close()


@given(st.lists(st.binary(max_size=20), max_size=6), st.lists(st.integers(0, 30), max_size=8))
def test_advance_drops_exactly_the_bytes_sent(chunks, steps):
    views = [memoryview(c) for c in chunks]
    rest = b"".join(chunks)
    for n in steps:
        n = min(n, len(rest))
        _advance(views, n)
        rest = rest[n:]
        assert b"".join(bytes(v) for v in views) == rest


# --- the same frames over TLS (--tls): SSLSocket has no sendmsg/recvmsg_into, and decrypted bytes hide from poll

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    create_certificate(folder)
    return folder


def tls_socketpair(folder, buffer_bytes=None):
    """A connected pair of SSLSockets, both ends pinning the pipeline certificate, as two stages' link."""
    a, b = small_socketpair(buffer_bytes)
    server: list = []
    thread = threading.Thread(target=lambda: server.append(tls_wrap(b, tls_context(folder, True), True)))
    thread.start()
    client = tls_wrap(a, tls_context(folder, False), False)
    thread.join()
    assert isinstance(client, ssl.SSLSocket) and isinstance(server[0], ssl.SSLSocket)
    return client, server[0]


def test_tls_checks_and_deadlines_still_hold(certificate):
    a, b = tls_socketpair(certificate)
    with pytest.raises(ProtocolError, match=r"no data for 0.2 s \(--timeout\)"):
        FrameReader(b, SPECS, "peer", 0.2).read(buffers())
    a.sendall(encode_header(Kind.DATA, 0, 0, SPECS)[:-3])  # a head cut short, then the peer dies
    a.close()
    with pytest.raises(ProtocolError, match="peer: truncated frame: connection closed after"):
        FrameReader(b, SPECS, "peer", 2.0).read(buffers())
    b.close()
    big = [TensorSpec("x", "x", (4 << 20,), "uint8")]
    c, d = tls_socketpair(certificate)  # d never reads
    with pytest.raises(ProtocolError, match=r"cannot send to the next stage at h:1: frame not taken within 0.2 s"):
        FrameWriter(c, big, "the next stage at h:1", 0.2).send(0, 0, [np.zeros(4 << 20, "uint8")])
    c.close(), d.close()


def read_until_refused(data: bytes) -> None:
    """A peer sends `data` and closes: every read ends in a frame or ProtocolError (PeerError only for an ERROR
    frame), never another exception and never a hang (every read has the reader's deadline)."""
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.close()
        reader = FrameReader(b, SPECS, "peer", timeout=2.0)
        for _ in range(len(data) + 2):
            try:
                if reader.read(buffers()).kind == Kind.END:
                    return
            except PeerError:
                assert data.find(MAGIC) >= 0  # only a well-formed ERROR frame carries a peer's message
                return
            except ProtocolError:
                return
        raise AssertionError("the reader neither ended nor refused the bytes")
    finally:
        b.close()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_the_reader_with_arbitrary_bytes(data):
    read_until_refused(data)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_fuzz_the_reader_with_valid_frames_changed(draw):
    frame = bytearray(encode_frame(Kind.DATA, 0, 5, SPECS, tensors()) + encode_frame(Kind.END, 1, 0))
    for _ in range(draw.draw(st.integers(1, 4))):
        frame[draw.draw(st.integers(0, len(frame) - 1))] = draw.draw(st.integers(0, 255))
    read_until_refused(bytes(frame[:draw.draw(st.integers(0, len(frame)))]))


def tcp_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    return a, b


@pytest.mark.parametrize("tls", [False, True])
def test_a_payload_trickling_in_is_read_whole_and_the_low_water_mark_is_reset(tls, certificate):
    """The reader sleeps until most of a payload is there (SO_RCVLOWAT), never past what is still to come: a cut
    sent in small pieces with pauses arrives whole, an END right after it is read at once, and the socket wakes
    on any byte again between frames."""
    big = [TensorSpec("cut", "cut", (1, 150_000), "float32")]  # 600 KB, as the tiny model's largest cut
    a, b = tcp_pair()
    if tls:
        server: list = []
        thread = threading.Thread(target=lambda: server.append(tls_wrap(b, tls_context(certificate, True), True)))
        thread.start()
        a = tls_wrap(a, tls_context(certificate, False), False)
        thread.join()
        b = server[0]
    sent = [np.random.default_rng(k).random(big[0].shape).astype("float32") for k in range(2)]

    def trickle():
        a.setblocking(True)
        for k, data in enumerate(sent):
            frame = encode_frame(Kind.DATA, k, 0, big, [data])
            for at in range(0, len(frame), 100_000):
                a.sendall(frame[at:at + 100_000])
                time.sleep(0.02)
        a.sendall(encode_frame(Kind.END, len(sent), 0))

    sender = threading.Thread(target=trickle)
    sender.start()
    reader, out = FrameReader(b, big, "peer", 5.0), [np.empty(big[0].shape, "float32")]
    for data in sent:
        assert reader.read(out).kind == Kind.DATA
        np.testing.assert_array_equal(out[0], data)
        assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert reader.read(out).kind == Kind.END  # at once: a reader waiting for a low water mark would time out
    sender.join()
    a.close(), b.close()


def test_a_peer_that_stops_mid_payload_is_a_truncated_frame_not_a_wait_for_the_low_water_mark():
    big = [TensorSpec("cut", "cut", (1, 150_000), "float32")]
    a, b = tcp_pair()
    frame = encode_frame(Kind.DATA, 0, 0, big, [np.zeros(big[0].shape, "float32")])
    a.sendall(frame[:300_000])
    threading.Timer(0.2, a.close).start()
    with pytest.raises(ProtocolError, match="truncated frame: connection closed after"):  # not "incomplete after"
        FrameReader(b, big, "peer", 10.0).read([np.empty(big[0].shape, "float32")])
    b.close()


def test_a_closed_tls_link_is_never_read_through_its_old_fd_number(certificate):
    """serve's abort closes a results link while its reader waits; the next link accepted may get the same fd
    number, and a read through the cached SSL object went to it (its bytes taken, 'decryption failed')."""
    a, b = tls_socketpair(certificate)
    reader = FrameReader(b, SPECS, "peer", 2.0)
    number = b.fileno()
    b.close()
    c, d = socket.socketpair()  # the lowest free fd numbers: very likely b's old one
    try:
        c.sendall(b"not yours")
        with pytest.raises(ProtocolError, match="peer: connection lost"):
            reader.read(buffers())
        assert d.fileno() != number or d.recv(100) == b"not yours"  # the new link's bytes are still its own
    finally:
        a.close(), c.close(), d.close()


# --- NEXT: a device agent's link that stays across a switch goes on as the next generation's

NEXT_SPECS = [TensorSpec("cut", "cut", (1, 5), "float32")]  # the new role's tensors: another cut


@pytest.mark.parametrize("tls", [False, True])
def test_a_link_that_stays_goes_on_as_the_next_generation_with_the_bytes_read_past_next(tls, certificate):
    """The old writer ends with NEXT and the new one writes at once on the same socket: the old reader may take
    the new frame's first bytes with NEXT's; the new reader starts from them, on the next generation's specs."""
    a, b = tls_socketpair(certificate) if tls else socket.socketpair()
    old_writer, old_reader = FrameWriter(a, SPECS, "next", 2.0), FrameReader(b, SPECS, "peer", 2.0, continues=True)
    old_writer.send(0, 7, tensors(0))
    old_writer.next(1, 9)
    new = [np.arange(5, dtype="float32").reshape(1, 5) + i for i in range(2)]
    new_writer = FrameWriter(a, NEXT_SPECS, "next", 2.0)
    for i, t in enumerate(new):
        new_writer.send(i, 100 + i, [t])
    new_writer.end(2)
    assert old_reader.read(buffers()).kind == Kind.DATA
    frame = old_reader.read(buffers())
    assert (frame.kind, frame.sequence, old_reader.continues) == (Kind.NEXT, 1, 9)
    with pytest.raises(ProtocolError, match="read after end-of-stream"):
        old_reader.read(buffers())
    if not tls:  # a plain socket's one recv took the new frame's head with NEXT
        assert old_reader.leftover
    new_reader = FrameReader(b, NEXT_SPECS, "peer", 2.0, continues=True, prefix=old_reader.leftover)
    for i, t in enumerate(new):
        got = new_reader.read([np.empty((1, 5), "float32")])
        assert got.sequence == i and got.origin_ns == 100 + i
        np.testing.assert_array_equal(got.tensors[0], t)
    assert new_reader.read([np.empty((1, 5), "float32")]).kind == Kind.END
    a.close(), b.close()


def test_next_is_refused_where_a_link_never_goes_on(pair):
    """A stage of runtime_engine.py (or the controller's input side) takes no NEXT: one line names it."""
    sender, reader = pair
    sender.sendall(encode_frame(Kind.NEXT, 0, 4))
    with pytest.raises(ProtocolError, match="peer 1.2.3.4:5: the link goes on as generation 4, which only a device"):
        reader.read(buffers())


def test_next_counts_the_frames_sent_like_end():
    a, b = socket.socketpair()
    a.sendall(encode_frame(Kind.NEXT, 2, 4))
    with pytest.raises(ProtocolError, match="sequence 2 where 0 was expected"):
        FrameReader(b, SPECS, "peer", 2.0, continues=True).read(buffers())
    a.close(), b.close()


def test_two_nexts_in_a_row_hand_on_every_byte_read_past_them():
    """Two planned switches back to back: a role with nothing to send ends at once (NEXT right after NEXT). The
    first reader's head (long tensor names) takes NEXT, NEXT and the next DATA head in one recv; the second reader
    must hand on what it did not use of that, not only what it read itself; an END with bytes still unread is an
    error, as after any END."""
    long_names = [TensorSpec("x" * 120, "x" * 120, (1, 4), "float32")]
    a, b = socket.socketpair()
    FrameWriter(a, long_names, "next", 2.0).next(0, 2)
    FrameWriter(a, NEXT_SPECS, "next", 2.0).next(0, 3)
    last = [TensorSpec("y", "y", (1, 2), "float32")]
    writer = FrameWriter(a, last, "next", 2.0)
    writer.send(0, 5, [np.array([[1.0, 2.0]], "float32")])
    writer.end(1)
    first = FrameReader(b, long_names, "peer", 2.0, continues=True)
    assert first.read([np.empty((1, 4), "float32")]).kind == Kind.NEXT and len(first.leftover) > 28
    second = FrameReader(b, NEXT_SPECS, "peer", 2.0, continues=True, prefix=first.leftover)
    assert second.read([np.empty((1, 5), "float32")]).kind == Kind.NEXT and second.continues == 3
    third = FrameReader(b, last, "peer", 2.0, continues=True, prefix=second.leftover)
    got = third.read([np.empty((1, 2), "float32")])
    np.testing.assert_array_equal(got.tensors[0], [[1.0, 2.0]])
    assert third.read([np.empty((1, 2), "float32")]).kind == Kind.END
    c, d = socket.socketpair()
    with pytest.raises(ProtocolError, match="3 unexpected bytes after end-of-stream"):  # handed on with END
        FrameReader(d, SPECS, "peer", 2.0, prefix=encode_frame(Kind.END, 0, 0) + b"\x00" * 3).read(buffers())
    for s in (a, b, c, d):
        s.close()
