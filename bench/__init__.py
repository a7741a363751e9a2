"""Benchmarks and the demo-world evaluation suite (results go to BENCHMARKS.md)."""
