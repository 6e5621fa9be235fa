"""`reasoning-gym-v0`: any `reasoning-gym` generator as a tool environment.

The generator is chosen by name (`task="prime_factorization"`). The model may run Python between
`<code>` and `</code>` as in `math-python` and gives its final answer between `<answer>` and
`</answer>`. The generator's own scorer gives the reward; several scorers evaluate the answer as
Python, so each answer is scored in a fresh fork of a `local` sandbox worker, never in the
trainer's process.

Observation, action, reward rules, termination and options: docs/environments.md, section
"reasoning-gym-v0". Version history: v0, the first.

Departures from reasoning-gym's scorers:
1. The reward is 1.0 only for a full score by default: partial credit is a format reward, which
   SPO does not use (`partial_credit=True` keeps the score).
"""

from __future__ import annotations

import base64
import pickle
import re
import threading
from typing import Any

from spo_agents.errors import DatasetError, EnvError, SandboxError, did_you_mean
from spo_agents.types import Problem

from .answers import extract_boxed
from .base import Message, open_sync_session
from .problems import content_split
from .tool_env import ToolEnv, Verdict, tool_example

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves reasoning tasks. You can run Python code: write it "
    "between <code> and </code> and its output will be shown between <interpreter> and "
    "</interpreter>. You can run code at most {max_tool_calls} times. Give the final answer "
    "between <answer> and </answer>, in the format the task asks for."
)
ONE_SHOT_QUESTION = "What is the sum of the squares of 3, 4 and 12?"
ONE_SHOT_CODE = "print(3**2 + 4**2 + 12**2)"
ONE_SHOT_OUTPUT = "169"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_CACHE: dict[Any, tuple[list[Problem], Any]] = {}
_CACHE_LOCK = threading.Lock()


def extract_answer(text: str | None) -> str | None:
    """The content of the last `<answer>...</answer>`, else of the last `\\boxed{...}`, else None."""
    if not text:
        return None
    found = _ANSWER.findall(text)
    if found:
        return found[-1].strip()
    return extract_boxed(text)


def _freeze(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def load_task(
    task: str,
    split: str,
    num_problems: int,
    *,
    seed: int = 0,
    test_fraction: float = 0.1,
    task_config: dict[str, Any] | None = None,
) -> tuple[list[Problem], Any]:
    """The problems of one split of a reasoning-gym task, and a dataset whose `score_answer`
    scores them. Cached per arguments, so the env instances of a run share one set.

    Each problem keeps the generator's entry (`metadata["entry"]`), which its scorer needs."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if split not in ("train", "test"):
        raise DatasetError(f"`split` must be `train` or `test`, got `{split}`")
    if task not in DATASETS:
        raise DatasetError(
            f"reasoning-gym has no task `{task}`.{did_you_mean(task, DATASETS)} It has {len(DATASETS)} tasks, "
            "e.g. `basic_arithmetic`, `prime_factorization`, `countdown`."
        )
    if num_problems < 1 or not 0.0 < test_fraction < 1.0:
        raise DatasetError(
            f"`num_problems` must be >= 1 and `test_fraction` in (0, 1), got {num_problems} and {test_fraction}"
        )
    config = dict(task_config or {})
    key = (task, split, num_problems, seed, test_fraction, _freeze(config))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    share = test_fraction if split == "test" else 1.0 - test_fraction
    dataset = None
    for chunk in range(64):
        rg_seed = seed * 1000 + chunk
        size = max(16, int((num_problems - len(problems)) / share * 1.2) + 8)
        try:
            dataset = reasoning_gym.create_dataset(task, size=size, seed=rg_seed, **config)
        except Exception as e:
            raise DatasetError(f"cannot create reasoning-gym task `{task}` with settings {config}: {e}") from e
        for i in range(size):
            entry = dataset[i]
            question, answer = str(entry["question"]), str(entry["answer"])
            if (question, answer) in seen or content_split(question, answer, test_fraction) != split:
                continue
            seen.add((question, answer))
            meta = {"source": f"reasoning-gym:{task}", "rg_seed": rg_seed, "rg_index": i, "entry": dict(entry)}
            problems.append(Problem(f"rg:{task}:{rg_seed}:{i}", question, answer, meta))
            if len(problems) == num_problems:
                break
        if len(problems) == num_problems:
            break
    if not problems or dataset is None:
        raise DatasetError(
            f"reasoning-gym task `{task}` produced no `{split}` problems; widen its settings in `task_config`"
        )
    with _CACHE_LOCK:
        _CACHE.setdefault(key, (problems, dataset))
        return _CACHE[key]


class _ScoreError(Exception):
    """A scorer that raised, ran out of time, or could not be run."""


_SCORE_BACKEND: Any = None
_SCORE_LOCK = threading.Lock()


def _score_backend() -> Any:
    """One process-wide `local` backend with `reasoning_gym` pre-imported in its worker."""
    global _SCORE_BACKEND
    with _SCORE_LOCK:
        if _SCORE_BACKEND is None:
            from spo_agents.sandboxes import make_backend

            _SCORE_BACKEND = make_backend("local", stateless=True, preload=["numpy", "sympy", "reasoning_gym"])
        return _SCORE_BACKEND


class _SandboxedScorer:
    """`dataset.score_answer(answer, entry)` run in a fresh sandbox fork per answer (see the
    module docstring): the scorer may evaluate the answer as Python, so it must not run here."""

    def __init__(self, task: str, task_config: dict[str, Any] | None, seed: int, timeout_s: float) -> None:
        self.setup = (
            "import base64, pickle, reasoning_gym\n"
            f"_ds = reasoning_gym.create_dataset({task!r}, size=1, seed={int(seed)}, "
            f"**pickle.loads(base64.b64decode({_b64(task_config or {})!r})))\n"
        )
        self.timeout_s = timeout_s

    def score(self, answer: str, entry: Any) -> float:
        code = (
            self.setup
            + f"_entry = pickle.loads(base64.b64decode({_b64(entry)!r}))\n"
            + f"print(repr(float(_ds.score_answer({answer!r}, _entry))))\n"
        )
        try:
            session = open_sync_session(_score_backend(), stateless=True, limits=None)
            try:
                result = session.run(code, timeout=self.timeout_s)
            finally:
                session.close()
        except SandboxError as e:
            raise _ScoreError(f"SandboxError: {e}") from e
        if result.timed_out:
            raise _ScoreError(f"the scorer took longer than {self.timeout_s} s")
        if result.exception:  # its last line, e.g. `ValueError: ...`
            raise _ScoreError((result.exception.strip().splitlines() or ["the scorer raised"])[-1])
        try:
            return float(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise _ScoreError(f"the scorer printed no score: {result.stdout[-200:]!r} {result.stderr[-200:]!r}") from e


def _b64(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode("ascii")


class ReasoningGymEnv(ToolEnv):
    """Any reasoning-gym generator as a tool env, scored by the generator's own scorer."""

    default_system_prompt = SYSTEM_PROMPT
    rescorable = False  # the scorer runs in a sandbox: `spo-agent rescore` evaluates again instead

    def __init__(
        self,
        split: str = "train",
        *,
        task: str = "basic_arithmetic",
        task_config: dict[str, Any] | None = None,
        num_problems: int | None = None,
        seed: int = 0,
        test_fraction: float = 0.1,
        partial_credit: bool = False,
        score_timeout_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        if "problems" in kwargs or "source" in kwargs:
            raise EnvError(
                "`reasoning-gym` makes its problems from `task` / `task_config`; "
                "for your own problem files use `math-python` with `source=`"
            )
        size = num_problems if num_problems is not None else (500 if split == "train" else 100)
        problems, self._dataset = load_task(
            task, split, size, seed=seed, test_fraction=test_fraction, task_config=task_config
        )
        self.task = task
        self.partial_credit = partial_credit
        self._scorer = _SandboxedScorer(task, task_config, seed, timeout_s=score_timeout_s)
        super().__init__(problems, **kwargs)
        self.split = split

    def one_shot_messages(self) -> list[Message]:
        answer = f"<answer>{ONE_SHOT_OUTPUT}</answer>"
        return tool_example(ONE_SHOT_QUESTION, ONE_SHOT_CODE, ONE_SHOT_OUTPUT, answer)

    def extract_answer(self, text: str) -> str | None:
        return extract_answer(text)

    def score(self, answer: str | None, problem: Problem) -> tuple[float, str | None]:
        """(the scorer's value clipped to [0, 1], error message of a scorer that raised)."""
        if answer is None:
            return 0.0, None
        try:
            value = self._scorer.score(answer, problem.metadata["entry"])
        except _ScoreError as e:  # the generator's scorer raised, timed out, or the sandbox failed
            return 0.0, str(e)[:300]
        if value != value:
            return 0.0, "the scorer returned NaN"
        return min(1.0, max(0.0, value)), None

    def score_answer(self, answer: str | None, problem: Problem) -> Verdict:
        """The generator's score: 1/0 by default, the score itself with `partial_credit`."""
        score, error = self.score(answer, problem)
        reward = score if self.partial_credit else float(score >= 1.0)
        info: dict[str, Any] = {"score": score}
        if error:
            info["check_error"] = error
        return Verdict(reward, score >= 1.0, "scorer" if answer is not None else "no_answer", info)

    def answers_equivalent(self, a: Any, b: Any) -> bool:
        """Equal after collapsing whitespace (the generators' answers are canonical strings)."""
        if a is None or b is None:
            return False
        return " ".join(str(a).split()) == " ".join(str(b).split())
