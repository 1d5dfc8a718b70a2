"""MedZone benchmarks (`make bench`): each reports ratios against a baseline run in the same process."""
