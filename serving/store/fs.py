"""The filesystem behind a store URL, through fsspec: a local folder by default (a plain path or
``file://``); other protocols (``s3://bucket/prefix``) resolve the same way."""
from __future__ import annotations

import os
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from serving.errors import ConfigError


def filesystem(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path in that filesystem's terms) for a store URL."""
    text = os.fspath(url)
    if not text:
        raise ConfigError("paths.store: empty")
    if "://" not in text:
        return LocalFileSystem(), str(Path(text))
    try:
        fs, root = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"paths.store: {text}: {exc}") from None
    return fs, root.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)
