"""The filesystem behind a store URL, through fsspec: a local folder by default (a plain path or
``file://``); ``s3://bucket/prefix`` through s3fs, its endpoint and credentials from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...) or ``storage_options``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from serving.errors import ConfigError

# Remote stores that a Store can publish to: a conditional PUT (If-Match / If-None-Match) is what
# moves CURRENT without a rename, and s3fs exposes the S3 API that has it.
OBJECT_PROTOCOLS = ("s3", "s3a")

# s3fs defaults: listings are not cached (another process publishes between two reads; a cached
# listing would hide its snapshot), and an unreachable endpoint fails in seconds, not after minutes
# of retries.
S3_DEFAULTS: dict[str, Any] = {
    "use_listings_cache": False,
    "skip_instance_cache": True,
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}},
}


def protocol(url: str | os.PathLike) -> str:
    """The URL's scheme ("file" for a plain path)."""
    text = os.fspath(url)
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def is_remote_url(url: str | os.PathLike) -> bool:
    return protocol(url) in OBJECT_PROTOCOLS


def filesystem(url: str | os.PathLike, storage_options: dict[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path in that filesystem's terms) for a store URL."""
    text = os.fspath(url)
    if not text:
        raise ConfigError("paths.store: empty")
    if "://" not in text:
        return LocalFileSystem(), str(Path(text))
    options = dict(storage_options or {})
    if is_remote_url(text):
        options = {**S3_DEFAULTS, **options}
    try:
        fs, root = fsspec.core.url_to_fs(text, **options)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"paths.store: {text}: {exc}") from None
    return fs, root.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)
