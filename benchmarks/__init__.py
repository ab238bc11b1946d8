"""Benchmarks of iot-ingest (``python -m benchmarks.drain``, ``python -m benchmarks.latency``).

Not part of the installed package: run them from a checkout. See ``benchmarks/README.md``.
"""
