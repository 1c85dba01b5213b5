"""`make bench`: benchmarks printing JSON, with ratios against a baseline from the same run."""
