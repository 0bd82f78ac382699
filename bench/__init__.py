"""Benchmark harness for kushi: ``python -m bench.run`` (see bench/README.md)."""
