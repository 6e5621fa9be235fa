"""SPO against GRPO (and SPO ablations) at an equal budget of generated trajectories.

One command runs every (arm, seed) of the study, each as its own `spo-agent train` process on
one core, two at a time by default, then writes `table.md`, `summary.json` and PNG curves into
`--out` and prints the table:

    python bench/study.py --out runs/study                       # spo, grpo, spo-no-baseline, spo-uniform; 3 seeds
    python bench/study.py --arms spo grpo spo-offline-init --seeds 5 --out runs/study
    python bench/study.py --quick --out /tmp/study-quick         # 2 steps per arm, tiny random model
    python bench/study.py --summarize --out runs/study           # tables and plots from what is there

Arms are dotted overrides on `configs/cpu-default.yaml` (`grpo`: `configs/grpo-cpu.yaml`):

- `spo`: the default (tracker baseline, prioritised sampling);
- `grpo`: G = 4 samples per problem, 16 per step as 4 groups of 4, uniform sampling;
- `spo-no-baseline`: `tracker.baseline=false`;
- `spo-uniform`: `sampler.type=uniform`;
- optional, run only when `--arms` names them: `spo-offline-init` (`tracker.init_values` from
  `spo-agent estimate-values` with the initial policy, written once to `OUT/values.json`) and
  `spo-token-norm` (`algorithm.advantage_norm=token`).

Every run of the study trains on the same problems (`env.kwargs.source`, by default
`procedural:arith-hard`) and evaluates on the same held-out ones (the first `eval.limit` of the
test split). There are budget / 3 training problems (`env.kwargs.num_problems`, `--train-problems`),
so that each is drawn about three times and the tracker's v_hat has evidence to work with: with
the whole split, a problem is almost never seen twice in a short run. Runs stop on
a trajectory count: `train.steps = budget / train.batch_size` with `train.max_minutes=null`
(a time cap would stop GRPO, which waits for whole groups, with fewer trajectories). Held-out
avg@k and maj@k (`eval.k`, default 4) are measured at step 0 and every `steps / 3` steps.

An override key that does not exist stops the study before anything runs, except for an optional
arm, which is reported as unavailable with the reason. The study resumes per (arm, seed): a
finished run (`OUT/runs/ARM-sSEED/study-done.json`) is skipped, a run with a checkpoint continues
with `spo-agent train --resume`, so it can span several sittings. A finished run's checkpoints
are deleted (1.6 GB each for the 135M model) unless `--keep-checkpoints`.

Figures, per arm and over seeds:
- held-out avg@k and maj@k over training (`eval_avg.png`, `eval_maj.png`: a panel per arm, a thin
  line per seed, the mean in bold) and at the end (mean, min-max, std);
- wall time per accepted trajectory: the rollout wait plus the learner update of each step
  (evaluation and checkpoints left out), summed and divided by the trajectories the learner used;
- on the same batches, std(r - v_hat before the batch) against std(r - batch mean):
  `train/advantage_raw_std` and `train/reward_std` (arms with the SPO baseline only;
  `advantage_std.png`);
- GRPO's share of samples in groups whose rewards are all equal (`train/degenerate_share`;
  `degenerate_share.png`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DONE = "study-done.json"
VALUES = "values.json"


class StudyError(Exception):
    """A study that cannot run as asked (bad arm, budget, override)."""


# --------------------------------------------------------------------------------------------
# Arms and the plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One method of the study: a shipped config plus dotted overrides."""

    name: str
    config: str  # a file in configs/
    overrides: tuple[str, ...] = ()
    optional: bool = False  # run only when `--arms` names it; a missing config key makes it unavailable
    needs_values: bool = False  # `tracker.init_values` from an offline estimate
    about: str = ""


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("spo", "cpu-default.yaml", about="SPO: tracker baseline, prioritised sampling"),
        Arm("grpo", "grpo-cpu.yaml", ("algorithm.group_size=4",), about="GRPO, G = 4, uniform sampling"),
        Arm("spo-no-baseline", "cpu-default.yaml", ("tracker.baseline=false",), about="SPO, no baseline (v_hat = 0)"),
        Arm("spo-uniform", "cpu-default.yaml", ("sampler.type=uniform",), about="SPO with uniform problem sampling"),
        Arm("spo-offline-init", "cpu-default.yaml", ("tracker.init_values={values}",), optional=True, needs_values=True,
            about="SPO with v_hat initialised offline (initial policy)"),
        Arm("spo-token-norm", "cpu-default.yaml", ("algorithm.advantage_norm=token",), optional=True,
            about="SPO with advantages normalised under the token measure"),
    )
}  # fmt: skip
DEFAULT_ARMS = [a for a in ARMS if not ARMS[a].optional]


@dataclass
class Plan:
    """What every run of the study shares."""

    out: Path
    arms: list[str]
    seeds: list[int]
    budget: int  # generated trajectories per run
    source: str
    train_problems: int
    eval_k: int
    eval_limit: int
    values_n: int  # samples per problem of the offline estimate
    jobs: int
    quick: bool
    extra: list[str] = field(default_factory=list)  # overrides for every run (after the study's own)

    def common(self) -> list[str]:
        """Overrides shared by every run and by the offline estimate."""
        out = [
            f"env.kwargs.source={self.source}",
            f"env.kwargs.num_problems={self.train_problems}",
            "logging.progress=false",
        ]
        if self.quick:
            out += [
                "model.name=tiny-random", "rollout.max_new_tokens=8", "rollout.max_episode_tokens=16",
                "rollout.max_in_flight=8", "train.batch_size=8",
            ]  # fmt: skip
        return out + list(self.extra)


@dataclass
class Run:
    """One (arm, seed) with its overrides and where it lives."""

    arm: str
    seed: int
    config: Path
    overrides: list[str]
    steps: int
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


def arm_overrides(arm: Arm, plan: Plan) -> list[str]:
    values = plan.out / VALUES
    return [o.format(values=values) for o in arm.overrides]


def load_arm_config(arm: Arm, plan: Plan, more: Sequence[str] = ()) -> Any:
    """The arm's config (raises `ConfigError` for an unknown key or a bad value)."""
    from spo_agents.config import load_config

    return load_config(CONFIGS / arm.config, [*plan.common(), *arm_overrides(arm, plan), *more])


def make_runs(plan: Plan) -> tuple[list[Run], dict[str, str], dict[str, Any]]:
    """The runs of the plan, the arms that cannot run (name -> why) and each arm's config.

    A required arm whose config does not load stops the study (`StudyError`); an optional one is
    reported as unavailable."""
    from spo_agents.errors import SPOError

    runs, unavailable, configs = [], {}, {}
    for name in plan.arms:
        arm = ARMS[name]
        try:
            cfg = load_arm_config(arm, plan)
        except SPOError as e:
            if arm.optional:
                unavailable[name] = str(e)
                continue
            raise StudyError(
                f"arm `{name}` ({arm.config} + {' '.join(arm_overrides(arm, plan)) or 'no overrides'}): {e}"
            ) from e
        configs[name] = cfg
    batch = {n: c.train.batch_size for n, c in configs.items()}
    if len(set(batch.values())) > 1:
        raise StudyError(
            f"the arms have different `train.batch_size` {batch}; an equal budget needs equal batches "
            "(set it with `--set train.batch_size=N`)"
        )
    steps = {name: _steps(name, cfg, plan.budget) for name, cfg in configs.items()}
    for seed in plan.seeds:  # seed by seed, so a study stopped early has every arm for its first seeds
        for name in configs:
            runs.append(_run_of(plan, name, seed, steps[name]))
    return runs, unavailable, configs


def _steps(name: str, cfg: Any, budget: int) -> int:
    b = cfg.train.batch_size
    if budget % b or budget < b:
        raise StudyError(
            f"`--budget` {budget} is not a positive multiple of `train.batch_size` {b}; "
            f"try {max(1, round(budget / b)) * b}"
        )
    if cfg.algorithm.name == "grpo" and b % cfg.algorithm.group_size:
        raise StudyError(
            f"arm `{name}`: `train.batch_size` {b} is not a multiple of `algorithm.group_size` "
            f"{cfg.algorithm.group_size}"
        )
    return budget // b


def _run_of(plan: Plan, name: str, seed: int, steps: int) -> Run:
    d = plan.out / "runs" / f"{name}-s{seed}"
    more = [
        f"train.seed={seed}", f"train.steps={steps}", "train.max_minutes=null", f"eval.k={plan.eval_k}",
        f"eval.every={max(1, steps // 3)}", f"eval.limit={plan.eval_limit}", f"train.output_dir={d.parent}",
        f"train.run_name={d.name}", "train.keep_checkpoints=1",
    ]  # fmt: skip
    arm = ARMS[name]
    load_arm_config(arm, plan, more)  # the run's own overrides are valid too
    return Run(name, seed, CONFIGS / arm.config, [*plan.common(), *arm_overrides(arm, plan), *more], steps, d)


def config_differences(configs: dict[str, Any], reference: str = "spo") -> dict[str, dict[str, list[Any]]]:
    """arm -> {dotted key: [reference value, arm value]} for every setting that differs."""
    from spo_agents.config import to_dict

    if reference not in configs:
        return {}

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "kwargs":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    ref = flat(to_dict(configs[reference]))
    diffs = {}
    for name, cfg in configs.items():
        mine = flat(to_dict(cfg))
        diffs[name] = {k: [ref.get(k), v] for k, v in mine.items() if ref.get(k) != v}
    return diffs


# --------------------------------------------------------------------------------------------
# Running: status, commands, a small scheduler
# --------------------------------------------------------------------------------------------
def run_status(run: Run) -> tuple[str, int]:
    """(`done` | `partial` | `new`, last checkpointed step)."""
    from spo_agents.training.checkpoint import CheckpointManager

    marker = run.dir / DONE
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("steps") == run.steps:
                return "done", run.steps
        except json.JSONDecodeError:
            pass
    latest = CheckpointManager(run.dir).latest()
    if latest is not None:
        return "partial", int(latest.name.split("-")[1])
    return "new", 0


def train_command(run: Run, status: str) -> list[str]:
    base = [sys.executable, "-m", "spo_agents", "train"]
    if status == "partial":
        return [*base, "--resume", str(run.dir), f"train.steps={run.steps}", "train.max_minutes=null"]
    return [*base, "--config", str(run.config), *run.overrides]


def values_command(plan: Plan) -> list[str]:
    return [
        sys.executable, "-m", "spo_agents", "estimate-values", "--config", str(CONFIGS / "cpu-default.yaml"),
        "-n", str(plan.values_n), "--out", str(plan.out / VALUES), *plan.common(), "train.seed=0",
    ]  # fmt: skip


@dataclass
class Job:
    """A command to run on one core; `after` must have succeeded first."""

    name: str
    cmd: list[str]
    log: Path
    after: Job | None = None
    on_success: Any = None  # callable run in this process after a zero exit
    proc: subprocess.Popen | None = None
    log_file: Any = None
    returncode: int | None = None
    started: float = 0.0
    seconds: float = 0.0
    error: str | None = None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _start(job: Job, core: int | None) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"\n$ {' '.join(job.cmd)}\n")
    job.log_file = open(job.log, "a")  # noqa: SIM115 - closed when the job ends
    job.proc = subprocess.Popen(job.cmd, stdout=job.log_file, stderr=subprocess.STDOUT, env=_child_env(), cwd=ROOT)
    if core is not None:  # at once, before the run starts its workers (which inherit it)
        os.sched_setaffinity(job.proc.pid, {core})
    job.started = time.time()
    print(f"[study] started {job.name}{f' on core {core}' if core is not None else ''} (log: {job.log})", flush=True)


def _ended(job: Job, rc: int) -> None:
    job.log_file.close()
    job.seconds = time.time() - job.started
    job.returncode = rc
    if rc == 0 and job.on_success is not None:
        try:
            job.on_success()
        except StudyError as e:
            job.returncode, job.error = 1, str(e)
    elif rc != 0:
        job.error = f"exit status {rc}; last lines of {job.log}:\n" + _tail(job.log)
    print(
        f"[study] {job.name}: {'finished' if job.returncode == 0 else 'FAILED: ' + str(job.error)} "
        f"in {job.seconds / 60:.1f} min",
        flush=True,
    )


def run_jobs(jobs: list[Job], parallel: int, cores: list[int] | None) -> None:
    """Run the jobs, `parallel` at a time, each pinned to its own core when `cores` is given.
    Ctrl-C stops the running ones (they keep their checkpoints: run the study again to continue)."""
    queue, active, free = list(jobs), [], list(cores or [])
    try:
        while queue or active:
            for job in list(queue):
                if len(active) >= parallel:
                    break
                if job.after is not None and job.after.returncode is None:
                    continue
                queue.remove(job)
                if job.after is not None and job.after.returncode != 0:
                    job.returncode, job.error = -1, f"not run: `{job.after.name}` failed"
                    continue
                core = free.pop(0) if free else None
                _start(job, core)
                active.append((job, core))
            time.sleep(0.2)
            for job, core in list(active):
                rc = job.proc.poll()
                if rc is not None:
                    active.remove((job, core))
                    free += [core] if core is not None else []
                    _ended(job, rc)
    except KeyboardInterrupt:
        for job, _ in active:
            job.proc.terminate()
        for job, _ in active:
            try:
                job.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.proc.kill()
        print("[study] interrupted: run the same command again to continue where the runs stopped", file=sys.stderr)
        raise


def _tail(path: Path, n: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _finish_run(run: Run, keep_checkpoints: bool) -> None:
    """After a zero exit: check the run reached its last step, mark it done, drop checkpoints."""
    from spo_agents.training.metrics import read_metrics

    rows = read_metrics(run.dir / "metrics.jsonl")
    last = max((r["step"] for r in rows if "train/reward_mean" in r), default=0)
    if last != run.steps:
        raise StudyError(f"`{run.dir}` stopped at step {last} of {run.steps}; see {run.dir}.log")
    (run.dir / DONE).write_text(json.dumps({"steps": run.steps, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    if not keep_checkpoints:
        shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)


def schedule(plan: Plan, runs: list[Run], keep_checkpoints: bool, cores: list[int] | None) -> list[Job]:
    """Start what is missing: the offline estimate (if an arm needs it), then every unfinished run."""
    jobs: list[Job] = []
    values_job = None
    if any(ARMS[r.arm].needs_values for r in runs) and not (plan.out / VALUES).is_file():
        values_job = Job("estimate-values", values_command(plan), plan.out / "estimate-values.log")
        jobs.append(values_job)
    for run in runs:
        status, step = run_status(run)
        if status == "done":
            print(f"[study] {run.name}: done, skipped", flush=True)
            continue
        if status == "new" and run.dir.exists():
            shutil.rmtree(run.dir)  # started, but crashed before its first checkpoint
        if status == "partial":
            print(f"[study] {run.name}: resuming from step {step} of {run.steps}", flush=True)
        job = Job(run.name, train_command(run, status), run.dir.parent / f"{run.name}.log",
                  after=values_job if ARMS[run.arm].needs_values else None,
                  on_success=lambda r=run: _finish_run(r, keep_checkpoints))  # fmt: skip
        jobs.append(job)
    run_jobs(jobs, plan.jobs, cores)
    return jobs


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def summarize_run(run: Run) -> dict[str, Any]:
    """What one run's `metrics.jsonl` says (means over its training steps)."""
    from spo_agents.training.metrics import read_metrics

    rows = read_metrics(run.dir / "metrics.jsonl")
    train = [r for r in rows if "train/reward_mean" in r]
    evals = [r for r in rows if r.get("eval/avg_at_k") is not None]

    def mean(key: str, rs: list[dict] = train) -> float | None:
        vals = [float(r[key]) for r in rs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    work = sum(r.get("time/rollout_wait_s", 0.0) + r.get("time/learner_s", 0.0) for r in train)
    trajectories = int(sum(r.get("train/batch_size", 0) for r in train))
    ratios = [r["train/advantage_raw_std"] / r["train/reward_std"] for r in train if r.get("train/reward_std")]
    return {
        "arm": run.arm,
        "seed": run.seed,
        "dir": str(run.dir),
        "done": run_status(run)[0] == "done",
        "steps": max((r["step"] for r in train), default=0),
        "planned_steps": run.steps,
        "trajectories": trajectories,
        "evals": [
            {
                "step": r["step"],
                "avg": r["eval/avg_at_k"],
                "maj": r.get("eval/maj_at_k"),
                "pass": r.get("eval/pass_at_k"),
            }
            for r in evals
        ],
        "seconds_per_trajectory": work / trajectories if trajectories else None,
        "wall_s": sum(r.get("time/step_s", 0.0) for r in train)
        + sum(r.get("time/eval_s", 0.0) for r in rows if r.get("step") == 0),
        "reward_mean": mean("train/reward_mean"),
        "std_r_minus_vhat": mean("train/advantage_raw_std"),
        "std_r_minus_batch_mean": mean("train/reward_std"),
        "std_ratio_mean": sum(ratios) / len(ratios) if ratios else None,
        "degenerate_share": mean("train/degenerate_share"),
        "series": {
            "step": [r["step"] for r in train],
            "advantage_raw_std": [r.get("train/advantage_raw_std") for r in train],
            "reward_std": [r.get("train/reward_std") for r in train],
            "degenerate_share": [r.get("train/degenerate_share") for r in train],
        },
    }


def _stats(xs: list[float]) -> dict[str, float] | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "min": min(xs), "max": max(xs), "std": sd, "n": len(xs)}


def summarize_arm(name: str, runs: list[dict[str, Any]], uses_baseline: bool) -> dict[str, Any]:
    done = [r for r in runs if r["evals"]]
    return {
        "arm": name,
        "about": ARMS[name].about,
        "runs": len(runs),
        "finished": sum(r["done"] for r in runs),
        "trajectories": [r["trajectories"] for r in runs],
        "start_avg": _stats([r["evals"][0]["avg"] for r in done if r["evals"][0]["step"] == 0]),
        "final_avg": _stats([r["evals"][-1]["avg"] for r in done]),
        "final_maj": _stats([r["evals"][-1]["maj"] for r in done]),
        "seconds_per_trajectory": _stats([r["seconds_per_trajectory"] for r in runs]),
        "std_r_minus_vhat": _stats([r["std_r_minus_vhat"] for r in runs]) if uses_baseline else None,
        "std_r_minus_batch_mean": _stats([r["std_r_minus_batch_mean"] for r in runs]),
        "std_ratio": _stats([r["std_ratio_mean"] for r in runs]) if uses_baseline else None,
        "degenerate_share": _stats([r["degenerate_share"] for r in runs]),
    }


def _fmt(s: dict[str, float] | None, digits: int = 3, spread: bool = True) -> str:
    if s is None:
        return "-"
    if not spread or s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _row(a: dict[str, Any]) -> str:
    traj = ", ".join(map(str, sorted(set(a["trajectories"])))) or "-"
    end = a["final_avg"]
    cells = [
        a["arm"], f"{a['finished']}/{a['runs']}", traj, _fmt(a["start_avg"]), _fmt(end), _fmt(a["final_maj"]),
        f"{end['std']:.3f}" if end else "-", _fmt(a["seconds_per_trajectory"], 2),
        _fmt(a["std_r_minus_vhat"], 3, False), _fmt(a["std_r_minus_batch_mean"], 3, False),
        _fmt(a["std_ratio"], 2, False), _fmt(a["degenerate_share"], 2, False),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def table(
    arms: list[dict[str, Any]], k: int, unavailable: dict[str, str], failed: dict[str, str], meta: dict[str, Any]
) -> str:
    """The markdown table of the study, with what its columns mean."""
    head = [
        "arm", "runs done", "trajectories per run", f"held-out avg@{k} at step 0",
        f"avg@{k} at the end, mean (min-max)", f"maj@{k} at the end", f"std over seeds of the end avg@{k}",
        "s per accepted trajectory", "std(r - v_hat)", "std(r - batch mean)", "ratio", "degenerate share",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *(_row(a) for a in arms)]
    notes = [
        "",
        (
            f"Budget: {meta['budget']} generated trajectories per run ({meta['steps']} steps of {meta['batch_size']}), "
            f"{meta['seeds']} seed(s); problems `{meta['source']}` ({meta['train_problems']} training problems), model "
            f"`{meta['model']}`; held-out: the first {meta['eval_limit']} test problems, k = {k}, at step 0 and every "
            f"{meta['eval_every']} steps."
        ),
        (
            f"Seconds per accepted trajectory: rollout wait plus learner update, summed over the steps and divided by "
            f"the trajectories the learner used (no evaluation, no checkpoints); rollout backend "
            f"`{meta['rollout_backend']}`, one core per run, commit {meta['commit']}, {meta['machine']}."
        ),
        (
            "std(r - v_hat) and std(r - batch mean): means over steps of `train/advantage_raw_std` and "
            "`train/reward_std`, measured on the same batches; ratio: the mean over steps of their quotient (arms "
            "with the SPO baseline only). Degenerate share: the share of GRPO's samples in groups whose rewards are "
            "all equal (zero advantage)."
        ),
    ]
    notes += [f"Arm `{name}` unavailable: {why}" for name, why in unavailable.items()]
    notes += [f"Run `{name}` failed: {why.splitlines()[0]}" for name, why in failed.items()]
    return "\n".join(lines + notes) + "\n"


def plot(arms: list[str], runs: list[dict[str, Any]], out: Path, k: int) -> list[Path]:
    """`eval_avg.png`, `eval_maj.png` (a panel per arm, thin seeds, bold mean), `advantage_std.png`
    and `degenerate_share.png` (means over seeds by step)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[study] matplotlib is not installed: no PNGs (`pip install matplotlib`)", file=sys.stderr)
        return []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for metric, label in (("avg", f"held-out avg@{k}"), ("maj", f"held-out maj@{k}")):
        fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.0), sharey=True, squeeze=False)
        for i, (ax, arm) in enumerate(zip(axes[0], arms)):
            color = colors[i % len(colors)]
            by_step: dict[int, list[float]] = {}
            for r in (r for r in runs if r["arm"] == arm):
                xs = [e["step"] for e in r["evals"] if e[metric] is not None]
                ys = [e[metric] for e in r["evals"] if e[metric] is not None]
                ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.5)
                for x, y in zip(xs, ys):
                    by_step.setdefault(x, []).append(y)
            if by_step:
                xs = sorted(by_step)
                ax.plot(
                    xs,
                    [sum(by_step[x]) / len(by_step[x]) for x in xs],
                    color=color,
                    linewidth=2.5,
                    marker="o",
                    markersize=3,
                )
            ax.set_title(arm, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel(label, fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / f"eval_{metric}.png", plt))
    series_plots = (
        (
            "advantage_std.png",
            ["advantage_raw_std", "reward_std"],
            "std of r - v_hat (solid) and of r - batch mean (dashed)",
        ),
        ("degenerate_share.png", ["degenerate_share"], "share of samples in degenerate groups"),
    )
    for fname, keys, title in series_plots:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        drawn = False
        for i, arm in enumerate(arms):
            for key, style in zip(keys, ("-", "--")):
                by_step: dict[int, list[float]] = {}
                for r in (r for r in runs if r["arm"] == arm):
                    for s, v in zip(r["series"]["step"], r["series"][key]):
                        if v is not None:
                            by_step.setdefault(s, []).append(v)
                if not by_step or (key == "advantage_raw_std" and not runs_use_baseline(runs, arm)):
                    continue
                xs = sorted(by_step)
                ax.plot(
                    xs,
                    [sum(by_step[x]) / len(by_step[x]) for x in xs],
                    style,
                    color=colors[i % len(colors)],
                    label=f"{arm}" if style == "-" or len(keys) == 1 else None,
                )
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / fname, plt))
    return written


def runs_use_baseline(runs: list[dict[str, Any]], arm: str) -> bool:
    return any(r["arm"] == arm and r.get("uses_baseline") for r in runs)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return f"{sha}{' (with uncommitted changes)' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def report(
    plan: Plan, runs: list[Run], unavailable: dict[str, str], configs: dict[str, Any], failed: dict[str, str]
) -> dict[str, Any]:
    """Write `table.md`, `summary.json` and the PNGs into `plan.out`; returns the summary."""
    from spo_agents.training.loop import advantage_name

    per_run = []
    for run in runs:
        s = summarize_run(run)
        s["uses_baseline"] = advantage_name(configs[run.arm]) == "spo"
        per_run.append(s)
    arms = [a for a in plan.arms if a in configs]
    summaries = [
        summarize_arm(a, [r for r in per_run if r["arm"] == a], advantage_name(configs[a]) == "spo") for a in arms
    ]
    ref = next(iter(configs.values())) if configs else None
    steps = runs[0].steps if runs else 0
    meta = {
        "budget": plan.budget, "steps": steps, "batch_size": ref.train.batch_size if ref else None,
        "seeds": len(plan.seeds), "source": plan.source, "train_problems": plan.train_problems,
        "eval_limit": plan.eval_limit, "eval_every": max(1, steps // 3), "eval_k": plan.eval_k,
        "rollout_backend": ref.rollout.backend if ref else None, "model": ref.model.name if ref else None,
        "commit": _commit(), "machine": _machine(), "quick": plan.quick,
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }  # fmt: skip
    text = table(summaries, plan.eval_k, unavailable, failed, meta)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "table.md").write_text(text)
    pngs = plot(arms, per_run, plan.out, plan.eval_k)
    summary = {
        "meta": meta,
        "arms": {s["arm"]: s for s in summaries},
        "runs": per_run,
        "unavailable": unavailable,
        "failed": failed,
        "config_differences_from_spo": config_differences(configs),
        "commands": {r.name: train_command(r, "new")[1:] for r in runs},
        "plots": [p.name for p in pngs],
    }
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(text)
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse(argv: Sequence[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--arms",
        nargs="+",
        default=None,
        metavar="ARM",
        help=f"arms to run (default: {' '.join(DEFAULT_ARMS)}; all: {' '.join(ARMS)})",
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm, 0..N-1 (default: 3; --quick: 1)")
    ap.add_argument(
        "--budget",
        type=int,
        default=None,
        help="generated trajectories per run (default: 96, 6 steps of 16; --quick: 16)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="runs at the same time, one core each (default: 2)")
    ap.add_argument("--out", default=None, help="study directory (default: runs/study, --quick: runs/study-quick)")
    ap.add_argument(
        "--source", default="procedural:arith-hard", help="problem source of every run (default: procedural:arith-hard)"
    )
    ap.add_argument(
        "--train-problems",
        type=int,
        default=None,
        help="training problems (`env.kwargs.num_problems`; default: budget / 3, so that a problem is drawn about "
        "three times in a run and the tracker's v_hat has something to go on)",
    )
    ap.add_argument(
        "--eval-limit", type=int, default=None, help="held-out problems per evaluation (default: 8; --quick: 2)"
    )
    ap.add_argument("--eval-k", type=int, default=4, help="samples per held-out problem (default: 4)")
    ap.add_argument(
        "--values-n",
        type=int,
        default=None,
        help="samples per problem of the offline estimate (default: 8; --quick: 2)",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a dotted override for every run (repeatable)"
    )
    ap.add_argument(
        "--no-pin", action="store_true", help="do not pin each run to its own core (threads are still limited to 1)"
    )
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's last checkpoint")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="every arm for 2 steps on the tiny random model (a smoke test of the study)",
    )
    ap.add_argument(
        "--summarize", action="store_true", help="only write the table, summary and plots from the runs in --out"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    a = ap.parse_args(argv)
    q = a.quick
    arms = a.arms or (list(ARMS) if q else DEFAULT_ARMS)
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        raise StudyError(f"unknown arm(s) {unknown}; the arms are {', '.join(ARMS)}")
    budget = a.budget or (16 if q else 96)
    eval_limit = a.eval_limit or (2 if q else 8)
    plan = Plan(
        out=Path(a.out or ("runs/study-quick" if q else "runs/study")).resolve(),
        arms=list(dict.fromkeys(arms)),
        seeds=list(range(a.seeds if a.seeds is not None else (1 if q else 3))),
        budget=budget,
        source=a.source,
        train_problems=a.train_problems or max(budget // 3, eval_limit),
        eval_k=a.eval_k,
        eval_limit=eval_limit,
        values_n=a.values_n or (2 if q else 8),
        jobs=max(1, a.jobs),
        quick=q,
        extra=list(a.set),
    )
    if not plan.seeds:
        raise StudyError("`--seeds` must be at least 1")
    if plan.eval_limit > plan.train_problems:
        raise StudyError(
            f"`--eval-limit` {plan.eval_limit} is more than `--train-problems` {plan.train_problems}, "
            "which also caps the held-out set"
        )
    return plan, a


def _check_source(plan: Plan) -> None:
    from spo_agents.envs.problems import load_problems

    load_problems(plan.source, "train", size=plan.train_problems)
    load_problems(plan.source, "test", size=max(plan.eval_limit, 1))


def _cores(plan: Plan, no_pin: bool) -> list[int] | None:
    if no_pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[: plan.jobs] if len(cpus) >= plan.jobs else None


def main(argv: Sequence[str] | None = None) -> int:
    from spo_agents.errors import SPOError

    try:
        plan, args = parse(argv)
        _check_source(plan)
        runs, unavailable, configs = make_runs(plan)
    except (StudyError, SPOError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, why in unavailable.items():
        print(f"[study] arm `{name}` unavailable: {why}", file=sys.stderr)
    if args.dry_run:
        if any(ARMS[r.arm].needs_values for r in runs):
            print(" ".join(values_command(plan)))
        for r in runs:
            print(" ".join(train_command(r, run_status(r)[0])))
        return 0
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "plan.json").write_text(json.dumps(dataclasses.asdict(plan), indent=1, default=str) + "\n")
    failed: dict[str, str] = {}
    if not args.summarize:
        t0 = time.time()
        jobs = schedule(plan, runs, args.keep_checkpoints, _cores(plan, args.no_pin))
        failed = {j.name: j.error or f"exit status {j.returncode}" for j in jobs if j.returncode != 0}
        print(f"[study] {len(jobs)} job(s) in {(time.time() - t0) / 60:.1f} min", flush=True)
    report(plan, runs, unavailable, configs, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
