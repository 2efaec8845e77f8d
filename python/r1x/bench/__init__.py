"""Microbenchmarks of r1x's op families against baselines (``r1x bench``; the scripts in
``benchmarks/`` call these). Each writes a table, JSON and a PNG plot."""
