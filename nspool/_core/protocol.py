"""Wire protocol, sans I/O: bytes in, messages out.

Two channels exist (docs/architecture.md, "The process tree", lists every channel):

* **Data frames** travel on a pipe pair between the program and one worker: tasks one way,
  results the other. A frame is a fixed header ``(payload length, kind, ident)`` followed by the
  payload. Several frames may be written in one go (a batch of tasks); the decoder splits them.
* **Control messages** travel on the program <-> launcher SOCK_SEQPACKET socket, one message per
  packet, with file descriptors riding along as SCM_RIGHTS (the socket code handles those).

Nothing here reads or writes a file descriptor, so every rule is testable on bytes alone.
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

Payload = bytes | bytearray | memoryview | mmap.mmap

# ---------------------------------------------------------------------------------------------
# Data frames
# ---------------------------------------------------------------------------------------------

#: little-endian: payload length (u64), kind (u8), ident (u64)
HEADER = struct.Struct("<QBQ")
HEADER_SIZE = HEADER.size

#: Payloads at least this large are received into a buffer of their own (no re-copying): an
#: anonymous mapping, whose pages the kernel commits only as bytes arrive, so that a length
#: that is a lie costs nothing until it is backed by data.
BIG_PAYLOAD = 1 << 20
#: Upper bound for one frame, unless a decoder is given its own; guards against reading
#: garbage as a length.
MAX_PAYLOAD = 1 << 40

#: ``check(kind, ident, payload_length)``: called once per frame header as it is parsed, before
#: any room is made for its payload; raises ProtocolError to refuse it
HeaderCheck = Callable[["Kind", int, int], None]


class Kind(enum.IntEnum):
    """What a data frame carries."""

    TASK = 1  #: program -> worker: ident = seq, payload = pickled (fn, args, kwargs)
    INIT = 2  #: program -> worker, always first: payload = pickled (initializer, initargs) or b""
    OK = 3  #: worker -> program: ident = seq, payload = pickled result
    ERR = 4  #: worker -> program: ident = seq, payload = pickled error record
    READY = 5  #: worker -> program, after the initializer: ident = its PID as the program sees it
    INIT_FAILED = 6  #: worker -> program: payload = UTF-8 traceback of the initializer
    SKIPPED = 7  #: worker -> program: ident = seq of a task stopped before it started
    TIMED_TASK = 8  #: as TASK, the payload prefixed by the deadline in seconds (little-endian f64)
    #: worker -> program, right before a task's OK/ERR when the pool measures usage:
    #: ident = seq, payload = ``encode_usage(...)``
    USAGE = 9


_KINDS = {int(k): k for k in Kind}
_unpack_header = HEADER.unpack_from

#: A task's ``ident`` is its *seq*: 1, 2, 3... in the order the program wrote tasks to that
#: worker. Results answer in the same order, and stop requests name a task by its seq.

TIMEOUT_PREFIX = struct.Struct("<d")


class Frame(NamedTuple):
    kind: Kind
    ident: int
    payload: Payload


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or message."""


def encode_header(kind: Kind, ident: int, payload_len: int) -> bytes:
    """The header for a payload of ``payload_len`` bytes (send the payload right after it)."""
    return HEADER.pack(payload_len, kind, ident)


def encode_task_head(seq: int, payload_len: int, timeout: float | None) -> bytes:
    """What goes before a pickled task: its header, plus the deadline when it has one."""
    if timeout is None:
        return HEADER.pack(payload_len, Kind.TASK, seq)
    return HEADER.pack(payload_len + TIMEOUT_PREFIX.size, Kind.TIMED_TASK, seq) + (
        TIMEOUT_PREFIX.pack(timeout)
    )


def split_task(frame: Frame) -> tuple[float | None, memoryview]:
    """A TASK or TIMED_TASK frame's deadline (None: none) and pickled call."""
    view = memoryview(frame.payload)
    if frame.kind is Kind.TIMED_TASK:
        if len(view) < TIMEOUT_PREFIX.size:
            raise ProtocolError("TIMED_TASK frame too short for its deadline")
        return TIMEOUT_PREFIX.unpack_from(view)[0], view[TIMEOUT_PREFIX.size :]
    return None, view


#: wall, CPU user, CPU system (seconds, f64; NaN: unknown), memory peak (bytes, i64; -1: unknown)
USAGE = struct.Struct("<dddq")


def encode_usage(
    wall: float, cpu_user: float | None, cpu_system: float | None, memory_peak: int | None
) -> bytes:
    """A USAGE frame's payload."""
    nan = float("nan")
    return USAGE.pack(
        wall,
        nan if cpu_user is None else cpu_user,
        nan if cpu_system is None else cpu_system,
        -1 if memory_peak is None else memory_peak,
    )


def decode_usage(payload: Payload) -> tuple[float, float | None, float | None, int | None]:
    """(wall, CPU user, CPU system, memory peak) from a USAGE payload; None where unknown."""
    if memoryview(payload).nbytes != USAGE.size:
        raise ProtocolError(f"USAGE payload of {memoryview(payload).nbytes} bytes")
    wall, user, system, peak = USAGE.unpack(payload)
    return (
        wall,
        None if user != user else user,  # NaN
        None if system != system else system,
        None if peak < 0 else peak,
    )


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

    def __init__(
        self,
        scratch_size: int = 256 * 1024,
        *,
        max_payload: int = MAX_PAYLOAD,
        check: HeaderCheck | None = None,
    ) -> None:
        self._buf = bytearray()  # unparsed bytes of small frames
        self._frames: list[Frame] = []
        self._next = 0
        self._big: mmap.mmap | None = None  # payload of a large frame being filled in place
        self._big_filled = 0
        self._big_head: tuple[Kind, int] = (Kind.TASK, 0)
        self._scratch = bytearray(scratch_size)
        self.max_payload = max_payload
        self._check = check
        #: the header the unparsed bytes begin with was checked already (its frame was
        #: incomplete when it was first parsed)
        self._head_checked = False

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
        elif not self._buf:
            # The common case, whole small frames: parse them where they were read, and keep
            # only an incomplete tail (one copy per payload instead of three).
            pos = self._parse_from(self._scratch, 0, nbytes)
            if pos < nbytes:
                self.feed(memoryview(self._scratch)[pos:nbytes])
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
        pos = self._parse_from(self._buf, 0, len(self._buf))
        if pos:
            del self._buf[:pos]

    def _parse_from(self, buf: bytearray, pos: int, end: int) -> int:
        """Take the complete frames in ``buf[pos:end]`` (and start a big one); return where
        the unparsed rest begins."""
        frames = self._frames
        view = memoryview(buf)
        try:
            while end - pos >= HEADER_SIZE:
                length, kind_value, ident = _unpack_header(buf, pos)
                if self._head_checked:
                    self._head_checked = False
                else:
                    kind = _KINDS.get(kind_value)
                    if kind is None:
                        raise ProtocolError(
                            f"a frame header of unknown kind {kind_value} "
                            f"(bytes {bytes(view[pos : pos + 8]).hex(' ')}...)"
                        )
                    if length > self.max_payload:
                        raise ProtocolError(
                            f"a {kind.name} frame of {length} bytes, over the limit of "
                            f"{self.max_payload}"
                        )
                    if self._check is not None:
                        self._check(kind, ident, length)
                kind = _KINDS[kind_value]
                start = pos + HEADER_SIZE
                if end - start >= length:
                    frames.append(Frame(kind, ident, view[start : start + length].tobytes()))
                    pos = start + length
                elif length >= BIG_PAYLOAD:
                    # Give the payload its own buffer and fill it in place from now on.
                    self._big = _big_buffer(kind, length)
                    have = end - start
                    self._big[:have] = view[start:end]
                    self._big_filled = have
                    self._big_head = (kind, ident)
                    pos = end
                    break
                else:
                    self._head_checked = True  # parsed again once the rest is here
                    break
        finally:
            view.release()
        return pos

    def _finish_big(self) -> None:
        if self._big is not None and self._big_filled == len(self._big):
            kind, ident = self._big_head
            self._frames.append(Frame(kind, ident, self._big))
            self._big = None
            self._big_filled = 0


def _big_buffer(kind: Kind, length: int) -> mmap.mmap:
    try:
        return mmap.mmap(-1, length)
    except (OSError, OverflowError, ValueError) as exc:
        raise ProtocolError(f"no room for a {kind.name} frame of {length} bytes: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Control messages (program <-> launcher)
# ---------------------------------------------------------------------------------------------

#: kind (u8), worker id (u32), value (i64); an optional UTF-8 text follows
CONTROL = struct.Struct("<BIq")


class Ctl(enum.IntEnum):
    """Control message kinds."""

    #: launcher -> program: value = PID of the fork server (as the program sees it); on the
    #: launcher's socket once it is up, and on a pool's socket once that pool is served
    HELLO = 1
    #: launcher -> program: text = why the launcher (or, on a pool's socket, that pool) cannot
    #: be served; value = errno or 0
    ERROR = 2
    #: program -> launcher: start worker `wid`; 4 fds attached (task in, result out, stop in,
    #: state block)
    SPAWN = 3
    SPAWN_FAILED = 4  #: launcher -> program: value = errno, text = reason
    KILL = 5  #: program -> launcher: send signal `value` to worker `wid`
    EXITED = 6  #: launcher -> program: worker `wid` is gone; value = wait status | EXIT_* flags
    #: launcher -> program, instead of HELLO: the resource limits asked for can't be enforced
    #: here; value = errno, text = why and how to get them
    LIMITS_ERROR = 7
    #: program -> launcher, on the launcher's socket: serve one more pool; one fd attached (the
    #: launcher's end of that pool's own socket, where SPAWN/KILL/EXITED go); text = the pool's
    #: options as JSON. The launcher closes the pool's socket once the program shut its end
    #: and every worker of that pool is reaped.
    NEW_POOL = 8


#: EXITED flag: the worker's cgroup ran out of memory (the OOM killer acted, or the pool
#: killed the worker for it); the low 32 bits are the wait status
EXIT_MEMORY_LIMIT = 1 << 32


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


# ---------------------------------------------------------------------------------------------
# Worker messages: program -> a worker's init (its stop pipe), task loop -> init (notify pipe)
# ---------------------------------------------------------------------------------------------

#: op (u8), seq (u64), value (i64); 17 bytes, so a write is atomic (< PIPE_BUF)
INIT_MSG = struct.Struct("<BQq")


class Op(enum.IntEnum):
    """What a message to a worker's init asks."""

    STOP = 1  #: program: stop task ``seq`` (value = StopReason) if it has not finished
    SIGNAL = 2  #: program: send signal ``value`` to the task process
    DEADLINE = 3  #: task loop: task ``seq`` started; stop it at monotonic ns ``value``
    #: program: SIGTERM to the task process, then, ``value`` ns later, the whole worker is
    #: killed if it is still there (``terminate_workers()``: a task that ignores or blocks
    #: SIGTERM cannot keep its worker, or the pool's shutdown, waiting)
    TERMINATE = 4


class StopReason(enum.IntEnum):
    NONE = 0
    KILL = 1  #: the program asked (hard cancel)
    TIMEOUT = 2  #: the task ran past its deadline
    #: the init killed the worker because its notify pipe carried what the task loop never
    #: writes (a task wrote to nspool's pipe); recorded with ``stopped`` 0
    PROTOCOL = 3


class InitMsg(NamedTuple):
    op: Op
    seq: int
    value: int = 0


def encode_init_msg(msg: InitMsg) -> bytes:
    return INIT_MSG.pack(msg.op, msg.seq, msg.value)


def decode_init_msgs(data: bytes) -> tuple[list[InitMsg], bytes]:
    """Whole messages in ``data`` and the bytes left over (a message split across reads)."""
    out = []
    n = len(data) - len(data) % INIT_MSG.size
    for off in range(0, n, INIT_MSG.size):
        op, seq, value = INIT_MSG.unpack_from(data, off)
        try:
            out.append(InitMsg(Op(op), seq, value))
        except ValueError:
            raise ProtocolError(f"unknown init op {op}") from None
    return out, data[n:]


# ---------------------------------------------------------------------------------------------
# A worker's state block: one small shared-memory file per worker (a memfd the program makes),
# mapped by the program, the worker's init and its task loop; an array of native u64 words
# ---------------------------------------------------------------------------------------------
#
#   word 0   started   seq << 1 | running: the task loop stores it just before a task runs and
#                      again (running = 0) just after it returns; seqs only grow
#   word 1   recorded  1 once the init stored the three words below (it then exits)
#   word 2   status    the task loop's wait status
#   word 3   stopped   seq of the task the init stopped (0: none)
#   word 4   reason    why (StopReason)
#   word 5   fault     why the task loop gave up, if it did (LoopFault): it sets it itself
#   word 8.. doomed    slot ``8 + seq % STATE_SLOTS`` holds ``seq`` if that task must be skipped
#
# Every access is one aligned 8-byte load or store (memoryview items), so no word is ever
# seen half-written. The init decides anything from the block only while the task loop is
# stopped (SIGSTOP + waitpid) or dead, and the program reads it once every process of the
# worker is gone.

_HEADER_WORDS = 8
#: doom slots: more than the tasks one worker may hold (PoolCore caps ``max_batch`` below it)
STATE_SLOTS = 4096
STATE_SIZE = 8 * (_HEADER_WORDS + STATE_SLOTS)


class LoopFault(enum.IntEnum):
    """Why a task loop ended a worker itself (its state block's word 5)."""

    NONE = 0
    #: a task closed or replaced one of nspool's pipes (its result would go nowhere)
    PIPES = 1
    #: the task pipe carried what the program never writes: a task read from it, or wrote
    TASK_STREAM = 2
    #: a task undid the worker's private /proc, and it could not be mounted again
    PRIVATE_PROC = 3


class ExitRecord(NamedTuple):
    """What the program learns from a dead worker's state block."""

    started: int  #: seq of the last task the loop started (0: none)
    running: bool  #: whether that task was still running
    status: int | None  #: the task loop's wait status, if the init recorded it
    stopped: int  #: seq of the task the init stopped on request or deadline (0: none)
    reason: StopReason
    fault: LoopFault = LoopFault.NONE  #: why the task loop ended the worker itself


class StateBlock:
    """Typed access to a worker's state block (``buf``: a writable buffer of STATE_SIZE)."""

    __slots__ = ("words",)

    def __init__(self, buf: Any) -> None:
        self.words = memoryview(buf).cast("B").cast("Q")
        if len(self.words) * 8 < STATE_SIZE:
            raise ValueError(f"state block of {len(self.words) * 8} bytes, need {STATE_SIZE}")

    def release(self) -> None:
        """Drop the view (the mapping under it can then be closed)."""
        self.words.release()

    def set_started(self, seq: int, running: bool) -> None:
        self.words[0] = seq << 1 | running

    def started(self) -> tuple[int, bool]:
        word = self.words[0]
        return word >> 1, bool(word & 1)

    def doom(self, seq: int) -> None:
        self.words[_HEADER_WORDS + seq % STATE_SLOTS] = seq

    def is_doomed(self, seq: int) -> bool:
        return bool(self.words[_HEADER_WORDS + seq % STATE_SLOTS] == seq)

    def write_record(self, status: int, stopped: int, reason: StopReason) -> None:
        w = self.words
        w[2], w[3], w[4] = status & 0xFFFFFFFF, stopped, int(reason)
        w[1] = 1

    def set_fault(self, fault: LoopFault) -> None:
        self.words[5] = int(fault)

    def read_record(self) -> ExitRecord:
        started, running = self.started()
        w = self.words
        try:
            fault = LoopFault(w[5])
        except ValueError:
            fault = LoopFault.NONE
        if not w[1]:
            return ExitRecord(started, running, None, 0, StopReason.NONE, fault)
        try:
            reason = StopReason(w[4])
        except ValueError:
            reason = StopReason.NONE
        return ExitRecord(started, running, w[2], w[3], reason, fault)
