"""cgroups for nspool: resource limits per worker and what each task used.

One concern: files under a cgroup filesystem. No threads, no forking, no knowledge of the pool;
the launcher and its fork server (root, or the owner of a user namespace) drive it:

    # the outer launcher (launcher/__main__.py), before the namespaces:
    layout = detect_layout()
    remove_stale(layout)                       # subtrees of launchers killed with SIGKILL
    cg = PoolCgroups(required, ("memory", "cpuacct"), limits=limits, layout=layout)
                                               # makes nspool-<pid>-<hex> in each hierarchy
    # the fork server (launcher/_forkserver.py), per worker:
    w = cg.create_worker(serial)               # a cgroup per worker, the pool's limits set
    efd = cg.watch_oom(w)                      # v1: an eventfd to poll for OOM (v2: None)
    cg.attach(w)                               # in the worker's init, before it forks
    # the worker's task process (launcher/_taskloop.py), around each task:
    meter = cg.meter(w)
    meter.reset_peak(); before = meter.read()
    ...; after = meter.read()                  # CPU time, memory peak, OOM kills
    # the fork server, once the worker is gone:
    cg.oom_killed(w)                           # was it the OOM killer?
    cg.remove(w, timeout=0)                    # retried later while the kernel holds it
    # the outer launcher, once the fork server is gone:
    remove_pool(cg.name, cg.layout)            # the whole subtree, killing what is left

``required`` is the controllers the limits need, and ``cpuacct`` with ``track_usage``; the
optional ones are used where they work. Nothing asked for is silently dropped: a required
controller that can't be used raises ``CgroupUnavailableError`` saying why and how to get one.
Usage figures that can't be read (an accounting controller that isn't there) are ``None``.

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
