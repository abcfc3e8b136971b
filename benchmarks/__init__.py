"""nspool's benchmark suite: ``python -m benchmarks.run [--quick] [--only NAME ...]``.

See ``benchmarks/README.md`` for the method.
"""
