"""Writing files and directories that nobody sees half written (a reader, another process, the next run
after a crash or Ctrl-C): everything goes to a temporary sibling first, which is renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path to write the file to: moved onto `path` on success, removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: dict) -> None:
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A fresh temporary directory to fill: on success it replaces `path` (and whatever was there) and is
    synced to disk; on failure it is removed."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        sync_directory(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # swap, then delete the old one
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """fsync a directory's files and the directory itself (its entries), so a rename survives a power loss."""
    for file in [*path.iterdir(), path] if path.is_dir() else []:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
