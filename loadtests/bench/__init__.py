"""The benchmark harness: `python -m loadtests.bench` (see __main__.py and docs/benchmarks.md)."""
