"""perft-jax benchmark suite; run `python -m benchmarks.run --help` (results: benchmarks/RESULTS.md)."""
