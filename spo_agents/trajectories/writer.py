"""`TrajectoryLog`: writes a run's `trajectories/` during training, bounded by a window of whole
steps and a seeded bottom-k sample of older ones, safe against crashes and resumes (format and
guarantees: docs/viewer.md)."""

from __future__ import annotations

import gzip
import heapq
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spo_agents.errors import ConfigError
from spo_agents.files import write_text_atomic
from spo_agents.trajectories.files import (
    parse_visits,
    read_records,
    sample_key,
    step_file,
    step_files,
    visit_row,
    visits_header,
    write_records,
)
from spo_agents.trajectories.records import LOG_DIR, META, PROBLEMS, SCHEMA_VERSION, VISITS, Visit, make_record


class TrajectoryLog:
    """Writes `RUN_DIR/trajectories/` (docs/viewer.md); one instance per training process.

    `start_step` is the step the run continues from (0 for a new run, the checkpoint's step on
    resume): anything logged for later steps is dropped. `problem_ids` (tracker order) is
    written once so readers can name every problem.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep_last_steps: int = 20,
        older_sample: float = 0.1,
        older_max: int = 5000,
        seed: int = 0,
        save_logprobs: bool = False,
        start_step: int = 0,
        problem_ids: Sequence[str] | None = None,
        save_trajectories: bool = True,
    ) -> None:
        if keep_last_steps < 1:
            raise ConfigError(f"`keep_last_steps` must be >= 1 (steps kept whole), got {keep_last_steps}")
        if not 0.0 <= older_sample <= 1.0:
            raise ConfigError(f"`older_sample` must be in [0, 1] (share of older ones kept), got {older_sample}")
        if older_max < 0:
            raise ConfigError(f"`older_max` must be >= 0 (trajectories kept from older steps), got {older_max}")
        self.dir = Path(run_dir) / LOG_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_last_steps = int(keep_last_steps)
        self.older_sample = float(older_sample)
        self.older_max = int(older_max)
        self.seed = int(seed)
        self.save_logprobs = bool(save_logprobs)
        self.save_trajectories = bool(save_trajectories)  # False: only the per-visit log
        self.last_step = int(start_step)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "keep_last_steps": self.keep_last_steps,
            "older_sample": self.older_sample,
            "older_max": self.older_max,
            "seed": self.seed,
            "save_logprobs": self.save_logprobs,
        }
        write_text_atomic(self.dir / META, (json.dumps(meta, indent=2) + "\n").encode())
        if problem_ids is not None:
            ids = json.dumps(list(problem_ids), ensure_ascii=False).encode()
            write_text_atomic(self.dir / PROBLEMS, gzip.compress(ids, mtime=0))
        self._pool: list[tuple[float, int, int]] = []  # max-heap of older kept (-u, step, index)
        self._truncate(self.last_step)
        self._visits = open(self.dir / VISITS, "a", encoding="utf-8")  # noqa: SIM115 - kept open across steps
        if self._visits.tell() == 0:
            self._visits.write(visits_header() + "\n")
            self._visits.flush()
        self._tail = sorted(s for s in step_files(self.dir) if s > self.last_step - self.keep_last_steps)
        self._thin(sorted(s for s in step_files(self.dir) if s <= self.last_step - self.keep_last_steps))

    # -- opening ----------------------------------------------------------------------------
    def _truncate(self, start_step: int) -> None:
        """Drop the torn last visit line and everything logged for steps after `start_step`."""
        for step, path in step_files(self.dir).items():
            if step > start_step:
                path.unlink(missing_ok=True)
        for p in self.dir.glob(".step-*"):  # temporaries of an interrupted write
            p.unlink(missing_ok=True)
        path = self.dir / VISITS
        if not path.is_file():
            return
        data = path.read_bytes()
        visits, good = parse_visits(data, path)
        keep = [v for v in visits if v.step <= start_step]
        if good == len(data) and len(keep) == len(visits):
            return
        write_text_atomic(
            path, "".join(line + "\n" for line in [visits_header(), *map(visit_row, keep)]).encode("utf-8")
        )

    # -- writing ----------------------------------------------------------------------------
    def record(
        self,
        step: int,
        trajectories: Sequence[Any],
        advantages: Any,
        v_hat_before: Any,
        rho: Any,
        tokenizer: Any = None,
    ) -> None:
        """Log the batch the learner trained on at `step` (one value per trajectory in
        `advantages`, `v_hat_before` and `rho`)."""
        n = len(trajectories)
        cols = {"advantages": advantages, "v_hat_before": v_hat_before, "rho": rho}
        lists = {k: [float(x) for x in (v if v is not None else [math.nan] * n)] for k, v in cols.items()}
        bad = {k: len(v) for k, v in lists.items() if len(v) != n}
        if bad:
            got = ", ".join(f"{len_} for `{k}`" for k, len_ in bad.items())
            raise ConfigError(f"`record` needs one value per trajectory ({n}): got {got}")
        if step <= self.last_step:
            raise ConfigError(
                f"`record` got step {step} after step {self.last_step}; steps must increase "
                "(open the log with `start_step` on resume)"
            )
        adv, vb, rho_ = lists["advantages"], lists["v_hat_before"], lists["rho"]
        records = [
            make_record(
                t,
                step=step,
                index=i,
                batch_size=n,
                advantage=adv[i],
                v_hat_before=vb[i],
                rho=rho_[i],
                tokenizer=tokenizer,
                logprobs=self.save_logprobs,
            )
            for i, t in enumerate(trajectories)
        ]
        if records and self.save_trajectories:
            write_records(step_file(self.dir, step), [r.to_dict() for r in records])
        rows = [
            Visit(
                step, r.index, r.problem_id, r.reward, r.correct, r.v_hat_before, r.rho, r.advantage, r.policy_version
            )
            for r in records
        ]
        self._visits.write("".join(visit_row(v) + "\n" for v in rows))
        self._visits.flush()
        os.fsync(self._visits.fileno())
        self.last_step = step
        if records and self.save_trajectories:
            self._tail.append(step)
        old = [s for s in self._tail if s <= step - self.keep_last_steps]
        self._tail = [s for s in self._tail if s > step - self.keep_last_steps]
        self._thin(old)

    def _thin(self, steps: Sequence[int]) -> None:
        """Move `steps` from the full window to the older sample, then drop the largest keys
        while the sample holds more than `older_max`; each file that loses records is rewritten
        once."""
        loaded: dict[int, list[dict[str, Any]]] = {}
        keep: dict[int, set[int]] = {}
        for s in steps:
            loaded[s] = read_records(step_file(self.dir, s))
            keep[s] = set()
            for r in loaded[s]:
                u = sample_key(self.seed, s, r["index"])
                if u < self.older_sample:
                    heapq.heappush(self._pool, (-u, s, r["index"]))
                    keep[s].add(r["index"])
        while len(self._pool) > self.older_max:
            _, s, i = heapq.heappop(self._pool)
            if s not in loaded:
                loaded[s] = read_records(step_file(self.dir, s))
                keep[s] = {r["index"] for r in loaded[s]}
            keep[s].discard(i)
        for s, records in loaded.items():
            if len(keep[s]) < len(records):
                self._rewrite(s, records, keep[s])

    def _rewrite(self, step: int, records: list[dict[str, Any]], keep: set[int]) -> None:
        path = step_file(self.dir, step)
        rest = [r for r in records if r["index"] in keep]
        if rest:
            write_records(path, rest)
        else:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if not self._visits.closed:
            self._visits.close()

    def __enter__(self) -> TrajectoryLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
