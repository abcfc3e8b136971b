"""The program side of the pool's machinery, one concern per module.

- ``protocol``: sans-I/O: data frames, control and init messages, the worker's state block
- ``pool``: ``PoolCore``, scheduling and the task state table; no I/O, threads or clocks
- ``driver``: ``PoolDriver``, the non-blocking fd plumbing both fronts share
- ``io_thread``: the executor's I/O thread and its waiting readers (leader/follower)
- ``launcher_link``: start a launcher, open a pool on it, spawn and kill workers
- ``shared_launcher``: the program's one shared launcher, or a pool's own
- ``serialize``, ``task_errors``: cloudpickle in and out, and worker-side pickling errors
- ``chunks``, ``usage``, ``sizes``: ``map``'s chunk task, ``TaskUsage``, byte sizes

Imports nothing: the launcher imports some of these modules and must start fast (no
concurrent.futures, multiprocessing or anyio there).
"""
