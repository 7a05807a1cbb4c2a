"""Benchmarks that print figures (``tetherlab bench raft|engine|cluster``): measurement
infrastructure, outside the product's import graph (no product module imports it)."""
