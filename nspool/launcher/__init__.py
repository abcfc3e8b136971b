"""The launcher: an exec'd, single-threaded fork server (``python -m nspool.launcher``).

Its pieces, one concern each: ``_syscalls`` (unshare/setns/prctl/mount), ``_forkserver``
(PID 1 of the pool namespace, forks workers), ``_worker`` (PID 1 of a worker namespace, runs
tasks), and ``__main__`` (the outer process: creates the pool namespace, explains failures).
"""
