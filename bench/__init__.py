"""Benchmarks for nucleus-watcher: `python bench/run.py [--quick] [--out bench/RESULTS.md]`."""
