"""SSH key files: new key pairs for hosts, admins and test developers, and reading the public
line of a private key. Key parsing and the registry's record format are in
``tetherlab.cluster.node.keys``."""

from __future__ import annotations

from pathlib import Path

import asyncssh

from tetherlab.cluster.ops.config import write_private, write_text_atomic


def generate_key_pair(private_path: Path, comment: str) -> str:
    """Write a new ed25519 private key (0600) and its ``.pub``; return the public line."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(private_path, key.export_private_key("openssh"))
    pub = key.export_public_key("openssh").decode().strip()
    write_text_atomic(private_path.with_name(private_path.name + ".pub"), pub + "\n")
    return pub


def public_line_of(private_path: Path) -> str:
    key = asyncssh.read_private_key(str(private_path))
    return key.export_public_key("openssh").decode().strip()
