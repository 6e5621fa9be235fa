"""Evaluation metrics of the paper's App. D (docs/algorithm.md section 6), as small pure functions.

- avg@k: mean correctness over the k samples of a problem.
- pass@k: the unbiased estimator 1 - C(n - c, k) / C(n, k) from n >= k samples with c correct,
  computed as a product (1 - C(n-c,k)/C(n,k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)), which never
  forms the huge binomials and stays exact to float precision for any n.
- maj@k: correctness of the most frequent final answer, with equivalent answers counted together
  (`equivalent(a, b)`, the environment's `answers_equivalent`). Samples without an answer do not
  vote (`None`; `evaluation.compute_report` also withholds the answer of an episode a budget cut
  off, which never finished). An answer cluster is correct when the environment judged any of its
  members correct against the reference: the verdict belongs to the answer, not to whichever
  sample came first. When several clusters tie for the most votes, maj@k is the fraction of the
  tied clusters that are correct (the expected score of a uniformly random tie-break). So the
  metric is invariant under any permutation of the samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct (requires 0 <= c <= n and 1 <= k <= n)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_up_to(k: int) -> list[int]:
    """1, 2, 4, ... up to `k`, and `k` itself."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    out.append(k)
    return out


def cluster_answers(answers: Sequence[Any], equivalent: Callable[[Any, Any], bool]) -> list[list[int]]:
    """Group sample indices by equivalent answer (first-seen order); `None` answers are left out."""
    clusters: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for cl in clusters:
            if equivalent(answers[cl[0]], a):
                cl.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def majority_correct(answers: Sequence[Any], correct: Sequence[bool], equivalent: Callable[[Any, Any], bool]) -> float:
    """maj@k of one problem from each sample's answer (`None`: no vote) and the environment's
    verdict on that answer; 0.0 when no sample gave an answer (see the module docstring)."""
    if len(answers) != len(correct):
        raise ValueError(f"maj@k needs one verdict per answer, got {len(answers)} answers and {len(correct)} verdicts")
    clusters = cluster_answers(answers, equivalent)
    if not clusters:
        return 0.0
    top = max(len(cl) for cl in clusters)
    tied = [cl for cl in clusters if len(cl) == top]
    return sum(1.0 for cl in tied if any(correct[i] for i in cl)) / len(tied)
