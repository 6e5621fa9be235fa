"""ValueTracker (docs/algorithm.md section 1): hand-computed values, a slow reference loop, properties."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_agents.algorithm.tracker import UnknownProblemError, ValueTracker
from spo_agents.config import TrackerConfig
from spo_agents.errors import CheckpointError, ConfigError, SPOError

IDS = [f"prob-{i}" for i in range(8)]
FAST = settings(max_examples=60, deadline=None)


class ReferenceTracker:
    """The tracker written as the paper states it: one Python loop iteration per reward."""

    def __init__(self, n, *, rho_type="kl-adaptive", rho_constant=0.96, d_half=0.06, rho_min=0.875, rho_max=0.96):
        self.alpha = [0.5] * n
        self.beta = [0.5] * n
        self.last = [None] * n
        self.C = 0.0
        self.kw = dict(rho_type=rho_type, rho_constant=rho_constant, d_half=d_half, rho_min=rho_min, rho_max=rho_max)

    def rho(self, i, drift=None):
        kw = self.kw
        if kw["rho_type"] == "constant":
            return kw["rho_constant"]
        if self.last[i] is None:
            d = 0.0
        elif drift is not None:
            d = drift
        else:
            d = self.C - self.last[i]
        return min(max(2.0 ** (-d / kw["d_half"]), kw["rho_min"]), kw["rho_max"])

    def update(self, idx, rewards, drift=None):
        acted_on = set()  # problems already folded in by this update
        for k, (i, r) in enumerate(zip(idx, rewards)):
            # D(x) is how far the policy moved since it last acted on x; a second copy of x in
            # one update follows the first with no optimiser step in between, so its D is 0.
            d = 0.0 if i in acted_on else (None if drift is None else drift[k])
            acted_on.add(i)
            rho = self.rho(i, d)
            self.alpha[i] = rho * self.alpha[i] + r
            self.beta[i] = rho * self.beta[i] + (1 - r)
            self.last[i] = self.C

    def v_hat(self):
        return [a / (a + b) for a, b in zip(self.alpha, self.beta)]


# ------------------------------------------------------------------ hand-computed values
def test_first_update_uses_rho_max_by_hand():
    t = ValueTracker(IDS)
    t.add_drift(5.0)  # large drift before the first visit must not matter
    t.update(t.indices(["prob-2"]), [1.0])
    # alpha = 0.96 * 0.5 + 1 = 1.48, beta = 0.96 * 0.5 + 0 = 0.48
    assert t.alpha[2] == pytest.approx(1.48, rel=1e-6)
    assert t.beta[2] == pytest.approx(0.48, rel=1e-6)
    assert t.v_hat([2])[0] == pytest.approx(1.48 / 1.96, rel=1e-6)


@pytest.mark.parametrize(
    "drift, expected",
    [
        (0.0, 0.96),  # 2**0 = 1 -> clipped to rho_max
        (0.001, 0.96),  # 2**(-1/60) = 0.9885 -> clipped to rho_max
        (0.01, 2.0 ** (-1 / 6)),  # 0.8909, inside [0.875, 0.96]
        (0.06, 0.875),  # 0.5 -> clipped to rho_min
    ],
)
def test_rho_formula_with_clipping(drift, expected):
    t = ValueTracker(IDS)
    t.update([0], [1.0])  # visited at C = 0
    t.add_drift(drift)
    assert t.rho([0])[0] == pytest.approx(expected, rel=1e-12)


def test_unvisited_problem_gets_rho_max_in_per_prompt_mode():
    t = ValueTracker(IDS, drift="per-prompt")
    assert t.rho([0, 1], drift=[0.5, 0.5]).tolist() == [0.96, 0.96]
    t.update([0], [1.0], drift=[0.5])
    assert t.rho([0, 1], drift=[0.01, 0.01]).tolist() == pytest.approx([2.0 ** (-1 / 6), 0.96])


def test_per_prompt_mode_requires_drift():
    t = ValueTracker(IDS, drift="per-prompt")
    with pytest.raises(ConfigError, match="per-prompt"):
        t.update([0], [1.0])


def test_constant_rho_ablation_ignores_drift():
    t = ValueTracker(IDS, rho_type="constant", rho_constant=0.9)
    t.update([0], [1.0])
    t.add_drift(1.0)
    assert t.rho([0, 1]).tolist() == [0.9, 0.9]


def test_offline_init_uses_actual_sample_count():
    t = ValueTracker(IDS)
    # problem 0: 3 of 4 (fewer drawn than a configured n0 = 8); problem 1: 0 drawn; problem 2: 2 of 8
    t.init_offline([0, 1, 2], successes=[3, 0, 2], samples=[4, 0, 8])
    n0 = 1 / (1 - 0.875)  # 8
    assert t.alpha[0] == pytest.approx(n0 * 3.5 / 5, rel=1e-6)  # 5.6
    assert t.beta[0] == pytest.approx(n0 * 1.5 / 5, rel=1e-6)  # 2.4
    # regression: the configured-n formula would give beta = 8 * (8 - 3 + 0.5) / 9 = 4.89
    assert t.beta[0] != pytest.approx(n0 * 5.5 / 9, rel=1e-3)
    assert (t.alpha[1], t.beta[1]) == (0.5, 0.5)
    assert t.alpha[2] == pytest.approx(n0 * 2.5 / 9, rel=1e-6)
    assert t.beta[2] == pytest.approx(n0 * 6.5 / 9, rel=1e-6)
    assert t.rho([0])[0] == 0.96  # offline values are not a visit


def test_offline_init_rejects_impossible_counts():
    t = ValueTracker(IDS)
    with pytest.raises(ConfigError, match="successes <= samples"):
        t.init_offline([0], successes=[5], samples=[4])


def test_rewards_outside_unit_interval_follow_moving_average():
    t = ValueTracker(IDS)
    v, n = 0.5, 1.0
    for r in [2.0, -1.0, 3.5, 0.25]:
        rho = t.rho([0])[0]
        eta = 1.0 / (rho * n + 1.0)
        v, n = v + eta * (r - v), rho * n + 1.0
        t.update([0], [r])
    assert t.v_hat([0])[0] == pytest.approx(v, rel=1e-5)
    assert float(t.alpha[0]) + float(t.beta[0]) == pytest.approx(n, rel=1e-6)


def test_non_finite_reward_is_rejected():
    t = ValueTracker(IDS)
    with pytest.raises(ConfigError, match="finite"):
        t.update([0], [float("nan")])


# ------------------------------------------------------------------ addressing
def test_indices_follow_construction_order():
    t = ValueTracker(IDS)
    assert t.indices(["prob-5", "prob-0", "prob-5"]).tolist() == [5, 0, 5]
    assert t.indices(["prob-5"]).dtype == np.int64


def test_unknown_id_error_names_first_and_count():
    t = ValueTracker(IDS)
    with pytest.raises(UnknownProblemError, match=r"`nope-1` \(2 of 3 ids unknown\)") as e:
        t.indices(["prob-1", "nope-1", "nope-2"])
    assert isinstance(e.value, SPOError)


def test_duplicate_ids_rejected_at_construction():
    with pytest.raises(ConfigError, match="duplicate problem id `prob-1`"):
        ValueTracker(["prob-0", "prob-1", "prob-1"])


def test_out_of_range_index_rejected():
    with pytest.raises(UnknownProblemError, match="out of range"):
        ValueTracker(IDS).update([8], [1.0])


def test_memory_at_most_32_bytes_per_problem():
    t = ValueTracker([f"p{i}" for i in range(10_000)])
    assert t.nbytes / len(t) <= 32


# ------------------------------------------------------------------ reference loop and properties
ops = st.lists(
    st.tuples(
        st.lists(st.integers(0, 7), min_size=1, max_size=12),  # indices (duplicates allowed)
        st.floats(0.0, 0.2),  # drift added before the update
        st.integers(0, 2**31 - 1),  # seed of the rewards
    ),
    min_size=1,
    max_size=6,
)


@FAST
@given(ops)
def test_cumulative_mode_matches_reference_loop(steps):
    t, ref = ValueTracker(IDS), ReferenceTracker(8)
    for idx, d, seed in steps:
        r = np.random.default_rng(seed).random(len(idx)).round(2)
        t.add_drift(d)
        ref.C += d
        t.update(np.array(idx), r)
        ref.update(idx, r.tolist())
    np.testing.assert_allclose(t.alpha, ref.alpha, rtol=1e-5)
    np.testing.assert_allclose(t.beta, ref.beta, rtol=1e-5)


@FAST
@given(ops)
def test_per_prompt_mode_matches_reference_loop(steps):
    t, ref = ValueTracker(IDS, drift="per-prompt"), ReferenceTracker(8)
    for idx, d, seed in steps:
        rng = np.random.default_rng(seed)
        r = (rng.random(len(idx)) < 0.5).astype(float)
        drift = rng.random(len(idx)) * d
        t.update(np.array(idx), r, drift=drift)
        ref.update(idx, r.tolist(), drift=drift.tolist())
    np.testing.assert_allclose(t.v_hat(), ref.v_hat(), rtol=1e-5)


def test_a_repeat_in_one_update_has_no_drift_in_either_mode_by_hand():
    for mode in ("cumulative", "per-prompt"):
        t = ValueTracker(IDS, drift=mode)
        t.update([1], [1.0], drift=[0.0])  # first visit: alpha 1.48, beta 0.48
        t.add_drift(0.06)
        # two copies of prob-1 in one update with D = 0.06 measured since the first visit:
        # the first copy forgets with rho = 2**-1 = 0.5 -> clipped to 0.875; the second copy
        # comes right after it (no update in between), D = 0 -> rho_max = 0.96
        rho = t.update([1, 1], [0.0, 1.0], drift=[0.06, 0.06])
        assert rho == pytest.approx([0.875, 0.96])
        a1, b1 = 0.875 * 1.48 + 0.0, 0.875 * 0.48 + 1.0
        assert t.alpha[1] == pytest.approx(0.96 * a1 + 1.0, rel=1e-6), mode
        assert t.beta[1] == pytest.approx(0.96 * b1 + 0.0, rel=1e-6), mode


@FAST
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=40))
def test_rho_one_equals_beta_posterior_mean(rewards):
    t = ValueTracker(IDS, rho_type="constant", rho_constant=1.0)
    for r in rewards:
        t.update([3], [r])
    s, n = sum(rewards), len(rewards)
    assert t.v_hat([3])[0] == pytest.approx((s + 0.5) / (n + 1), rel=1e-6)


@FAST
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=100), st.floats(0.0, 0.3))
def test_v_hat_stays_in_open_unit_interval(rewards, drift):
    t = ValueTracker(IDS)
    for r in rewards:
        t.add_drift(drift)
        t.update([1], [r])
        v = t.v_hat([1])[0]
        assert 0.0 < v < 1.0


@FAST
@given(st.permutations(list(range(8))), st.integers(0, 2**31 - 1))
def test_permuting_a_batch_of_distinct_problems_gives_the_same_state(perm, seed):
    r = np.random.default_rng(seed).random(8)
    a, b = ValueTracker(IDS), ValueTracker(IDS)
    for t in (a, b):
        t.update(np.arange(8), np.full(8, 0.3))
        t.add_drift(0.02)
    a.update(np.arange(8), r)
    p = np.array(perm)
    b.update(p, r[p])
    np.testing.assert_array_equal(a.alpha, b.alpha)
    np.testing.assert_array_equal(a.beta, b.beta)


# ------------------------------------------------------------------ state
def _run_some(t: ValueTracker, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(3):
        t.add_drift(float(rng.random() * 0.05))
        t.update(rng.integers(0, len(t), 6), rng.random(6))


def test_state_dict_round_trip_through_npz_gives_identical_updates():
    a = ValueTracker(IDS)
    a.init_offline([0, 1], [1, 2], [4, 2])
    _run_some(a, 0)
    buf = io.BytesIO()
    np.savez(buf, **a.state_dict())
    buf.seek(0)
    b = ValueTracker(IDS)
    assert b.load_state_dict(dict(np.load(buf))) == []
    _run_some(a, 1)
    _run_some(b, 1)
    np.testing.assert_array_equal(a.alpha, b.alpha)
    np.testing.assert_array_equal(a.beta, b.beta)
    np.testing.assert_array_equal(a.c_last, b.c_last)
    assert a.C == b.C


def test_state_dict_loads_into_reordered_problem_list():
    a = ValueTracker(IDS)
    _run_some(a, 2)
    b = ValueTracker(list(reversed(IDS)))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.v_hat(b.indices(IDS)), a.v_hat())


def test_state_dict_from_another_problem_set_is_rejected():
    sd = ValueTracker(IDS).state_dict()
    with pytest.raises(CheckpointError, match="another problem set"):
        ValueTracker(IDS[:-1] + ["other"]).load_state_dict(sd)


def test_state_dict_config_mismatch_is_reported():
    sd = ValueTracker(IDS).state_dict()
    with pytest.raises(CheckpointError, match="`rho_min`: saved 0.875, now 0.9"):
        ValueTracker(IDS, rho_min=0.9).load_state_dict(sd)
    diffs = ValueTracker(IDS, rho_min=0.9).load_state_dict(sd, strict_config=False)
    assert diffs == ["`rho_min`: saved 0.875, now 0.9"]


def test_from_config_and_summary():
    t = ValueTracker.from_config(IDS, TrackerConfig(rho_type="constant", rho_constant=1.0))
    t.update([0, 1], [1.0, 0.0])
    s = t.summary()
    assert s.v_hat_mean == pytest.approx(0.5)  # 0.75 and 0.25
    assert s.visited_share == pytest.approx(2 / 8)
    assert s.count_mean == pytest.approx(2.0)
    assert s.as_dict()["tracker/v_hat_p90"] == pytest.approx(0.25 + 0.9 * 0.5)
    assert math.isfinite(s.v_hat_p10)


def test_contains_is_a_vectorised_membership_test():
    t = ValueTracker(IDS)
    assert t.contains(["prob-3", "nope", "prob-7"]).tolist() == [True, False, True]
    assert ValueTracker([]).contains(["prob-3"]).tolist() == [False]


@FAST
@given(st.lists(st.tuples(st.integers(0, 16), st.integers(0, 16)), min_size=8, max_size=8))
def test_offline_init_matches_reference_loop(pairs):
    counts = [(min(a, b), max(a, b)) for a, b in pairs]  # (successes, samples)
    t = ValueTracker(IDS, rho_min=0.9)
    t.init_offline(np.arange(8), [s for s, _ in counts], [n for _, n in counts])
    n0 = 1 / (1 - 0.9)
    for i, (s, n) in enumerate(counts):
        alpha, beta = (n0 * (s + 0.5) / (n + 1), n0 * (n - s + 0.5) / (n + 1)) if n else (0.5, 0.5)
        assert t.alpha[i] == pytest.approx(alpha, rel=1e-6)
        assert t.beta[i] == pytest.approx(beta, rel=1e-6)
