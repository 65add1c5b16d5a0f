"""Benchmarks: what experiments/bench_*.py measure, how they render it (README tables, plots) and write it
(results.json) into benchmarks/<name>/. One module per script, each a set of plain functions (`run`,
`render`) taking the script's options as arguments; common.py holds what they share.

The top layer: it may import anything in jaxpar, and nothing in jaxpar imports it.
"""
