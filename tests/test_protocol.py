"""The wire protocol on bytes alone: no pipes, no sockets, no processes."""

from __future__ import annotations

import array
import random
import struct

import pytest

from nspool._core.protocol import (
    BIG_PAYLOAD,
    CONTROL,
    EXIT_MEMORY_LIMIT,
    HEADER_SIZE,
    MAX_PAYLOAD,
    Control,
    Ctl,
    FrameDecoder,
    Kind,
    ProtocolError,
    decode_control,
    decode_usage,
    encode_control,
    encode_frame,
    encode_header,
    encode_usage,
)

# A stream of frames of every kind, with empty, small and odd-sized payloads and extreme idents.
FRAMES: list[tuple[Kind, int, bytes]] = [
    (Kind.READY, 4242, b""),
    (Kind.INIT, 0, b"init-payload"),
    (Kind.TASK, 1, b"a"),
    (Kind.TASK, 2, b""),
    (Kind.OK, 1, bytes(range(256))),
    (Kind.ERR, 2**64 - 1, b"\x00" * 37),
    (Kind.INIT_FAILED, 0, "Traceback … ünïcode".encode()),
]
STREAM = b"".join(encode_frame(k, i, p) for k, i, p in FRAMES)


def drain(decoder: FrameDecoder) -> list[tuple[Kind, int, bytes]]:
    """Every complete frame the decoder holds, payloads as bytes."""
    out = []
    while (frame := decoder.next_frame()) is not None:
        assert isinstance(frame.kind, Kind)
        out.append((frame.kind, frame.ident, bytes(frame.payload)))
    assert not decoder.has_frame()
    return out


def feed_in_chunks(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> None:
    """Feed ``data`` in chunks of the given sizes (cycled), the last chunk taking the rest."""
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        decoder.feed(data[pos : pos + n])
        pos += n
        i += 1


def read_via_buffer(decoder: FrameDecoder, data: bytes, max_read: int) -> list[int]:
    """Simulate ``readv(fd, [get_buffer()])`` returning at most ``max_read`` bytes a call.
    Returns the size of every buffer handed out."""
    view = memoryview(data)
    pos = 0
    offered = []
    while pos < len(data):
        buf = decoder.get_buffer()
        offered.append(len(buf))
        assert len(buf) > 0
        n = min(len(buf), max_read, len(data) - pos)
        buf[:n] = view[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n
    return offered


def payload_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def test_kind_wire_values_are_fixed() -> None:
    # Both ends of a pipe may not be the same build; the numbers are the protocol.
    assert {k.name: int(k) for k in Kind} == {
        "TASK": 1,
        "INIT": 2,
        "OK": 3,
        "ERR": 4,
        "READY": 5,
        "INIT_FAILED": 6,
        "SKIPPED": 7,
        "TIMED_TASK": 8,
        "USAGE": 9,
    }


def test_usage_payload_round_trip_and_unknowns() -> None:
    payload = encode_usage(1.5, 0.25, 0.125, 200 << 20)
    assert len(payload) == 32
    assert decode_usage(payload) == (1.5, 0.25, 0.125, 200 << 20)
    assert decode_usage(encode_usage(0.001, None, None, None)) == (0.001, None, None, None)
    with pytest.raises(ProtocolError, match="USAGE payload of 31 bytes"):
        decode_usage(payload[:31])


def test_exited_memory_limit_flag_stays_out_of_the_wait_status() -> None:
    value = 0xFFFF | EXIT_MEMORY_LIMIT  # any wait status fits in the low 32 bits
    packet = encode_control(Control(Ctl.EXITED, 3, value))
    msg = decode_control(packet)
    assert msg.value & EXIT_MEMORY_LIMIT and msg.value & 0xFFFFFFFF == 0xFFFF


def test_header_layout_is_little_endian_length_kind_ident() -> None:
    header = encode_header(Kind.OK, 0x0102030405060708, 0x1122)
    assert len(header) == HEADER_SIZE == 17
    assert header == struct.pack("<QBQ", 0x1122, 3, 0x0102030405060708)


def test_encode_frame_is_header_then_payload() -> None:
    payload = b"hello"
    assert encode_frame(Kind.TASK, 9, payload) == encode_header(Kind.TASK, 9, 5) + payload
    assert encode_frame(Kind.READY, 9) == encode_header(Kind.READY, 9, 0)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_encode_frame_accepts_every_payload_type(wrap: type) -> None:
    frame = encode_frame(Kind.OK, 3, wrap(b"xyz"))
    decoder = FrameDecoder()
    decoder.feed(frame)
    assert drain(decoder) == [(Kind.OK, 3, b"xyz")]


def test_encode_frame_counts_bytes_of_a_non_byte_memoryview() -> None:
    payload = memoryview(array.array("i", [1, 2, 3]))  # 3 items, 12 bytes
    frame = encode_frame(Kind.OK, 1, payload)
    decoder = FrameDecoder()
    decoder.feed(frame)
    assert drain(decoder) == [(Kind.OK, 1, payload.tobytes())]
    assert decoder.pending_bytes == 0


# ---------------------------------------------------------------------------------------------
# Decoding small frames
# ---------------------------------------------------------------------------------------------


def test_fresh_decoder_has_nothing() -> None:
    decoder = FrameDecoder()
    assert decoder.next_frame() is None
    assert not decoder.has_frame()
    assert decoder.pending_bytes == 0


def test_one_whole_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Kind.TASK, 77, b"payload"))
    assert decoder.has_frame()
    frame = decoder.next_frame()
    assert frame is not None
    assert frame.kind is Kind.TASK
    assert frame.ident == 77
    assert bytes(frame.payload) == b"payload"
    assert decoder.next_frame() is None
    assert decoder.pending_bytes == 0


def test_empty_payload_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_header(Kind.READY, 12345, 0))
    assert drain(decoder) == [(Kind.READY, 12345, b"")]
    assert decoder.pending_bytes == 0


def test_many_frames_in_one_chunk_keep_their_order() -> None:
    decoder = FrameDecoder()
    decoder.feed(STREAM)
    assert drain(decoder) == FRAMES
    assert decoder.pending_bytes == 0


def test_byte_by_byte() -> None:
    decoder = FrameDecoder()
    got = []
    for i in range(len(STREAM)):
        decoder.feed(STREAM[i : i + 1])
        got.extend(drain(decoder))
    assert got == FRAMES
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_split_at_every_offset(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(STREAM[:cut])
    first = drain(decoder)
    # Exactly the frames that lie wholly before the cut come out of the first part.
    assert first == FRAMES[: len(first)]
    complete_len = sum(HEADER_SIZE + len(p) for _, _, p in first)
    assert complete_len <= cut
    if len(first) < len(FRAMES):
        assert complete_len + HEADER_SIZE + len(FRAMES[len(first)][2]) > cut
    assert decoder.pending_bytes == cut - complete_len
    decoder.feed(STREAM[cut:])
    assert first + drain(decoder) == FRAMES
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings(seed: int) -> None:
    rng = random.Random(seed)
    data = STREAM * 3
    decoder = FrameDecoder()
    got = []
    pos = 0
    while pos < len(data):
        n = rng.randint(0, 40)
        decoder.feed(data[pos : pos + n])
        pos += n
        if rng.random() < 0.5:
            got.extend(drain(decoder))
    got.extend(drain(decoder))
    assert got == FRAMES * 3


def test_feed_accepts_bytearray_and_memoryview() -> None:
    decoder = FrameDecoder()
    half = len(STREAM) // 2
    decoder.feed(bytearray(STREAM[:half]))
    decoder.feed(memoryview(STREAM)[half:])
    assert drain(decoder) == FRAMES


def test_feeding_empty_bytes_changes_nothing() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"")
    decoder.feed(STREAM[:5])
    decoder.feed(b"")
    assert decoder.next_frame() is None
    assert decoder.pending_bytes == 5


def test_partial_header_waits() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(Kind.OK, 5, b"abc")
    decoder.feed(frame[: HEADER_SIZE - 1])
    assert decoder.next_frame() is None
    assert decoder.pending_bytes == HEADER_SIZE - 1
    decoder.feed(frame[HEADER_SIZE - 1 : HEADER_SIZE + 2])
    assert decoder.next_frame() is None
    assert decoder.pending_bytes == HEADER_SIZE + 2
    decoder.feed(frame[HEADER_SIZE + 2 :])
    assert drain(decoder) == [(Kind.OK, 5, b"abc")]


def test_frames_taken_between_feeds() -> None:
    # Taking some frames, then feeding more, must neither lose nor repeat any.
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Kind.OK, 1, b"1") + encode_frame(Kind.OK, 2, b"2"))
    first = decoder.next_frame()
    assert first is not None and first.ident == 1
    decoder.feed(encode_frame(Kind.OK, 3, b"3"))
    assert [i for _, i, _ in drain(decoder)] == [2, 3]
    decoder.feed(encode_frame(Kind.OK, 4, b"4"))
    assert [i for _, i, _ in drain(decoder)] == [4]


@pytest.mark.parametrize("max_read", [1, 2, 7, 17, 18, 64, 1 << 20])
@pytest.mark.parametrize("scratch_size", [1, 5, 256 * 1024])
def test_get_buffer_path_small_frames(max_read: int, scratch_size: int) -> None:
    decoder = FrameDecoder(scratch_size=scratch_size)
    offered = read_via_buffer(decoder, STREAM, max_read)
    # Small frames are read through the scratch buffer.
    assert set(offered) == {scratch_size}
    assert drain(decoder) == FRAMES
    assert decoder.pending_bytes == 0


def test_buffer_updated_zero_bytes_is_harmless() -> None:
    decoder = FrameDecoder()
    decoder.get_buffer()
    decoder.buffer_updated(0)
    assert decoder.next_frame() is None
    assert decoder.pending_bytes == 0


# ---------------------------------------------------------------------------------------------
# Big payloads (received in a buffer of their own)
# ---------------------------------------------------------------------------------------------

BIG = payload_of(BIG_PAYLOAD + 12345, seed=1)


def test_big_payload_fed_whole() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Kind.OK, 8, BIG))
    assert drain(decoder) == [(Kind.OK, 8, BIG)]
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize(
    "sizes",
    [
        [3, 65537, 4099],
        [HEADER_SIZE, 1 << 19],  # header alone first
        [HEADER_SIZE + 1, 999_999, 1],
        [HEADER_SIZE - 1, 1, 1, 1 << 20],
        [100_003],
    ],
)
def test_big_payload_fed_in_odd_chunks(sizes: list[int]) -> None:
    data = encode_frame(Kind.OK, 8, BIG)
    decoder = FrameDecoder()
    feed_in_chunks(decoder, data, sizes)
    assert drain(decoder) == [(Kind.OK, 8, BIG)]
    assert decoder.pending_bytes == 0


def test_big_payload_exactly_at_threshold() -> None:
    payload = payload_of(BIG_PAYLOAD, seed=2)
    decoder = FrameDecoder()
    feed_in_chunks(decoder, encode_frame(Kind.TASK, 1, payload), [1000, 77777])
    assert drain(decoder) == [(Kind.TASK, 1, payload)]


def test_big_payload_between_small_frames_in_odd_chunks() -> None:
    data = (
        encode_frame(Kind.OK, 1, b"before")
        + encode_frame(Kind.OK, 2, BIG)
        + encode_frame(Kind.ERR, 3, b"after")
        + encode_frame(Kind.OK, 4, b"")
    )
    decoder = FrameDecoder()
    feed_in_chunks(decoder, data, [10, 65539, 3, 131101])
    assert drain(decoder) == [
        (Kind.OK, 1, b"before"),
        (Kind.OK, 2, BIG),
        (Kind.ERR, 3, b"after"),
        (Kind.OK, 4, b""),
    ]
    assert decoder.pending_bytes == 0


def test_two_big_payloads_back_to_back() -> None:
    other = payload_of(BIG_PAYLOAD + 1, seed=3)
    data = encode_frame(Kind.OK, 1, BIG) + encode_frame(Kind.OK, 2, other)
    decoder = FrameDecoder()
    feed_in_chunks(decoder, data, [70001])
    assert drain(decoder) == [(Kind.OK, 1, BIG), (Kind.OK, 2, other)]


def test_big_payload_tail_and_next_frame_in_one_chunk() -> None:
    # The chunk that completes the big payload also carries the next frame.
    data = encode_frame(Kind.OK, 1, BIG) + encode_frame(Kind.OK, 2, b"next")
    cut = HEADER_SIZE + 100
    decoder = FrameDecoder()
    decoder.feed(data[:cut])
    assert decoder.next_frame() is None
    decoder.feed(data[cut:])
    assert drain(decoder) == [(Kind.OK, 1, BIG), (Kind.OK, 2, b"next")]


@pytest.mark.parametrize("max_read", [4096, 65537, 300_000, 1 << 22])
def test_big_payload_read_in_place_via_get_buffer(max_read: int) -> None:
    scratch = 1024
    data = (
        encode_frame(Kind.OK, 1, b"small")
        + encode_frame(Kind.OK, 2, BIG)
        + encode_frame(Kind.OK, 3, b"tail")
    )
    decoder = FrameDecoder(scratch_size=scratch)
    offered = read_via_buffer(decoder, data, max_read)
    assert drain(decoder) == [(Kind.OK, 1, b"small"), (Kind.OK, 2, BIG), (Kind.OK, 3, b"tail")]
    # Once the big header was seen, the decoder offered the rest of the payload itself
    # (larger than its scratch buffer), so the bytes landed in their final place.
    assert max(offered) > scratch
    assert all(n == scratch or n <= len(BIG) for n in offered)


def test_get_buffer_offers_exactly_the_rest_of_a_big_payload() -> None:
    decoder = FrameDecoder(scratch_size=4096)
    data = encode_frame(Kind.OK, 5, BIG)
    first = HEADER_SIZE + 1000
    read_via_buffer(decoder, data[:first], 4096)
    buf = decoder.get_buffer()
    # The buffer never reaches past the frame, so a read cannot swallow the next frame.
    assert len(buf) == len(BIG) - 1000
    buf[:] = data[first:]
    decoder.buffer_updated(len(buf))
    frame = decoder.next_frame()
    assert frame is not None
    assert (frame.kind, frame.ident) == (Kind.OK, 5)
    assert bytes(frame.payload) == BIG
    # Filled in place: the payload is the very buffer handed out.
    assert frame.payload is buf.obj
    assert decoder.get_buffer().nbytes == 4096  # back to the scratch buffer
    assert decoder.pending_bytes == 0


def test_big_payload_partial_pending_bytes() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_header(Kind.OK, 1, len(BIG)) + BIG[:500])
    assert decoder.next_frame() is None
    assert decoder.pending_bytes >= 500


def test_pending_bytes_counts_big_frame_header() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_header(Kind.OK, 1, len(BIG)))
    assert decoder.next_frame() is None
    assert decoder.pending_bytes == HEADER_SIZE
    decoder.feed(BIG[:500])
    assert decoder.pending_bytes == HEADER_SIZE + 500


# ---------------------------------------------------------------------------------------------
# Malformed frames
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 10, 100, 255])
def test_unknown_kind_raises(kind: int) -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="kind"):
        decoder.feed(struct.pack("<QBQ", 0, kind, 1))


def test_unknown_kind_raises_as_soon_as_the_header_is_complete() -> None:
    header = struct.pack("<QBQ", 10, 200, 1)
    decoder = FrameDecoder()
    decoder.feed(header[:-1])  # not yet a header: nothing to judge
    with pytest.raises(ProtocolError):
        decoder.feed(header[-1:])


def test_unknown_kind_after_good_frames_raises() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(encode_frame(Kind.OK, 1, b"x") + struct.pack("<QBQ", 0, 10, 2))


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 2**63, 2**64 - 1])
def test_oversize_length_raises(length: int) -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="over the limit"):
        decoder.feed(struct.pack("<QBQ", length, int(Kind.OK), 1))


def test_oversize_length_raises_through_get_buffer() -> None:
    decoder = FrameDecoder()
    header = struct.pack("<QBQ", MAX_PAYLOAD + 1, int(Kind.TASK), 1)
    buf = decoder.get_buffer()
    buf[: len(header)] = header
    with pytest.raises(ProtocolError):
        decoder.buffer_updated(len(header))


# ---------------------------------------------------------------------------------------------
# Control messages
# ---------------------------------------------------------------------------------------------


def test_ctl_wire_values_are_fixed() -> None:
    assert {c.name: int(c) for c in Ctl} == {
        "HELLO": 1,
        "ERROR": 2,
        "SPAWN": 3,
        "SPAWN_FAILED": 4,
        "KILL": 5,
        "EXITED": 6,
        "LIMITS_ERROR": 7,
        "NEW_POOL": 8,
    }


def test_control_packet_layout() -> None:
    packet = encode_control(Control(Ctl.KILL, 7, 9))
    assert packet == struct.pack("<BIq", 5, 7, 9)
    assert len(packet) == CONTROL.size
    assert encode_control(Control(Ctl.ERROR, 0, 0, "no")) == struct.pack("<BIq", 2, 0, 0) + b"no"


@pytest.mark.parametrize(
    "msg",
    [
        Control(Ctl.HELLO, 0, 12345),
        Control(Ctl.ERROR, 0, 0, "cannot unshare: Operation not permitted"),
        Control(Ctl.SPAWN, 1),
        Control(Ctl.SPAWN_FAILED, 3, 12, "no memory: ENOMEM — ünïcödé ✓ 漢字 🐍"),
        Control(Ctl.KILL, 2**32 - 1, 9),
        Control(Ctl.EXITED, 5, -(2**63), "\x00embedded nul"),
        Control(Ctl.EXITED, 6, 2**63 - 1),
        Control(Ctl.ERROR, 0, 0, "e\u0301 combining, RTL \u05e9\u05dc\u05d5\u05dd"),
    ],
)
def test_control_round_trip(msg: Control) -> None:
    decoded = decode_control(encode_control(msg))
    assert decoded == msg
    assert decoded.kind is msg.kind


def test_control_defaults() -> None:
    decoded = decode_control(encode_control(Control(Ctl.SPAWN, 4)))
    assert decoded.value == 0
    assert decoded.text == ""


def test_control_text_unencodable_is_replaced() -> None:
    # A lone surrogate cannot be UTF-8: it is replaced instead of raising.
    decoded = decode_control(encode_control(Control(Ctl.ERROR, 0, 0, "bad \udc80 text")))
    assert decoded.text == "bad ? text"


def test_control_text_invalid_utf8_is_replaced() -> None:
    packet = struct.pack("<BIq", int(Ctl.ERROR), 0, 0) + b"ok \xff\xfe end"
    assert decode_control(packet).text == "ok \ufffd\ufffd end"


@pytest.mark.parametrize("size", range(CONTROL.size))
def test_short_control_packet_raises(size: int) -> None:
    packet = encode_control(Control(Ctl.EXITED, 1, 2))[:size]
    with pytest.raises(ProtocolError, match="too short"):
        decode_control(packet)


@pytest.mark.parametrize("kind", [0, 9, 255])
def test_unknown_control_kind_raises(kind: int) -> None:
    with pytest.raises(ProtocolError, match="kind"):
        decode_control(struct.pack("<BIq", kind, 1, 0))


# -- untrusted headers ----------------------------------------------------------------------


def test_a_length_over_the_decoders_limit_is_refused_before_any_room_is_made() -> None:
    """A worker's sizes are never trusted: past ``max_payload`` the header alone fails."""
    decoder = FrameDecoder(max_payload=1 << 20)
    with pytest.raises(ProtocolError, match="over the limit of 1048576"):
        decoder.feed(encode_header(Kind.OK, 1, (1 << 20) + 1))
    assert decoder.pending_bytes <= HEADER_SIZE


def test_a_big_length_that_lies_costs_no_memory_until_bytes_back_it() -> None:
    """A header claiming 4 GiB (under the limit) and then nothing: its buffer is a mapping
    whose pages exist only once written, so the program's memory does not grow by 4 GiB."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    decoder = FrameDecoder()
    decoder.feed(encode_header(Kind.OK, 1, 4 << 30) + b"x" * 100)
    assert decoder.next_frame() is None
    assert decoder.get_buffer().nbytes == (4 << 30) - 100
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 256 * 1024, f"the program grew by {grown} KiB"


@pytest.mark.parametrize("chunk", [1, 7, HEADER_SIZE, 4096])
def test_each_header_is_checked_once_however_its_bytes_arrive(chunk: int) -> None:
    seen: list[tuple[Kind, int, int]] = []
    decoder = FrameDecoder(check=lambda kind, ident, n: seen.append((kind, ident, n)))
    frames = [(Kind.OK, 1, b"a" * 300), (Kind.ERR, 2, b""), (Kind.OK, 3, BIG)]
    data = b"".join(encode_frame(k, i, p) for k, i, p in frames)
    for off in range(0, len(data), chunk):
        decoder.feed(data[off : off + chunk])
    assert seen == [(k, i, len(p)) for k, i, p in frames]
    got = []
    while (frame := decoder.next_frame()) is not None:
        got.append((frame.kind, frame.ident, bytes(frame.payload)))
    assert got == frames


def test_a_header_the_check_refuses_raises_and_the_frames_before_it_stay() -> None:
    def check(kind: Kind, ident: int, n: int) -> None:
        if ident != 1:
            raise ProtocolError(f"unexpected {kind.name} {ident}")

    decoder = FrameDecoder(check=check)
    with pytest.raises(ProtocolError, match="unexpected OK 9"):
        decoder.feed(encode_frame(Kind.OK, 1, b"ok") + encode_frame(Kind.OK, 9, b"x"))
    frame = decoder.next_frame()
    assert frame is not None and (frame.ident, bytes(frame.payload)) == (1, b"ok")
