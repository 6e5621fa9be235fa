"""Re-apply an environment's current answer checking to saved episodes, without regenerating.

`spo-agent rescore` scores the saved model text of eval dirs (`transcripts.jsonl`, from the
decoded completion with the env replies cut out, `completion_segments`) and of a run's saved
training trajectories, with the env's `rescore(problem, model_text)`; results go next to the old
ones (`results.rescored.json`, `trajectories/rescored.json`), never over them. Envs whose reward
is not a pure function of the text (`rescorable = False`) are refused; another version of the
same env is a notice, another env an error. Details: docs/evaluation.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spo_agents.envs.base import MultiTurnEnv
from spo_agents.errors import ConfigError, EnvError

RESCORED = "results.rescored.json"
RUN_RESCORED = "rescored.json"
_VERSIONED = re.compile(r"^(?P<name>.+)-v(?P<version>\d+)$")


# --------------------------------------------------------------------------------------------
# The model's text of a saved completion
# --------------------------------------------------------------------------------------------
_CODE_CLOSE = "</code>"
_REPLY_OPEN, _REPLY_CLOSE = "\n<interpreter>\n", "\n</interpreter>\n"
_CHAT_TURN = re.compile(
    r"<\|im_end\|>\s*<\|im_start\|>(?:user|tool)\n.*?<\|im_end\|>\s*<\|im_start\|>assistant\n", re.DOTALL
)


def completion_segments(completion: str, tool_outputs: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Split a decoded completion into `("model", text)` and `("env", text)` pieces.

    Env pieces are (a) the interpreter reply right after each `</code>` (the policy stops at
    `</code>`, so what follows it is the env's), matched exactly against the tool call's output
    when it is known and otherwise up to the next `</interpreter>`, and (b) ChatML user / tool
    turns with the assistant header that follows them. Everything else is the model's.
    """
    spans: list[tuple[int, int]] = []
    pos, call = 0, 0
    while (at := completion.find(_CODE_CLOSE, pos)) >= 0:
        start = at + len(_CODE_CLOSE)
        pos = start
        if not completion.startswith(_REPLY_OPEN, start):
            continue
        exact = _REPLY_OPEN + tool_outputs[call] + _REPLY_CLOSE if call < len(tool_outputs) else None
        if exact is not None and completion.startswith(exact, start):
            end = start + len(exact)
            call += 1
        else:
            close = completion.find(_REPLY_CLOSE, start + len(_REPLY_OPEN) - 1)
            end = len(completion) if close < 0 else close + len(_REPLY_CLOSE)
        spans.append((start, end))
        pos = end
    spans += [(m.start(), m.end()) for m in _CHAT_TURN.finditer(completion)]
    out: list[tuple[str, str]] = []
    pos = 0
    for a, b in sorted(spans):
        if a < pos:
            continue
        if a > pos:
            out.append(("model", completion[pos:a]))
        out.append(("env", completion[a:b]))
        pos = b
    if pos < len(completion) or not out:
        out.append(("model", completion[pos:]))
    return out


def transcript_model_text(t: Any) -> list[str]:
    """The model's text of an eval transcript (`Trajectory` with `info["completion"]`)."""
    completion = t.info.get("completion")
    if completion is None:
        raise ConfigError(
            f'the transcript of `{t.problem_id}` (sample {t.sample_index}) has no `info["completion"]`; '
            "only transcripts written by `spo-agent eval` can be re-scored"
        )
    outputs = [c.output for c in t.tool_calls]
    return [text for kind, text in completion_segments(completion, outputs) if kind == "model"]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
@dataclass
class Score:
    """An env's verdict on a saved text."""

    reward: float
    correct: bool
    answer: Any
    check: str | None = None
    detail: str | None = None


def scorer_for(env: MultiTurnEnv) -> Callable[[Any, list[str]], Score]:
    """`(problem, model_text) -> Score` from `env.rescore`; refused when the env is not `rescorable`."""
    if not env.rescorable:
        raise ConfigError(
            f"`{env.env_id}` cannot be re-scored from saved text: its reward is not a pure function of the model's "
            "text (it runs code or depends on the episode's replies, `rescorable = False`); evaluate again instead"
        )

    def by_env(problem: Any, text: list[str]) -> Score:
        verdict = env.rescore(problem, text)
        if verdict is None:
            raise ConfigError(f"`{env.env_id}` says it is `rescorable` but its `rescore` returned None")
        reward, info = verdict
        detail = info.get("check_detail") or info.get("check_error")
        correct = bool(info.get("correct", reward >= 1.0))
        return Score(float(reward), correct, info.get("answer"), info.get("check"), detail)

    return by_env


# --------------------------------------------------------------------------------------------
# Environments
# --------------------------------------------------------------------------------------------
def _split_id(env_id: str) -> tuple[str, int | None]:
    m = _VERSIONED.match(env_id)
    return (m.group("name"), int(m.group("version"))) if m else (env_id, None)


def resolve_env(saved_id: str, wanted: str | None = None) -> tuple[str, str | None]:
    """The registered env id to re-score `saved_id` episodes with, and a notice when its version
    differs. `wanted` (default: the latest version of the saved env) must be the same env."""
    from spo_agents import envs

    name, _ = _split_id(saved_id)
    target = envs.spec(wanted or name).id
    if _split_id(target)[0] != name:
        raise ConfigError(
            f"these episodes come from `{saved_id}`; re-scoring them with `{target}`, another environment, "
            f"would compare different tasks. Re-score with `{name}` (any version), or evaluate again"
        )
    notice = None if target == saved_id else f"notice: episodes saved with `{saved_id}` are re-scored with `{target}`"
    return target, notice


def make_env(env_id: str, split: str, kwargs: dict[str, Any]) -> MultiTurnEnv:
    """The env that re-scores (its sandbox is never started: nothing is run)."""
    from spo_agents import envs

    env = envs.make(env_id, split=split, **kwargs)
    if not isinstance(env, MultiTurnEnv):
        env.close()
        raise ConfigError(f"`{env_id}` is not a `MultiTurnEnv`; only those can score saved text again")
    return env


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
@dataclass
class Flip:
    """A sample whose verdict changed."""

    problem_id: str
    sample: str  # `3` (eval sample index) or `step 12 #4` (training trajectory)
    old_reward: float
    new_reward: float
    old_answer: Any
    new_answer: Any
    reason: str


@dataclass
class RescoreReport:
    """What one re-scoring found and where it wrote it."""

    source: str  # the eval dir or run dir
    kind: str  # `eval` or `train`
    saved_env: str
    env: str
    scored: int
    flips: list[Flip] = field(default_factory=list)
    answer_changes: int = 0  # samples whose extracted answer changed (verdict may be the same)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> samples not re-scored
    notices: list[str] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    written: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """The report as text for the terminal."""
        up = sum(1 for f in self.flips if f.new_reward > f.old_reward)
        lines = [*self.notices, f"{self.source} ({self.kind}, `{self.saved_env}` re-scored with `{self.env}`)"]
        lines.append(
            f"  {self.scored} re-scored, {len(self.flips)} flipped ({up} now correct, "
            f"{len(self.flips) - up} now wrong), {self.answer_changes} with another extracted answer"
        )
        for reason, n in self.skipped.items():
            lines.append(f"  {n} not re-scored: {reason}")
        for key, old in self.before.items():
            lines.append(f"  {key}: {old:.4f} -> {self.after.get(key, float('nan')):.4f}")
        for f in self.flips:
            lines.append(
                f"  {f.problem_id} [{f.sample}]: {f.old_reward:g} -> {f.new_reward:g}  "
                f"answer {f.old_answer!r} -> {f.new_answer!r}  ({f.reason})"
            )
        if self.written:
            lines.append(f"  written: {self.written}")
        return "\n".join(lines)


def _reason(old_info: dict[str, Any], old_answer: Any, new: Score) -> str:
    if old_answer != new.answer:
        return f"the answer is extracted differently now; checked by `{new.check}`"
    why = f"the checker's verdict changed (`{old_info.get('check')}` then, `{new.check}` now)"
    return f"{why}: {new.detail}" if new.detail else why


def _free_path(path: Path) -> Path:
    """`path`, or `name-2.json`, `name-3.json`, ... when it exists (never overwrite)."""
    n = 2
    out = path
    while out.exists():
        out = path.with_name(f"{path.name.removesuffix('.json')}-{n}.json")
        n += 1
    return out


def _skip(report: RescoreReport, reason: str) -> None:
    report.skipped[reason] = report.skipped.get(reason, 0) + 1


def _compare(pid: str, sample: str, reward: float, info: dict[str, Any], new: Score, report: RescoreReport) -> None:
    old_answer = info.get("answer")
    if old_answer != new.answer:
        report.answer_changes += 1
    if float(reward) != new.reward:
        why = _reason(info, old_answer, new)
        report.flips.append(Flip(pid, sample, float(reward), new.reward, old_answer, new.answer, why))


# --------------------------------------------------------------------------------------------
# Eval dirs
# --------------------------------------------------------------------------------------------
def _eval_context(eval_dir: Path) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """(settings, split, env kwargs) of an eval dir; a run's eval dir takes them from the run."""
    from spo_agents.evaluation.runner import SETTINGS

    settings = {}
    if (eval_dir / SETTINGS).is_file():
        settings = json.loads((eval_dir / SETTINGS).read_text(encoding="utf-8"))
    run_config = _run_config(eval_dir.parent.parent) if eval_dir.parent.name == "eval" else None
    if run_config is not None:
        env = run_config.get("env") or {}
        return settings, env.get("eval_split", "test"), dict(env.get("kwargs") or {})
    return settings, settings.get("split"), dict(settings.get("env_kwargs") or {})


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    import yaml

    p = run_dir / "config.yaml"
    if not p.is_file():
        return None
    return yaml.safe_load(p.read_text(encoding="utf-8")) or {}


def rescore_eval_dir(
    eval_dir: str | Path,
    *,
    env_id: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    split: str | None = None,
    write: bool = True,
) -> RescoreReport:
    """Re-score an eval dir's transcripts (module docstring); writes `results.rescored.json`."""
    from spo_agents.evaluation.runner import RESULTS, TRANSCRIPTS, compute_report
    from spo_agents.types import read_jsonl

    d = Path(eval_dir)
    path = d / TRANSCRIPTS
    if not path.is_file():
        raise ConfigError(
            f"`{d}` holds no `{TRANSCRIPTS}`; pass a directory written by `spo-agent eval --out` "
            "or a run's `eval/step-N`"
        )
    settings, saved_split, kwargs = _eval_context(d)
    kwargs.update(env_kwargs or {})
    samples = {(t.problem_id, t.sample_index): t for t in read_jsonl(path)}
    if not samples:
        raise ConfigError(f"`{path}` is empty: nothing to re-score")
    saved_ids = sorted({t.env_id for t in samples.values()})
    if len(saved_ids) > 1:
        raise ConfigError(f"`{path}` mixes environments {saved_ids}; re-score a directory of one environment")
    target, notice = resolve_env(saved_ids[0], env_id)
    env = make_env(target, split or saved_split or "test", kwargs)
    try:
        score = scorer_for(env)
        report = RescoreReport(str(d), "eval", saved_ids[0], target, 0, notices=[notice] if notice else [])
        for (pid, i), t in sorted(samples.items()):
            if t.error is not None:
                _skip(report, "infrastructure error (not evidence about the policy)")
                continue
            new = score(_problem(env, pid), transcript_model_text(t))
            report.scored += 1
            _compare(pid, str(i), t.reward, t.info, new, report)
            t.reward = new.reward
            t.info = {**t.info, "answer": new.answer, "correct": new.correct, "check": new.check}
        old = json.loads((d / RESULTS).read_text(encoding="utf-8")) if (d / RESULTS).is_file() else {}
        problem_ids = [p["problem_id"] for p in old.get("problems", [])] or sorted({pid for pid, _ in samples})
        k = int(old.get("k") or max(i for _, i in samples) + 1)
        equivalent = env.answers_equivalent
        new_report = compute_report(samples, problem_ids, k, equivalent, old.get("settings") or settings)
    finally:
        env.close()
    for key in ("avg_at_k", "maj_at_k"):
        if key in old:
            report.before[key] = float(old[key])
    report.after.update({"avg_at_k": new_report.avg_at_k, "maj_at_k": new_report.maj_at_k})
    if write:
        out = _free_path(d / RESCORED)
        doc = {**new_report.to_dict(), "rescore": report.to_dict()}
        out.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        report.written = str(out)
    return report


def _problem(env: Any, problem_id: str) -> Any:
    try:
        return env.get_problem(problem_id)
    except EnvError as e:
        raise ConfigError(
            f"{e}. The episodes were drawn from another problem set than the one this env builds; "
            "pass the env options they were made with (`--env-arg KEY=VALUE`, `--split`)"
        ) from e


# --------------------------------------------------------------------------------------------
# Run dirs
# --------------------------------------------------------------------------------------------
def rescore_training_log(
    run_dir: str | Path, *, env_id: str | None = None, env_kwargs: dict[str, Any] | None = None, write: bool = True
) -> RescoreReport | None:
    """Re-score a run's saved training trajectories; None when the run saved none."""
    from spo_agents.trajectories import LOG_DIR, TrajectoryLogReader

    run = Path(run_dir)
    reader = TrajectoryLogReader(run)
    records = list(reader.iter_all())
    if not records:
        return None
    cfg = _run_config(run) or {}
    env_cfg = cfg.get("env") or {}
    kwargs = {**dict(env_cfg.get("kwargs") or {}), **(env_kwargs or {})}
    saved_ids = sorted({r.env_id for r in records})
    if len(saved_ids) > 1:
        raise ConfigError(f"`{run / LOG_DIR}` mixes environments {saved_ids}; re-score one environment at a time")
    target, notice = resolve_env(saved_ids[0], env_id)
    env = make_env(target, env_cfg.get("split", "train"), kwargs)
    report = RescoreReport(str(run), "train", saved_ids[0], target, 0, notices=[notice] if notice else [])
    old_correct = new_correct = 0
    try:
        score = scorer_for(env)
        for r in records:
            if any(s.text is None for s in r.segments):
                _skip(report, "saved without text (no tokenizer when logged)")
                continue
            new = score(_problem(env, r.problem_id), r.model_text())
            report.scored += 1
            old_correct += int(r.correct)
            new_correct += int(new.correct)
            _compare(r.problem_id, f"step {r.step} #{r.index}", r.reward, {**r.info, "answer": r.answer}, new, report)
    finally:
        env.close()
    if report.scored:
        report.before["accuracy"] = old_correct / report.scored
        report.after["accuracy"] = new_correct / report.scored
    if write:
        out = _free_path(run / LOG_DIR / RUN_RESCORED)
        out.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        report.written = str(out)
    return report


def rescore_path(
    path: str | Path, *, env_id: str | None = None, env_kwargs: dict[str, Any] | None = None, split: str | None = None
) -> list[RescoreReport]:
    """Re-score an eval dir, or a run dir (its training trajectories and its eval dirs)."""
    from spo_agents.evaluation.runner import TRANSCRIPTS

    p = Path(path)
    if (p / TRANSCRIPTS).is_file():
        return [rescore_eval_dir(p, env_id=env_id, env_kwargs=env_kwargs, split=split)]
    if not (p / "config.yaml").is_file():
        raise ConfigError(
            f"`{p}` is neither an eval dir (`{TRANSCRIPTS}`) nor a run dir (`config.yaml`); pass the directory "
            "`spo-agent eval --out` or `spo-agent train` wrote"
        )
    reports = []
    train = rescore_training_log(p, env_id=env_id, env_kwargs=env_kwargs)
    if train is not None:
        reports.append(train)
    for d in sorted((p / "eval").glob("*/")):
        if (d / TRANSCRIPTS).is_file():
            reports.append(rescore_eval_dir(d, env_id=env_id, env_kwargs=env_kwargs))
    if not reports:
        raise ConfigError(f"`{p}` has no saved training trajectories (`trajectories/`) nor eval transcripts")
    return reports
