"""Prioritised sampling (docs/algorithm.md section 4, Eq. 11): weights, draw distribution, state."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_agents.algorithm.sampler import PrioritizedSampler, SamplingError, UniformSampler, make_sampler
from spo_agents.config import SamplerConfig
from spo_agents.errors import CheckpointError

V = np.array([0.5, 0.0, 0.9, 0.2, 1.0])


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_weights_by_hand_and_by_loop():
    s = PrioritizedSampler(5, eps=0.05)
    w = s.weights(V)
    assert w[0] == pytest.approx(0.55)  # sqrt(0.25) + 0.05
    assert w[1] == pytest.approx(0.05)
    assert w[2] == pytest.approx(0.35)  # sqrt(0.09) + 0.05
    loop = [math.sqrt(v * (1 - v)) + 0.05 for v in V]
    np.testing.assert_allclose(w, loop, rtol=1e-12)


def test_weights_clip_values_outside_unit_interval():
    w = PrioritizedSampler(3, eps=0.05).weights([-0.5, 1.5, 0.5])
    np.testing.assert_allclose(w, [0.05, 0.05, 0.55])


def test_single_draw_frequencies_proportional_to_weights():
    s = PrioritizedSampler(5, eps=0.05, seed=123)
    counts = np.bincount([s.sample(V, 1)[0] for _ in range(20_000)], minlength=5)
    w = s.weights(V)
    # 4 degrees of freedom: P(chi2 > 23.5) = 1e-4; the seed is fixed, so this is deterministic
    assert chi_square(counts, w / w.sum()) < 23.5


def test_ordered_pairs_follow_successive_sampling_without_replacement():
    v = np.array([0.5, 0.1, 0.3, 0.02])
    s = PrioritizedSampler(4, eps=0.05, seed=7)
    w = s.weights(v)
    p = w / w.sum()
    pairs = list(itertools.permutations(range(4), 2))
    # reference: first draw ~ p, second ~ p restricted to the others
    probs = np.array([p[i] * p[j] / (1 - p[i]) for i, j in pairs])
    seen = {pair: 0 for pair in pairs}
    for _ in range(20_000):
        i, j = s.sample(v, 2)
        seen[(int(i), int(j))] += 1
    counts = np.array([seen[pair] for pair in pairs])
    # 11 degrees of freedom: P(chi2 > 37.4) = 1e-4
    assert probs.sum() == pytest.approx(1.0)
    assert chi_square(counts, probs) < 37.4


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.data())
def test_draws_are_distinct_and_in_range(n_problems, data):
    n = data.draw(st.integers(0, n_problems))
    v = np.array(data.draw(st.lists(st.floats(0, 1), min_size=n_problems, max_size=n_problems)))
    idx = PrioritizedSampler(n_problems, seed=data.draw(st.integers(0, 1000))).sample(v, n)
    assert idx.dtype == np.int64 and idx.shape == (n,)
    assert len(set(idx.tolist())) == n
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < n_problems)


def test_exclude_is_never_drawn():
    s = PrioritizedSampler(5, seed=1)
    for _ in range(200):
        assert set(s.sample(V, 3, exclude=[0, 2]).tolist()) == {1, 3, 4}


def test_too_many_requested_is_a_clear_error():
    s = PrioritizedSampler(5)
    with pytest.raises(SamplingError, match="cannot draw 4 distinct problems: 3 of 5 are available"):
        s.sample(V, 4, exclude=[0, 1])


def test_zero_weight_problems_are_not_available_with_eps_zero():
    s = PrioritizedSampler(5, eps=0.0)
    assert set(s.sample(V, 3).tolist()) == {0, 2, 3}  # v = 0 and v = 1 have weight 0
    with pytest.raises(SamplingError):
        s.sample(V, 4)


def test_wrong_v_hat_shape_is_rejected():
    with pytest.raises(SamplingError, match=r"shape \(5,\)"):
        PrioritizedSampler(5).sample(V[:4], 1)


def test_state_round_trip_draws_the_same_next_batch():
    a = PrioritizedSampler(1000, seed=3)
    v = np.random.default_rng(0).random(1000)
    a.sample(v, 64)
    sd = json.loads(json.dumps(a.state_dict()))  # survives a plain-JSON checkpoint
    b = PrioritizedSampler(1000, seed=99)
    b.load_state_dict(sd)
    np.testing.assert_array_equal(a.sample(v, 64), b.sample(v, 64))
    assert a.draws == b.draws == 2


def test_state_of_another_problem_count_is_rejected():
    sd = PrioritizedSampler(10).state_dict()
    with pytest.raises(CheckpointError, match="10 problems"):
        PrioritizedSampler(11).load_state_dict(sd)
    with pytest.raises(CheckpointError, match="uniform"):
        UniformSampler(10).load_state_dict(sd)


def test_entropy_is_normalised():
    s = PrioritizedSampler(4, eps=0.05)
    assert s.entropy(np.full(4, 0.5)) == pytest.approx(1.0)
    v = np.array([0.5, 0.0, 0.0, 0.0])  # weights 0.55, 0.05, 0.05, 0.05
    p = np.array([0.55, 0.05, 0.05, 0.05]) / 0.7
    assert s.entropy(v) == pytest.approx(-(p * np.log(p)).sum() / math.log(4))


def test_uniform_sampler_ignores_values():
    s = UniformSampler(5, seed=11)
    counts = np.bincount([s.sample(V, 1)[0] for _ in range(10_000)], minlength=5)
    assert chi_square(counts, np.full(5, 0.2)) < 23.5
    assert s.entropy(V) == pytest.approx(1.0)


def test_make_sampler_follows_config():
    assert type(make_sampler(SamplerConfig(), 10, 0)) is PrioritizedSampler
    assert make_sampler(SamplerConfig(eps=0.1), 10, 0).eps == 0.1
    assert type(make_sampler(SamplerConfig(type="uniform"), 10, 0)) is UniformSampler


def test_nan_v_hat_is_rejected():
    with pytest.raises(SamplingError, match="NaN"):
        PrioritizedSampler(3).sample([0.5, float("nan"), 0.5], 1)


def test_exclude_with_duplicates_counts_each_problem_once():
    s = PrioritizedSampler(5, seed=2)
    assert sorted(s.sample(V, 3, exclude=[1, 1, 4]).tolist()) == [0, 2, 3]


def test_draw_takes_the_free_problems_first_then_the_busy_ones():
    s = PrioritizedSampler(5, seed=0)
    got = s.draw(np.full(5, 0.5), 4, busy=[0, 1, 2])
    assert len(set(got.tolist())) == 4 and set(got[:2].tolist()) == {3, 4}  # free ones before repeats
    again = s.draw(np.full(5, 0.5), 7, busy=[])
    assert sorted(np.bincount(again, minlength=5).tolist()) == [1, 1, 1, 2, 2]  # past the pool: evenly


def test_draw_without_busy_problems_is_the_plain_sample():
    a, b = PrioritizedSampler(50, seed=7), PrioritizedSampler(50, seed=7)
    v = np.linspace(0.0, 1.0, 50)
    assert a.draw(v, 10, busy=[]).tolist() == b.sample(v, 10).tolist()


def test_gamma_divides_the_weight_by_the_evidence():
    # Eq. 11 with the N_eff term: w = sqrt(v (1 - v)) / N_eff^gamma + eps
    s = PrioritizedSampler(2, eps=0.05, gamma=0.5)
    w = s.weights(np.array([0.5, 0.5]), n_eff=np.array([1.0, 16.0]))
    assert w.tolist() == pytest.approx([0.5 / 1.0 + 0.05, 0.5 / 4.0 + 0.05])
    with pytest.raises(SamplingError, match="alpha \\+ beta"):
        s.weights(np.array([0.5, 0.5]))
    assert PrioritizedSampler(2).weights(np.array([0.5, 0.5])).tolist() == pytest.approx([0.55, 0.55])
