"""The commands of ``python -m nspool`` (``nspool/__main__.py``), each run on demand.

- ``doctor``: what this machine allows, tried live, and how to fix what it does not
- ``demo``: isolated workers, and a leaked daemon torn down with its task
- ``bench``: what isolation costs here, against ``ProcessPoolExecutor`` (standard library only)
- ``bench_probe``: one spawn mechanism timed in a fresh single-threaded interpreter (for
  ``bench`` and ``benchmarks/bench_isolation.py``)
"""
