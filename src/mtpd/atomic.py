"""Writing files and directories that nobody sees half written (a reader, another process, the next run
after a crash or Ctrl-C): everything goes to a temporary sibling first, which is renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path to write the file to: moved onto `path` on success, removed on failure (with the
    directories made for it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with discarded_on_failure(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
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
    synced to disk; on failure it is removed (with the directories made for it)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with discarded_on_failure(tmp.parent):
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


@contextmanager
def discarded_on_failure(directory: Path, disposable: tuple[str, ...] = ()) -> Iterator[None]:
    """For work that may create `directory` (and its missing parents) and write into it: if the work fails
    while the directory holds nothing but the `disposable` files (relative paths: a record of the attempt,
    worthless without its results), those files, if the work wrote them, and the directories it created are
    removed again. So a command that fails before saving anything leaves no trace; a directory that existed
    before is kept, and one that holds anything else is not touched at all."""
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    written = [directory / name for name in disposable if not (directory / name).exists()]
    try:
        yield
    except BaseException:
        with suppress(OSError):  # tidying up must not hide why the work failed
            if (created or written) and not _holds_more_than(directory, disposable):
                for file in written:
                    file.unlink(missing_ok=True)
                inside = [Path(root) for root, _, _ in os.walk(directory, topdown=False)] if created else []
                _remove_empty([*inside, *created[1:]])
        raise


def _holds_more_than(directory: Path, names: tuple[str, ...]) -> bool:
    return any((p.is_symlink() or not p.is_dir()) and p.relative_to(directory).as_posix() not in names
               for p in directory.rglob("*"))


def _remove_empty(directories: list[Path]) -> None:
    """rmdir each in turn (children before parents), stopping at the first that is not empty."""
    for folder in directories:
        try:
            folder.rmdir()  # only ever removes an empty directory
        except OSError:
            return


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
