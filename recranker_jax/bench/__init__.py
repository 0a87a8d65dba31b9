"""Benchmarks behind `recranker bench`: fixed, named problems timed the same way everywhere."""
