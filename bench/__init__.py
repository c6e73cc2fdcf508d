"""Benchmarks (`make bench`): each writes bench/results/<area>.json and prints a table."""
