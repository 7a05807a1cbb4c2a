"""Configuration files on disk: loading node and cluster files, writing files atomically, the
cluster secret. The typed model and its validation are ``tetherlab.cluster.core.config``."""

from __future__ import annotations

import os
import secrets
import tomllib
from pathlib import Path
from typing import Any

from tetherlab.cluster.core.config import (
    SECRET_BYTES,
    ClusterFile,
    ConfigError,
    NodeConfig,
    parse_cluster_file,
    parse_node_config,
)


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def load_node_config(path: str | Path) -> NodeConfig:
    path = Path(path)
    return parse_node_config(_load_toml(path), path)


def load_cluster_file(path: str | Path) -> ClusterFile:
    path = Path(path)
    return parse_cluster_file(_load_toml(path), path)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def new_secret() -> bytes:
    return secrets.token_hex(SECRET_BYTES).encode() + b"\n"


def read_secret(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"cluster secret {path} does not exist: the node refuses to start without it") from None
    if st.st_mode & 0o077:
        mode = oct(st.st_mode & 0o777)
        raise ConfigError(f"cluster secret {path} is readable by group or others (mode {mode}); chmod 600 it")
    secret = path.read_bytes().strip()
    if len(secret) < SECRET_BYTES:
        raise ConfigError(f"cluster secret {path} is too short: need at least {SECRET_BYTES} bytes of entropy")
    return secret
