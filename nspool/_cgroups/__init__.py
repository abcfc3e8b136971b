"""cgroups for nspool: resource limits per worker and what each task used.

One concern: files under a cgroup filesystem. No threads, no forking, no knowledge of the pool;
the launcher and its fork server (root, or the owner of a user namespace) drive it:

    limits = Limits.parse(memory_limit="512M", pids_limit=64, cpu_limit=0.5)  # ValueError early
    cg = PoolCgroups.for_limits(limits)        # makes nspool-<pid>-<hex> in each hierarchy
    w = cg.create_worker(1)                    # a cgroup per worker, the pool's limits set
    cg.attach(w, pid)                          # right after fork, before the child runs code
    cg.reset_peak(w); before = cg.usage(w)     # around each task
    ...; spent = cg.usage(w).since(before)
    cg.oom_killed(w)                           # after the worker died: was it the OOM killer?
    cg.remove(w)                               # when the worker is gone (waits until empty)
    cg.close()                                 # at shutdown: the whole subtree

Nothing asked for is silently dropped: a limit whose controller can't be used raises
``CgroupUnavailableError`` saying why and how to get one. Usage figures that can't be read
(an accounting controller that isn't there) are ``None``.

The modules, each importing only those above it:

- ``errors``: the layer's exceptions (``nspool.errors`` re-exports ``CgroupUnavailableError``)
- ``limits``: ``Limits``, and the parsers of ``memory_limit``, ``pids_limit``, ``cpu_limit``
- ``layout``: which hierarchy serves each controller (mounts, ``/proc/self/cgroup``), and
  where a pool's node may go (placement, ``check``)
- ``worker``: ``WorkerCgroup``, a worker's cgroup, and what it used (``Usage``, ``UsageMeter``)
- ``removal``: removing cgroups, and the subtrees of launchers that are gone
- ``pool``: ``PoolCgroups``, a pool's subtree and its workers' cgroups

This file imports nothing, so that ``nspool.errors`` gets its exception without the layer.
"""
