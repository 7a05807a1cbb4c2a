"""Tests that drive the real coding agents (see README.md)."""
