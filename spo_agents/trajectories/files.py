"""The trajectory log's files: gzip JSONL step files written atomically, the visits file's rows
and header, and the older sample's key (format: docs/viewer.md)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spo_agents.errors import TrajectoryError
from spo_agents.files import complete_lines, write_text_atomic
from spo_agents.trajectories.records import SCHEMA_VERSION, VISIT_COLUMNS, Visit

_STEP_FILE = re.compile(r"^step-(\d{6,})\.jsonl\.gz$")


def step_file(log_dir: Path, step: int) -> Path:
    return log_dir / f"step-{step:06d}.jsonl.gz"


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(path, gzip.compress(text.encode("utf-8"), compresslevel=6, mtime=0))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a step file; [] when it vanished (thinned away while we looked)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    except (OSError, EOFError, json.JSONDecodeError) as e:
        raise TrajectoryError(
            f"`{path}` is not a readable trajectory log file ({e}); delete it to drop that step"
        ) from e


def step_files(log_dir: Path) -> dict[int, Path]:
    if not log_dir.is_dir():
        return {}
    out = {}
    for p in log_dir.iterdir():
        m = _STEP_FILE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def sample_key(seed: int, step: int, index: int) -> float:
    """The trajectory's key u in [0, 1) for the older sample (docs/viewer.md)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def visit_row(v: Visit) -> str:
    row = [v.step, v.index, v.problem_id, v.reward, v.correct, v.v_hat_before, v.rho, v.advantage, v.policy_version]
    return json.dumps(row, ensure_ascii=False)


def parse_visits(data: bytes, path: Path) -> tuple[list[Visit], int]:
    """Visits in `data` and the byte length of its complete lines (a torn tail is left out)."""
    good = complete_lines(data)
    visits = []
    for n, line in enumerate(data[:good].decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrajectoryError(f"{path}:{n + 1}: not valid JSON ({e})") from e
        if isinstance(row, dict):  # the header
            version = row.get("schema_version")
            if not isinstance(version, int) or version > SCHEMA_VERSION:
                raise TrajectoryError(
                    f"`{path}` has schema version {version!r}; this spo-agents reads up to {SCHEMA_VERSION}: upgrade it"
                )
            continue
        s, i, pid, r, c, v, rho, a, pv = row
        visits.append(Visit(int(s), int(i), str(pid), float(r), bool(c), float(v), float(rho), float(a), int(pv)))
    return visits, good


def visits_header() -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "columns": list(VISIT_COLUMNS)})
