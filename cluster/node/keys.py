"""SSH keys: parsing what operators paste, fingerprints, host keys, and the replicated key
registry's record format (namespace ``keys`` of the state machine, one record per key)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import asyncssh

KEYS_NS = "keys"
DEVELOPER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the shim protocol's developer names
ROLES = ("developer", "admin", "verifier")  # verifier: a git server's key, push verification only
_KEY_TYPES = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+@openssh\.com)$")


class KeyError_(ValueError):
    """Returned when a public key or a key registry entry is malformed; the message says why."""


@dataclass(frozen=True)
class RegisteredKey:
    id: str  # OpenSSH SHA256 fingerprint, "SHA256:..."
    developer: str
    role: str
    public_key: str  # "type base64", no comment
    comment: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "developer": self.developer, "role": self.role,
                "public_key": self.public_key, "comment": self.comment}

    def encode(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def decode(cls, raw: str) -> RegisteredKey:
        d = json.loads(raw)
        return cls(d["id"], d["developer"], d["role"], d["public_key"], d.get("comment", ""))


def parse_public_key(text: str) -> tuple[asyncssh.SSHKey, str, str]:
    """Parse a ``.pub`` file or an ``authorized_keys`` line (options allowed).

    Returns (key, "type base64", comment)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 1:
        raise KeyError_(f"expected exactly one public key line, got {len(lines)}")
    tokens = lines[0].split()
    for i, tok in enumerate(tokens[:-1]):
        if _KEY_TYPES.match(tok):
            blob = f"{tok} {tokens[i + 1]}"
            comment = " ".join(tokens[i + 2 :])
            try:
                key = asyncssh.import_public_key(blob)
            except (asyncssh.KeyImportError, ValueError) as e:
                raise KeyError_(f"not a valid {tok} public key: {e}") from None
            return key, blob, comment
    raise KeyError_("no public key found: expected a line like 'ssh-ed25519 AAAA... comment'")


def fingerprint(key: asyncssh.SSHKey) -> str:
    return str(key.get_fingerprint("sha256"))


def make_registered(developer: str, role: str, text: str) -> RegisteredKey:
    if not DEVELOPER_RE.match(developer):
        raise KeyError_(f"developer name {developer!r} must match {DEVELOPER_RE.pattern}")
    if role not in ROLES:
        raise KeyError_(f"role must be one of {ROLES}, got {role!r}")
    key, blob, comment = parse_public_key(text)
    return RegisteredKey(fingerprint(key), developer, role, blob, comment)
