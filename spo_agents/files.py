"""Files that readers may see while they are written: atomic replacement, fsync helpers, and
JSON-lines files whose last line a crash may have cut off mid-write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spo_agents.errors import SPOError


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """Replace `path` with `text` (str as UTF-8, or bytes) so readers see the old or the new
    content, never a mix: a temporary sibling is written, fsync'ed and renamed into place."""
    path = Path(path)
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def complete_lines(data: bytes) -> int:
    """The byte length of `data`'s complete lines: up to and including its last newline. What
    follows is a torn tail when a writer was cut off mid-append (or is still appending)."""
    return len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1


def read_jsonl_records(path: str | Path, error: type[Exception] = SPOError) -> Iterator[Any]:
    """The JSON value of each line of a JSON-lines file, in order; blank lines are skipped.

    A last line without its newline that is not valid JSON was cut off by a crash while it was
    appended, and is skipped; any other line that is not JSON raises `error` naming the file and
    line. The file is read whole before the first value is returned."""
    with open(path, "rb") as f:
        data = f.read()
    good = complete_lines(data)
    lines = data[:good].splitlines()
    for n, raw in enumerate([*lines, data[good:]], start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            if n > len(lines):  # the torn tail
                return
            raise error(f"{path}:{n}: not valid JSON ({e}); the file is damaged beyond its last line") from e
        yield value


def repair_torn_tail(path: str | Path) -> None:
    """End a JSON-lines file on a newline so appended records start on a line of their own: a last
    line cut off mid-write is dropped, a complete one only gets its newline."""
    path = Path(path)
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = complete_lines(data)
    try:
        json.loads(data[cut:])
    except ValueError:
        write_text_atomic(path, data[:cut])
    else:
        with open(path, "ab") as f:
            f.write(b"\n")
