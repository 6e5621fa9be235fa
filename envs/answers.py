"""Final answers: extraction of the last `\\boxed{...}` and a symbolic equivalence check.

The reward of `math-python` is 1 when the last `\\boxed{}` of the model's text is equivalent to the
reference (docs/algorithm.md section 5; the paper's authors used exact string match, a symbolic checker
is better). The check runs in three steps, cheapest first:

1. normalised string equality (`\\frac12` and `\\frac{1}{2}`, `$5$` and `5`, `1{,}000` and `1000`);
2. exact numbers (integers, decimals, `a/b`, `\\frac{a}{b}`): equal values are equivalent, and two
   different integers are not;
3. everything else goes to `math-verify` (sympy) in a separate worker process.

`math-verify` bounds its own work with `signal.alarm`, which works only on a process's main
thread; environments run in rollout worker threads. So the symbolic step runs in a small pool
of worker processes (`python -m spo_agents.envs.answers`, one request at a time each) with a
per-check wall-clock timeout: a check that takes too long counts as incorrect, its worker is
killed and replaced, and `AnswerChecker.timeouts` counts it. Subprocesses rather than
`multiprocessing` because forking a process with live threads is unsafe and `spawn` re-imports
the user's main script.

What is covered: numbers in any common notation, fractions, percentages, roots, pi, intervals,
tuples, simple expressions and equations (`x = 3` matches `3`), LaTeX text wrappers.
What is not: answers longer than `MAX_ANSWER_CHARS` (incorrect without a check), free-text
answers beyond exact match, units the reference does not carry.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from spo_agents.processes import LiveRegistry

MAX_ANSWER_CHARS = 1000
DEFAULT_TIMEOUT_S = 5.0
WORKER_START_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(text: str | None) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`, with
    nested braces balanced; `None` when there is none or the last one is never closed."""
    if not text:
        return None
    last: str | None = None
    for m in _BOX.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            last = text[i + 1 : j] if depth == 0 and j < len(text) else None
        else:
            word = re.match(r"[^\s$}]+", text[i:])
            last = word.group(0) if word and m.group(0).endswith(" ") else None
    return last.strip() if last is not None else None


# --------------------------------------------------------------------------------------------
# The cheap checks
# --------------------------------------------------------------------------------------------
_STRIP = [r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", "~"]
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")  # 12, -0.5, .5, 1e3, 2.5E-2
_INT_COMMAS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+$")


def normalize(answer: Any) -> str:
    """A canonical spelling for string comparison (whitespace, `$`, spacing commands, `\\text{}`
    wrappers, `\\dfrac`, thousands separators `{,}` and a trailing period removed)."""
    s = str(answer).strip()
    for token in _STRIP:
        s = s.replace(token, "")
    s = _TEXT.sub(r"\1", s)
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace("{,}", "")
    s = re.sub(r"\s+", "", s)
    m = _FRAC_SHORT.match(s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    return s.rstrip(".")


def exact_number(answer: Any) -> Fraction | None:
    """The exact value of an answer written as an integer, decimal, `a/b` or `\\frac{a}{b}`."""
    s = normalize(answer)
    if _INT_COMMAS.match(s):
        s = s.replace(",", "")
    try:
        if _NUMBER.match(s):
            return Fraction(s)
        m = _FRAC.match(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if re.match(r"^-?\d+/-?\d+$", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _is_integer_text(answer: Any) -> bool:
    s = normalize(answer)
    return bool(re.match(r"^[-+]?\d+$", s) or _INT_COMMAS.match(s))


def quick_check(pred: Any, ref: Any) -> bool | None:
    """Decide equivalence without sympy when it is certain; `None` when a symbolic check is needed."""
    a, b = normalize(pred), normalize(ref)
    if not a:
        return False
    if a == b:
        return True
    x, y = exact_number(pred), exact_number(ref)
    if x is not None and y is not None:
        if x == y:
            return True
        if _is_integer_text(pred) and _is_integer_text(ref):
            return False
    return None


# --------------------------------------------------------------------------------------------
# The symbolic check, in worker processes
# --------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """The outcome of one equivalence check.

    `method`: `empty` (no answer), `too-long`, `string`/`number` (decided without sympy),
    `math-verify`, `timeout` (the symbolic check ran past its bound: counted incorrect) or
    `error` (the checker itself failed: counted incorrect, `error` says why).
    """

    correct: bool
    method: str
    seconds: float = 0.0
    error: str | None = None

    @property
    def timed_out(self) -> bool:
        return self.method == "timeout"


def _verify_in_process(gold: str, pred: str) -> bool:
    """math-verify without its signal-based timeouts (the caller bounds the time)."""
    import math_verify

    wrap = lambda s: s if "\\boxed" in s else "\\boxed{" + s + "}"  # noqa: E731
    g = math_verify.parse(wrap(gold), parsing_timeout=None)
    p = math_verify.parse(wrap(pred), parsing_timeout=None)
    if not g or not p:
        return False
    return bool(math_verify.verify(g, p, timeout_seconds=None))


class _Worker:
    """One `python -m spo_agents.envs.answers` process answering JSON lines."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONHASHSEED", "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spo_agents.envs.answers", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buf = b""
        ready = self._read_line(WORKER_START_TIMEOUT_S)
        if ready is None or json.loads(ready).get("ready") is not True:
            self.kill()
            raise RuntimeError("the answer-checking worker did not start (is `math-verify` installed?)")

    def _read_line(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # the worker died
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", errors="replace")

    def ask(self, gold: str, pred: str, timeout: float) -> tuple[bool, str | None] | None:
        """(correct, error) or `None` when the worker ran past `timeout` or died."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(timeout)
        if line is None:
            return None
        reply = json.loads(line)
        return bool(reply.get("correct")), reply.get("error")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not reap it
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


class AnswerChecker:
    """Equivalence checks with a bounded time per check, safe to call from any thread.

    `workers` processes are started on first need (about a second each, mostly importing sympy)
    and reused; a check waits for a free worker, then gets `timeout_s` of its time.
    Counters: `checks`, `symbolic` (those that reached math-verify), `timeouts`, `errors`.
    """

    def __init__(self, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if workers < 1:
            raise ValueError(f"`workers` must be at least 1, got {workers}")
        self.timeout_s = timeout_s
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._slots.put(None)  # started lazily
        self._lock = threading.Lock()
        self._closed = False
        self.checks = self.symbolic = self.timeouts = self.errors = 0
        _LIVE.add(self)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def check(self, pred: Any, ref: Any, timeout_s: float | None = None) -> CheckResult:
        """Whether the answer `pred` is equivalent to the reference `ref`."""
        start = time.perf_counter()
        self._count(checks=1)
        if pred is None or not str(pred).strip():
            return CheckResult(False, "empty", time.perf_counter() - start)
        pred_s, ref_s = str(pred), str(ref)
        if len(pred_s) > MAX_ANSWER_CHARS:
            return CheckResult(False, "too-long", time.perf_counter() - start)
        quick = quick_check(pred_s, ref_s)
        if quick is not None:
            same = normalize(pred_s) == normalize(ref_s)
            return CheckResult(quick, "string" if same else "number", time.perf_counter() - start)
        self._count(symbolic=1)
        if self._closed:
            return CheckResult(False, "error", time.perf_counter() - start, "the checker is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        worker = self._slots.get()
        try:
            if worker is None or not worker.alive():
                try:
                    worker = _Worker()
                except (RuntimeError, OSError) as e:
                    worker = None
                    self._count(errors=1)
                    return CheckResult(False, "error", time.perf_counter() - start, str(e))
            reply = worker.ask(ref_s, pred_s, timeout)
            if reply is None:
                worker.kill()
                worker = None
                self._count(timeouts=1)
                return CheckResult(False, "timeout", time.perf_counter() - start, f"no verdict within {timeout:g} s")
            correct, error = reply
            if error is not None:
                self._count(errors=1)
                return CheckResult(False, "error", time.perf_counter() - start, error)
            return CheckResult(correct, "math-verify", time.perf_counter() - start)
        finally:
            self._slots.put(worker)

    def close(self) -> None:
        """Stop the worker processes. Safe to call twice."""
        self._closed = True
        _LIVE.discard(self)
        workers = []
        while True:
            try:
                workers.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for w in workers:
            if w is not None:
                w.kill()
            self._slots.put(None)


#: Every checker not yet closed; those left are closed at interpreter exit.
_LIVE: LiveRegistry[AnswerChecker] = LiveRegistry("answer checker", AnswerChecker.close)
_DEFAULT: AnswerChecker | None = None
_DEFAULT_LOCK = threading.Lock()


def default_checker() -> AnswerChecker:
    """The process-wide checker (two workers), created on first use and closed at exit."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            _DEFAULT = AnswerChecker()
        return _DEFAULT


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------
def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    import logging

    logging.disable(logging.WARNING)
    import math_verify  # noqa: F401  (import before announcing readiness)

    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            reply: dict[str, Any] = {"correct": _verify_in_process(str(req["gold"]), str(req["pred"])), "error": None}
        except Exception as e:  # any failure of the checker is reported, the worker lives on
            reply = {"correct": False, "error": f"{type(e).__name__}: {e}"[:500]}
        out.write((json.dumps(reply) + "\n").encode())
        out.flush()


if __name__ == "__main__" and "--worker" in sys.argv:  # pragma: no cover
    _worker_main()
