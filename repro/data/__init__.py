"""Datasets: the embedded procedural data, sklearn digits, and real datasets by path."""
