"""`tether`: the shim that wraps a coding agent (client side of Tetherlab)."""
