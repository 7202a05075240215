"""Parley's load tests: Locust scenarios (locustfile.py) that ops teams run against any
deployment, and the benchmark harness (`python -m loadtests.bench`) that measures a local
topology. Method, commands and results: docs/benchmarks.md."""
