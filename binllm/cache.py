"""The node-local cache: its root folder and the file lock that serialises the processes filling it."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

CACHE_ENV = "BINLLM_CACHE"


def default_cache_dir() -> Path:
    """``$BINLLM_CACHE`` if set, else ``~/.cache/binllm``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "binllm"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialises the processes of one node (Ray workers, parallel jobs) that fill the same cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
