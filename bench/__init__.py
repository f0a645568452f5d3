"""Benchmarks of the shipped models (run as scripts: python bench/NAME.py; the tests import a few of their
helpers as bench.NAME)."""
