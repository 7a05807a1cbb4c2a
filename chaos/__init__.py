"""Fault injection: toxiproxy-compatible proxies, kernel partitions, nemeses, history checkers,
and ``sim``: the deterministic simulation of the whole cluster in one process."""
