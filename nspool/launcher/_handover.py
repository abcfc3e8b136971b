"""Handing a pre-forked spare worker to a pool: one message over a stream socket.

The fork server keeps one spare worker (an init and its task loop, forked ahead of need) so
that a pool's new worker costs no fork on its critical path. When a pool asks for a worker,
the fork server sends the spare what makes it that pool's: the pool's options and setup
(pickled) and the worker's fds (task, result, stop and state, then the program's stdout and
stderr as the pool found them). The init keeps the stop and state fds and passes the rest on to
its task loop the same way.

A message is a 4-byte length, then that many bytes of pickle; the fds ride on its first bytes.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from typing import Any

_LEN = struct.Struct("=I")
#: the most fds one hand-over carries (4 of the worker's, stdout and stderr)
MAX_FDS = 6


def send(sock: socket.socket, what: Any, fds: list[int]) -> None:
    """Send ``what`` (picklable) with ``fds``; blocks until all is sent (OSError if the
    other end is gone)."""
    blob = pickle.dumps(what, pickle.HIGHEST_PROTOCOL)
    data = _LEN.pack(len(blob)) + blob
    sent = socket.send_fds(sock, [data], fds)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """Block for one message: (what, fds), or None at EOF (nobody will hand us over)."""
    # Close-on-exec, as the fork server makes a forked worker's: a program a task execs must
    # not inherit nspool's pipes.
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    try:
        if not data:
            return None
        while len(data) < _LEN.size:
            more = sock.recv(1 << 16)
            if not more:
                raise EOFError("the hand-over message ended early")
            data += more
        (size,) = _LEN.unpack_from(data)
        parts = [data[_LEN.size :]]
        got = len(parts[0])
        while got < size:
            more = sock.recv(min(size - got, 1 << 20))
            if not more:
                raise EOFError("the hand-over message ended early")
            parts.append(more)
            got += len(more)
        return pickle.loads(b"".join(parts)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def take_stdio(fds: list[int], targets: list[int]) -> None:
    """Make the received ``fds`` our stdout/stderr (``targets``: 1, 2), as the pool found
    the program's."""
    for fd, target in zip(fds, targets, strict=True):
        os.dup2(fd, target)
        os.close(fd)
