"""Wire protocol, sans I/O: bytes in, messages out.

Two channels exist (see DESIGN.md):

* **Data frames** travel on a pipe pair between the program and one worker: tasks one way,
  results the other. A frame is a fixed header ``(payload length, kind, ident)`` followed by the
  payload. Several frames may be written in one go (a batch of tasks); the decoder splits them.
* **Control messages** travel on the program <-> launcher SOCK_SEQPACKET socket, one message per
  packet, with file descriptors riding along as SCM_RIGHTS (the socket code handles those).

Nothing here reads or writes a file descriptor, so every rule is testable on bytes alone.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

Payload = bytes | bytearray | memoryview

# ---------------------------------------------------------------------------------------------
# Data frames
# ---------------------------------------------------------------------------------------------

#: little-endian: payload length (u64), kind (u8), ident (u64)
HEADER = struct.Struct("<QBQ")
HEADER_SIZE = HEADER.size

#: Payloads at least this large are received into a buffer of their own (no re-copying).
BIG_PAYLOAD = 1 << 20
#: Upper bound for one frame; guards against reading garbage as a length.
MAX_PAYLOAD = 1 << 40


class Kind(enum.IntEnum):
    """What a data frame carries."""

    TASK = 1  #: program -> worker: ident = task id, payload = pickled (fn, args, kwargs)
    INIT = 2  #: program -> worker: payload = pickled (initializer, initargs)
    OK = 3  #: worker -> program: ident = task id, payload = pickled result
    ERR = 4  #: worker -> program: ident = task id, payload = pickled error record
    READY = 5  #: worker -> program: ident = the worker's PID as the program sees it
    INIT_FAILED = 6  #: worker -> program: payload = UTF-8 traceback of the initializer


class Frame(NamedTuple):
    kind: Kind
    ident: int
    payload: Payload


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or message."""


def encode_header(kind: Kind, ident: int, payload_len: int) -> bytes:
    """The header for a payload of ``payload_len`` bytes (send the payload right after it)."""
    return HEADER.pack(payload_len, kind, ident)


def encode_frame(kind: Kind, ident: int, payload: Payload = b"") -> bytes:
    """One whole frame as bytes; for large payloads prefer ``encode_header`` plus writev."""
    # nbytes, not len(): a memoryview of wider items has fewer items than bytes.
    return HEADER.pack(memoryview(payload).nbytes, kind, ident) + payload


class FrameDecoder:
    """Incremental frame parser.

    Feed it bytes with :meth:`feed`, or let it hand out the buffer to read into with
    :meth:`get_buffer` / :meth:`buffer_updated` (the asyncio ``BufferedProtocol`` pattern), which
    lets a large payload be read straight into its final buffer. Complete frames are taken out
    with :meth:`next_frame` in order.
    """

    def __init__(self, scratch_size: int = 256 * 1024) -> None:
        self._buf = bytearray()  # unparsed bytes of small frames
        self._frames: list[Frame] = []
        self._next = 0
        self._big: bytearray | None = None  # payload of a large frame being filled in place
        self._big_filled = 0
        self._big_head: tuple[Kind, int] = (Kind.TASK, 0)
        self._scratch = bytearray(scratch_size)

    # -- input --------------------------------------------------------------------------------
    def feed(self, data: Payload) -> None:
        """Add received bytes."""
        view = memoryview(data)
        while len(view):
            if self._big is not None:
                take = min(len(view), len(self._big) - self._big_filled)
                self._big[self._big_filled : self._big_filled + take] = view[:take]
                self._big_filled += take
                view = view[take:]
                self._finish_big()
            else:
                self._buf += view
                view = view[len(view) :]
                self._parse()

    def get_buffer(self) -> memoryview:
        """A writable buffer to receive the next bytes into; then call :meth:`buffer_updated`."""
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the buffer from :meth:`get_buffer`."""
        if self._big is not None:
            self._big_filled += nbytes
            self._finish_big()
        else:
            self.feed(memoryview(self._scratch)[:nbytes])

    # -- output -------------------------------------------------------------------------------
    def next_frame(self) -> Frame | None:
        """The oldest complete frame not yet taken, or ``None``."""
        if self._next < len(self._frames):
            frame = self._frames[self._next]
            self._next += 1
            if self._next == len(self._frames):
                self._frames.clear()
                self._next = 0
            return frame
        return None

    def has_frame(self) -> bool:
        """Whether :meth:`next_frame` would return a frame."""
        return self._next < len(self._frames)

    @property
    def pending_bytes(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        if self._big is None:
            return len(self._buf)
        return HEADER_SIZE + self._big_filled

    # -- internals ----------------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            length, kind, ident = HEADER.unpack_from(buf, pos)
            try:
                kind = Kind(kind)
            except ValueError:
                raise ProtocolError(f"unknown frame kind {kind}") from None
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame length {length} is too large")
            start = pos + HEADER_SIZE
            if end - start >= length:
                self._frames.append(Frame(kind, ident, bytes(buf[start : start + length])))
                pos = start + length
            elif length >= BIG_PAYLOAD:
                # Give the payload its own buffer and fill it in place from now on.
                self._big = bytearray(length)
                have = end - start
                self._big[:have] = buf[start:end]
                self._big_filled = have
                self._big_head = (kind, ident)
                pos = end
                break
            else:
                break
        if pos:
            del buf[:pos]

    def _finish_big(self) -> None:
        if self._big is not None and self._big_filled == len(self._big):
            kind, ident = self._big_head
            self._frames.append(Frame(kind, ident, self._big))
            self._big = None
            self._big_filled = 0


# ---------------------------------------------------------------------------------------------
# Control messages (program <-> launcher)
# ---------------------------------------------------------------------------------------------

#: kind (u8), worker id (u32), value (i64); an optional UTF-8 text follows
CONTROL = struct.Struct("<BIq")


class Ctl(enum.IntEnum):
    """Control message kinds."""

    HELLO = 1  #: launcher -> program: value = PID of the fork server (as the program sees it)
    ERROR = 2  #: launcher -> program: text = why the launcher cannot serve (then it exits)
    SPAWN = 3  #: program -> launcher: start worker `wid`; 2 fds attached (task in, result out)
    SPAWN_FAILED = 4  #: launcher -> program: value = errno, text = reason
    KILL = 5  #: program -> launcher: send signal `value` to worker `wid`
    EXITED = 6  #: launcher -> program: worker `wid` is gone with wait status `value`


class Control(NamedTuple):
    kind: Ctl
    wid: int
    value: int = 0
    text: str = ""


def encode_control(msg: Control) -> bytes:
    """One control message as the bytes of one packet."""
    return CONTROL.pack(msg.kind, msg.wid, msg.value) + msg.text.encode("utf-8", "replace")


def decode_control(packet: bytes) -> Control:
    """Parse one control packet."""
    if len(packet) < CONTROL.size:
        raise ProtocolError(f"control packet of {len(packet)} bytes is too short")
    kind, wid, value = CONTROL.unpack_from(packet)
    try:
        ctl = Ctl(kind)
    except ValueError:
        raise ProtocolError(f"unknown control kind {kind}") from None
    return Control(ctl, wid, value, packet[CONTROL.size :].decode("utf-8", "replace"))
