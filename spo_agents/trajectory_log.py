"""What the learner trained on: a bounded log of training trajectories, and a per-visit log.

The training loop calls `TrajectoryLog.record(...)` once per step, after the advantages and the
tracker's rho of the batch are known, with the trajectories the learner trained on. Two logs live
in `RUN_DIR/trajectories/`:

    meta.json               schema version and the writer's settings
    problems.json.gz        the training problem ids in tracker order (optional; lets readers name
                            problems the tracker holds only as hashes)
    visits.jsonl            one compact row per trained trajectory, every step, never thinned
    step-000012.jsonl.gz    the trajectories of step 12: all of them for the last
                            `keep_last_steps` steps, a seeded sample for older steps

**Visits** (`visits.jsonl`): a header line `{"schema_version": 1, "columns": [...]}`, then one
JSON array per trajectory: `[step, index, problem_id, reward, correct, v_hat_before, rho,
advantage, policy_version]` (`index` is the trajectory's position in the step's batch). About 70
bytes a row; appended and flushed every step, so a problem's whole history survives the sampling
of the full records.

**Step files** hold one `LoggedTrajectory` per line (JSON, gzip). A record keeps what the learner
trained on: the ids, the step and policy version, v_hat before the update, the advantage, rho,
the reward and answer, and the text split into `Segment`s: runs of tokens the policy sampled
(`model`, loss mask 1) and runs the environment inserted (`env`, loss mask 0), each with its
tokens and decoded text. Model segments are further split into `text` and `code` parts where a
tool call's code appears; env segments that answer a tool call name it. Per-token log-probs
(rounded to 6 significant digits, float32's precision) and the text of each token are kept when
`save_logprobs=True`. The segments' tokens and masks, concatenated, are exactly the trajectory's
`token_ids` and `loss_mask`.

**Bounds.** Every trajectory of the last `keep_last_steps` steps is kept. When a step leaves
that window its file is thinned to a seeded sample: each trajectory gets a key
u = blake2b(seed, step, index) in [0, 1); it is kept while u < `older_sample` and u is among the
`older_max` smallest keys of all older trajectories (a bottom-k sample: uniform over older steps,
reproducible, and the same set whatever order steps arrive in). So at most
`keep_last_steps * batch_size + older_max` trajectories are on disk. Older files are rewritten
(thinned again) as the sample's threshold falls.

**Crash safety.** Step files are written to a temporary file and renamed into place. Visits are
appended a whole line at a time; a torn last line (a crash mid-write) is dropped when the log is
opened again. `TrajectoryLog(..., start_step=S)` (the step a resumed run restarts from) also
drops visits and step files of steps after S, which the resumed run will redo, so nothing before
the crash is lost and nothing is counted twice.

Readers (`TrajectoryLogReader`, the viewer) tolerate a log that is being written.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spo_agents.errors import ConfigError, TrajectoryError
from spo_agents.files import write_text_atomic

SCHEMA_VERSION = 1
LOG_DIR = "trajectories"
META = "meta.json"
PROBLEMS = "problems.json.gz"
VISITS = "visits.jsonl"
VISIT_COLUMNS = (
    "step",
    "index",
    "problem_id",
    "reward",
    "correct",
    "v_hat_before",
    "rho",
    "advantage",
    "policy_version",
)
_STEP_FILE = re.compile(r"^step-(\d{6,})\.jsonl\.gz$")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """A run of tokens from one source.

    `kind` is `model` (sampled by the policy; `mask` 1, trained on) or `env` (inserted by the
    environment; `mask` 0). `parts` splits a model segment's text into `[kind, text]` pairs,
    kind `text` or `code` (a tool call's code). `tool_call` is the index in
    `LoggedTrajectory.tool_calls` of the call an env segment answers. `logprobs` and `pieces`
    (each token's own decoded text) are set for model segments when log-probs are saved.
    """

    kind: str
    mask: int
    tokens: list[int]
    text: str | None = None
    parts: list[list[str]] = field(default_factory=list)
    tool_call: int | None = None
    logprobs: list[float] | None = None
    pieces: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (non-finite log-probs as strings, as `Trajectory` stores them)."""
        d = {name: getattr(self, name) for name in _SEGMENT_ORDER}
        if self.logprobs is not None:
            d["logprobs"] = [x if math.isfinite(x) else repr(x) for x in self.logprobs]
        return d


@dataclass
class LoggedTrajectory:
    """One trajectory the learner trained on, as stored in a step file (module docstring)."""

    step: int
    index: int
    batch_size: int
    problem_id: str
    env_id: str
    reward: float
    advantage: float
    v_hat_before: float
    rho: float
    correct: bool
    answer: Any = None
    policy_version: int = 0
    policy_versions: list[int] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    prompt_text: str | None = None
    prompt_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def token_ids(self) -> list[int]:
        """The trajectory's `token_ids`, reassembled from the segments."""
        return [t for s in self.segments for t in s.tokens]

    def loss_mask(self) -> list[int]:
        """The trajectory's `loss_mask`, reassembled from the segments."""
        return [s.mask for s in self.segments for _ in s.tokens]

    def model_text(self) -> list[str]:
        """The text the policy wrote, one string per model segment (what an env scores)."""
        return [s.text or "" for s in self.segments if s.kind == "model"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (shallow: lists are shared with the record, not copied)."""
        d = {name: getattr(self, name) for name in _RECORD_ORDER}
        d["segments"] = [s.to_dict() for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoggedTrajectory:
        version = d.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise TrajectoryError(
                f"trajectory log schema version {version!r} is newer than this spo-agents reads "
                f"({SCHEMA_VERSION}); upgrade spo-agents to read it"
            )
        d = dict(d)
        segs = []
        for s in d.get("segments", []):
            s = dict(s)
            if s.get("logprobs") is not None:
                s["logprobs"] = [float(x) for x in s["logprobs"]]
            segs.append(Segment(**{k: v for k, v in s.items() if k in _SEGMENT_FIELDS}))
        d["segments"] = segs
        return cls(**{k: v for k, v in d.items() if k in _RECORD_FIELDS})


_SEGMENT_ORDER = tuple(Segment.__dataclass_fields__)
_RECORD_ORDER = tuple(LoggedTrajectory.__dataclass_fields__)
_SEGMENT_FIELDS = set(_SEGMENT_ORDER)
_RECORD_FIELDS = set(_RECORD_ORDER)


@dataclass(frozen=True)
class Visit:
    """One row of `visits.jsonl`: a problem's visit at a step (module docstring)."""

    step: int
    index: int
    problem_id: str
    reward: float
    correct: bool
    v_hat_before: float
    rho: float
    advantage: float
    policy_version: int


# --------------------------------------------------------------------------------------------
# Building records from trajectories
# --------------------------------------------------------------------------------------------
def _decode(tokenizer: Any, ids: Sequence[int]) -> str | None:
    if tokenizer is None:
        return None
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's own text (a token that is part of a multi-byte character decodes to U+FFFD)."""
    return [tokenizer.decode([x], skip_special_tokens=False) for x in ids]


def _runs(mask: Sequence[int], starts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) runs of equal mask; a generation start (`turn_starts`) also opens a run."""
    cuts = {0, len(mask)} | {s for s in starts if 0 < s < len(mask)}
    cuts |= {i for i in range(1, len(mask)) if mask[i] != mask[i - 1]}
    edges = sorted(cuts)
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _split_code(text: str, code: str) -> list[list[str]] | None:
    """`[[text, before], [code, code], [text, after]]` around the last occurrence of `code`."""
    body = code.strip("\n")
    at = text.rfind(body) if body.strip() else -1
    if at < 0:
        return None
    parts = [["text", text[:at]], ["code", body], ["text", text[at + len(body) :]]]
    return [p for p in parts if p[1]]


def segments_of(trajectory: Any, tokenizer: Any = None, logprobs: bool = False) -> list[Segment]:
    """Split `trajectory.token_ids` into model / env segments (module docstring)."""
    t = trajectory
    runs = _runs(t.loss_mask, t.turn_starts)
    calls = list(t.tool_calls)
    segs: list[Segment] = []
    next_call = 0
    for a, b in runs:
        mask = int(t.loss_mask[a])
        seg = Segment("model" if mask else "env", mask, [int(x) for x in t.token_ids[a:b]])
        seg.text = _decode(tokenizer, seg.tokens)
        if mask and logprobs:
            seg.logprobs = [float(f"{x:.6g}") for x in t.logprobs[a:b]]  # float32 precision, half the bytes
            if tokenizer is not None:
                seg.pieces = _pieces(tokenizer, seg.tokens)
        segs.append(seg)
    for i, seg in enumerate(segs):
        if seg.kind != "model" or seg.text is None:
            continue
        followed = i + 1 < len(segs) and segs[i + 1].kind == "env"
        parts = _split_code(seg.text, calls[next_call].code) if followed and next_call < len(calls) else None
        seg.parts = parts or [["text", seg.text]]
        if parts is not None:
            segs[i + 1].tool_call = next_call
            next_call += 1
    return segs


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=True)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


def _tool_call_dict(call: Any) -> dict[str, Any]:
    return asdict(call) if hasattr(call, "__dataclass_fields__") else dict(call)


def make_record(
    trajectory: Any,
    *,
    step: int,
    index: int,
    batch_size: int,
    advantage: float,
    v_hat_before: float,
    rho: float,
    tokenizer: Any = None,
    logprobs: bool = False,
) -> LoggedTrajectory:
    """The `LoggedTrajectory` of one `spo_agents.types.Trajectory`."""
    t = trajectory
    info = {k: _json_safe(v) for k, v in t.info.items() if k not in ("tool_call", "tool_calls", "completion")}
    return LoggedTrajectory(
        step=int(step),
        index=int(index),
        batch_size=int(batch_size),
        problem_id=str(t.problem_id),
        env_id=str(t.env_id),
        reward=float(t.reward),
        advantage=float(advantage),
        v_hat_before=float(v_hat_before),
        rho=float(rho),
        correct=bool(t.correct),
        answer=_json_safe(t.info.get("answer")),
        policy_version=int(t.policy_version),
        policy_versions=[int(v) for v in t.policy_versions],
        terminated=bool(t.terminated),
        truncated=bool(t.truncated),
        prompt_text=_decode(tokenizer, t.prompt_ids),
        prompt_tokens=len(t.prompt_ids),
        segments=segments_of(t, tokenizer, logprobs),
        tool_calls=[_tool_call_dict(c) for c in t.tool_calls],
        timings={k: float(v) for k, v in t.timings.items()},
        info=info,
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def step_file(log_dir: Path, step: int) -> Path:
    return log_dir / f"step-{step:06d}.jsonl.gz"


def _write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(path, gzip.compress(text.encode("utf-8"), compresslevel=6, mtime=0))


def _read_records(path: Path) -> list[dict[str, Any]]:
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


def _step_files(log_dir: Path) -> dict[int, Path]:
    if not log_dir.is_dir():
        return {}
    out = {}
    for p in log_dir.iterdir():
        m = _STEP_FILE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def sample_key(seed: int, step: int, index: int) -> float:
    """The trajectory's key u in [0, 1) for the older sample (module docstring)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _visit_row(v: Visit) -> str:
    row = [v.step, v.index, v.problem_id, v.reward, v.correct, v.v_hat_before, v.rho, v.advantage, v.policy_version]
    return json.dumps(row, ensure_ascii=False)


def _parse_visits(data: bytes, path: Path) -> tuple[list[Visit], int]:
    """Visits in `data` and the byte length of its complete lines (a torn tail is left out)."""
    good = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
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


def _header() -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "columns": list(VISIT_COLUMNS)})


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
class TrajectoryLog:
    """Writes `RUN_DIR/trajectories/` (module docstring); one instance per training process.

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
            self._visits.write(_header() + "\n")
            self._visits.flush()
        self._tail = sorted(s for s in _step_files(self.dir) if s > self.last_step - self.keep_last_steps)
        self._thin(sorted(s for s in _step_files(self.dir) if s <= self.last_step - self.keep_last_steps))

    # -- opening ----------------------------------------------------------------------------
    def _truncate(self, start_step: int) -> None:
        """Drop the torn last visit line and everything logged for steps after `start_step`."""
        for step, path in _step_files(self.dir).items():
            if step > start_step:
                path.unlink(missing_ok=True)
        for p in self.dir.glob(".step-*"):  # temporaries of an interrupted write
            p.unlink(missing_ok=True)
        path = self.dir / VISITS
        if not path.is_file():
            return
        data = path.read_bytes()
        visits, good = _parse_visits(data, path)
        keep = [v for v in visits if v.step <= start_step]
        if good == len(data) and len(keep) == len(visits):
            return
        write_text_atomic(path, "".join(line + "\n" for line in [_header(), *map(_visit_row, keep)]).encode("utf-8"))

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
            _write_records(step_file(self.dir, step), [r.to_dict() for r in records])
        rows = [
            Visit(
                step, r.index, r.problem_id, r.reward, r.correct, r.v_hat_before, r.rho, r.advantage, r.policy_version
            )
            for r in records
        ]
        self._visits.write("".join(_visit_row(v) + "\n" for v in rows))
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
            loaded[s] = _read_records(step_file(self.dir, s))
            keep[s] = set()
            for r in loaded[s]:
                u = sample_key(self.seed, s, r["index"])
                if u < self.older_sample:
                    heapq.heappush(self._pool, (-u, s, r["index"]))
                    keep[s].add(r["index"])
        while len(self._pool) > self.older_max:
            _, s, i = heapq.heappop(self._pool)
            if s not in loaded:
                loaded[s] = _read_records(step_file(self.dir, s))
                keep[s] = {r["index"] for r in loaded[s]}
            keep[s].discard(i)
        for s, records in loaded.items():
            if len(keep[s]) < len(records):
                self._rewrite(s, records, keep[s])

    def _rewrite(self, step: int, records: list[dict[str, Any]], keep: set[int]) -> None:
        path = step_file(self.dir, step)
        rest = [r for r in records if r["index"] in keep]
        if rest:
            _write_records(path, rest)
        else:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if not self._visits.closed:
            self._visits.close()

    def __enter__(self) -> TrajectoryLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------
class TrajectoryLogReader:
    """Reads a run's `trajectories/` while a trainer may be writing it. Step files are cached by
    (mtime, size), so repeated queries read each file once."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / LOG_DIR
        self._cache: dict[Path, tuple[tuple[int, int], list[LoggedTrajectory]]] = {}
        self._visit_cache: tuple[int, int, list[Visit]] | None = None  # inode, bytes parsed, rows

    def exists(self) -> bool:
        return (self.dir / VISITS).is_file() or bool(_step_files(self.dir))

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
        return sorted(_step_files(self.dir))

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
            hit = (key, [LoggedTrajectory.from_dict(d) for d in _read_records(path)])
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
                new, good = _parse_visits(f.read(), path)
            rows, offset = rows + new, offset + good
        self._visit_cache = (st.st_ino, offset, rows)
        return rows if problem_id is None else [v for v in rows if v.problem_id == problem_id]
