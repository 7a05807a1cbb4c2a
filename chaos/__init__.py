"""Fault injection: toxiproxy-compatible proxies, kernel partitions, nemeses, history checkers."""
