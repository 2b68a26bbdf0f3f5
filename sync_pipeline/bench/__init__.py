"""Benchmarks of the sandbox and the pipeline (run them via ``sync-pipeline bench-*``)."""
