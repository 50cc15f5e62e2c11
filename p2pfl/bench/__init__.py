"""Benchmarks of the live network, run by scripts/bench_network.py (``make bench``)."""
