"""Benchmarks: long runs that measure; results go to docs/ (not part of the test suite)."""
