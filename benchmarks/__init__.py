"""Performance harness for kdiga (design.md §8); results are appended to BENCHMARKS.md.

Run `python -m benchmarks.run [--quick] [--cases step,attack,api,flops] [--out BENCHMARKS.md]`.
Every comparison is a ratio taken in the same run, after warm-up, as the median of repeats.
"""
