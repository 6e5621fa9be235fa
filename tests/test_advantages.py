"""Advantage estimators (docs/algorithm.md section 2): hand values, reference loops, properties."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spo_agents.algorithm.advantages import (
    compute_advantages,
    degenerate_share,
    grpo_advantages,
    no_baseline_advantages,
    rloo_advantages,
    spo_advantages,
)
from spo_agents.errors import ConfigError

FAST = settings(max_examples=80, deadline=None)
unit = st.floats(0.0, 1.0)
batch = st.integers(1, 40).flatmap(
    lambda b: st.tuples(st.lists(unit, min_size=b, max_size=b), st.lists(unit, min_size=b, max_size=b))
)
grouped = st.lists(st.tuples(st.sampled_from([0.0, 1.0, 0.5]), st.integers(0, 5)), min_size=1, max_size=40)


# ------------------------------------------------------------------ reference loops
def ref_spo(rewards, v):
    a = [r - b for r, b in zip(rewards, v)]
    if max(a) == min(a):
        return [0.0] * len(a)
    mean = sum(a) / len(a)
    std = math.sqrt(sum((x - mean) ** 2 for x in a) / len(a))
    return [(x - mean) / (std + 1e-8) for x in a]


def ref_grpo(rewards, groups):
    out = []
    for r, g in zip(rewards, groups):
        rs = [x for x, h in zip(rewards, groups) if h == g]
        out.append(0.0 if max(rs) == min(rs) else (r - statistics.mean(rs)) / (statistics.stdev(rs) + 1e-8))
    return out


def ref_rloo(rewards, groups):
    out = []
    for i, (r, g) in enumerate(zip(rewards, groups)):
        others = [x for j, (x, h) in enumerate(zip(rewards, groups)) if h == g and j != i]
        same = max(others + [r]) == min(others + [r])
        out.append(0.0 if same else r - sum(others) / len(others))
    return out


# ------------------------------------------------------------------ hand-computed values
def test_spo_by_hand():
    # A = [0.5, -0.5, 0.1, 0.9]; mean 0.25; population std sqrt(0.2525)
    a = spo_advantages([1, 0, 1, 1], [0.5, 0.5, 0.9, 0.1])
    std = math.sqrt(((0.25**2) + (0.75**2) + (0.15**2) + (0.65**2)) / 4)
    np.testing.assert_allclose(a, np.array([0.25, -0.75, -0.15, 0.65]) / (std + 1e-8), rtol=1e-12)


def test_grpo_by_hand():
    # group 0: [1, 0] -> mean 0.5, sample std 0.7071; group 1: [1, 1] -> degenerate
    a = grpo_advantages([1, 0, 1, 1], ["x", "x", "y", "y"])
    np.testing.assert_allclose(a, [0.5 / (math.sqrt(0.5) + 1e-8), -0.5 / (math.sqrt(0.5) + 1e-8), 0, 0])


def test_rloo_by_hand():
    # group 0: [1, 0, 1] -> [1 - 0.5, 0 - 1, 1 - 0.5]; group 1: a single sample -> 0
    np.testing.assert_allclose(rloo_advantages([1, 0, 1, 1], [0, 0, 0, 1]), [0.5, -1.0, 0.5, 0.0])


def test_degenerate_share_by_hand():
    # groups: a = [1, 1] (degenerate), b = [0, 1], c = [0] (degenerate, single)
    assert degenerate_share([1, 1, 0, 1, 0], ["a", "a", "b", "b", "c"]) == pytest.approx(3 / 5)


# ------------------------------------------------------------------ reference loops, as properties
@FAST
@given(batch)
def test_spo_matches_reference_loop(rv):
    r, v = rv
    np.testing.assert_allclose(spo_advantages(r, v), ref_spo(r, v), rtol=1e-9, atol=1e-9)


@FAST
@given(grouped)
def test_grpo_matches_reference_loop(rg):
    r, g = zip(*rg)
    np.testing.assert_allclose(grpo_advantages(r, g), ref_grpo(r, g), rtol=1e-9, atol=1e-12)


@FAST
@given(grouped)
def test_rloo_matches_reference_loop(rg):
    r, g = zip(*rg)
    np.testing.assert_allclose(rloo_advantages(r, g), ref_rloo(r, g), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ properties
@FAST
@given(batch)
def test_normalised_advantages_have_mean_zero_std_one(rv):
    r, v = rv
    a = np.subtract(r, v)
    assume(a.std() > 1e-3)
    out = spo_advantages(r, v)
    assert abs(out.mean()) < 1e-9
    assert out.std() == pytest.approx(1.0, abs=1e-4)


@FAST
@given(st.integers(1, 30), unit, unit)
def test_constant_batch_gives_zeros_not_nan(b, r, v):
    for out in (
        spo_advantages([r] * b, [v] * b),
        no_baseline_advantages([r] * b),
        grpo_advantages([r] * b, [0] * b),
        rloo_advantages([r] * b, [0] * b),
    ):
        assert np.array_equal(out, np.zeros(b))


@FAST
@given(batch, st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_the_result(rv, rnd):
    r, v = np.array(rv[0]), np.array(rv[1])
    p = np.arange(r.size)
    rnd.shuffle(p)
    np.testing.assert_allclose(spo_advantages(r[p], v[p]), spo_advantages(r, v)[p], atol=1e-9)
    g = np.arange(r.size) % 3
    np.testing.assert_allclose(grpo_advantages(r[p], g[p]), grpo_advantages(r, g)[p], atol=1e-9)


def test_no_baseline_is_spo_with_zero_values():
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    np.testing.assert_array_equal(no_baseline_advantages(r), spo_advantages(r, np.zeros(5)))


def test_baseline_changes_the_ranking_of_equal_rewards():
    # two correct answers: the one on a hard problem (v = 0.1) gets the larger advantage
    a = spo_advantages([1, 1, 0], [0.1, 0.9, 0.5])
    assert a[0] > a[1]


def test_empty_batch_gives_empty():
    assert spo_advantages([], []).shape == (0,)


# ------------------------------------------------------------------ dispatch and errors
def test_dispatch_by_config_name():
    r, v, g = [1.0, 0.0, 1.0, 0.0], [0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1]
    np.testing.assert_array_equal(compute_advantages("spo", r, v), spo_advantages(r, v))
    np.testing.assert_array_equal(compute_advantages("spo-no-baseline", r), no_baseline_advantages(r))
    np.testing.assert_array_equal(compute_advantages("grpo", r, group_ids=g), grpo_advantages(r, g))
    np.testing.assert_array_equal(compute_advantages("rloo", r, group_ids=g), rloo_advantages(r, g))


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match="Did you mean `grpo`"):
        compute_advantages("grpoo", [1.0])


def test_missing_inputs_are_named():
    with pytest.raises(ConfigError, match="v_hat_before"):
        compute_advantages("spo", [1.0])
    with pytest.raises(ConfigError, match="group_ids"):
        compute_advantages("rloo", [1.0])


def test_mismatched_lengths_and_nan_are_rejected():
    with pytest.raises(ConfigError, match="expected 2"):
        spo_advantages([1.0, 0.0], [0.5])
    with pytest.raises(ConfigError, match="finite"):
        spo_advantages([1.0, float("nan")], [0.5, 0.5])


@FAST
@given(grouped)
def test_degenerate_share_matches_reference_loop(rg):
    r, g = zip(*rg)
    same = [len({x for x, h in zip(r, g) if h == gi}) == 1 for gi in g]
    assert degenerate_share(r, g) == pytest.approx(sum(same) / len(same))


@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.integers(0, 300)), min_size=2, max_size=40),
)
def test_token_measure_advantages_have_token_weighted_mean_0_and_std_1(rows):
    r = np.array([a for a, _, _ in rows])
    v = np.array([b for _, b, _ in rows])
    n = np.array([c for _, _, c in rows], dtype=float)
    a = r - v
    assume(n.sum() > 0)
    # the normaliser is std + 1e-8: a token-weighted spread of at least 1e-2 keeps that term below
    # the tolerance (a spread of 1e-3 over ptp could still leave a token-weighted std near 1e-3)
    spread = math.sqrt(np.sum(n * (a - np.sum(n * a) / n.sum()) ** 2) / n.sum())
    assume(spread > 1e-2)
    out = compute_advantages("spo", r, v, token_counts=n)
    # SPO++'s action-token measure: every trained token counts once
    mean = np.sum(n * out) / n.sum()
    std = math.sqrt(np.sum(n * (out - mean) ** 2) / n.sum())
    assert mean == pytest.approx(0.0, abs=1e-6) and std == pytest.approx(1.0, rel=1e-5)


def test_token_measure_by_hand():
    # A = [1, 0], tokens [3, 1]: m = 3/4, s = sqrt((3 * 1/16 + 1 * 9/16) / 4) = sqrt(3)/4
    out = compute_advantages("spo", [1.0, 0.0], [0.0, 0.0], token_counts=[3, 1])
    s = math.sqrt(3) / 4
    assert out.tolist() == pytest.approx([0.25 / s, -0.75 / s], rel=1e-6)
    with pytest.raises(ConfigError, match="token-measure"):
        compute_advantages("grpo", [1.0, 0.0], group_ids=[0, 0], token_counts=[3, 1])
