"""Performance benchmarks (not tests): `python -m benchmarks` writes benchmarks/results.md (issue 8).

Timings on a shared CPU are noisy, so every comparison is a ratio of medians taken interleaved (A, B, A, B, ...)
with a fixed thread count; absolute seconds are reported only beside the ratios.
"""
