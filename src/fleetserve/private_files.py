"""Files only this user may read: state and cache files that hold prompts, answers, worker lists or keys."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600


def make_private(path: str | Path) -> Path:
    """Create ``path`` (and its folder) readable and writable by its owner only, or narrow an existing file to
    that. SQLite creates its journal and WAL files with the database file's permissions, so they follow."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)
    return path
