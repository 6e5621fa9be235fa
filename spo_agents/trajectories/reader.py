"""`TrajectoryLogReader`: reads a run's `trajectories/` while a trainer may be writing it
(format: docs/viewer.md)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spo_agents.trajectories.files import parse_visits, read_records, step_file, step_files
from spo_agents.trajectories.records import LOG_DIR, META, PROBLEMS, VISITS, LoggedTrajectory, Visit


class TrajectoryLogReader:
    """Reads a run's `trajectories/` while a trainer may be writing it. Step files are cached by
    (mtime, size), so repeated queries read each file once."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / LOG_DIR
        self._cache: dict[Path, tuple[tuple[int, int], list[LoggedTrajectory]]] = {}
        self._visit_cache: tuple[int, int, list[Visit]] | None = None  # inode, bytes parsed, rows

    def exists(self) -> bool:
        return (self.dir / VISITS).is_file() or bool(step_files(self.dir))

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / META).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def problem_ids(self) -> list[str] | None:
        """Training problem ids in tracker order, when the writer was given them."""
        try:
            return json.loads(gzip.decompress((self.dir / PROBLEMS).read_bytes()))
        except (OSError, EOFError, json.JSONDecodeError):
            return None

    def steps(self) -> list[int]:
        """Steps that still have a step file, ascending."""
        return sorted(step_files(self.dir))

    def read_step(self, step: int) -> list[LoggedTrajectory]:
        path = step_file(self.dir, step)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            return []
        key = (st.st_mtime_ns, st.st_size)
        hit = self._cache.get(path)
        if hit is None or hit[0] != key:
            hit = (key, [LoggedTrajectory.from_dict(d) for d in read_records(path)])
            self._cache[path] = hit
        return hit[1]

    def get(self, step: int, index: int) -> LoggedTrajectory | None:
        return next((r for r in self.read_step(step) if r.index == index), None)

    def iter_all(self) -> Iterator[LoggedTrajectory]:
        for s in self.steps():
            yield from self.read_step(s)

    def for_problem(self, problem_id: str) -> list[LoggedTrajectory]:
        """Every saved trajectory of one problem, oldest first."""
        return [r for r in self.iter_all() if r.problem_id == problem_id]

    def visits(self, problem_id: str | None = None) -> list[Visit]:
        """Rows of `visits.jsonl` (all, or one problem's), in the order written."""
        path = self.dir / VISITS
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        inode, offset, rows = self._visit_cache or (None, 0, [])
        if inode != st.st_ino or st.st_size < offset:  # a new file (rewritten on resume): read it whole
            offset, rows = 0, []
        if st.st_size > offset:  # appended since: parse only the new complete lines
            with open(path, "rb") as f:
                f.seek(offset)
                new, good = parse_visits(f.read(), path)
            rows, offset = rows + new, offset + good
        self._visit_cache = (st.st_ino, offset, rows)
        return rows if problem_id is None else [v for v in rows if v.problem_id == problem_id]
