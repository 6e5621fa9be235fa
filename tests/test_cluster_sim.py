"""bench/cluster_sim.py: properties of the collection model that follow from its definition.

Reference values are computed by hand from the cost model (a decode step advances every running
sequence by one token; tools hold no decode slot), never read back from the simulator.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from spo_agents.errors import ConfigError, SPOError

_PATH = Path(__file__).resolve().parents[1] / "bench" / "cluster_sim.py"
_spec = importlib.util.spec_from_file_location("cluster_sim", _PATH)
cs = importlib.util.module_from_spec(_spec)
sys.modules["cluster_sim"] = cs
_spec.loader.exec_module(cs)

# a CPU-like server: step time grows with the sequences decoding (a throughput ceiling)
SATURATING = cs.Engine(((1, 0.010), (8, 0.012), (24, 0.020), (48, 0.040)))
FLAT = cs.Engine(((1, 0.01),))  # 10 ms per token whatever runs beside it


def tail(sigma: float, tool: bool = False) -> cs.Workload:
    if tool:
        return cs.Workload(
            gen_median=16,
            gen_sigma=0.0,
            gen_max=16,
            calls_mean=1,
            calls_max=1,
            tool_median_s=1.0,
            tool_sigma=sigma,
            tool_max_s=16.0,
            trailing_tool=True,
        )
    return cs.Workload(gen_median=32, gen_sigma=sigma, gen_max=512)


def rate(
    policy: cs.Policy,
    workload: cs.Workload,
    seed: int,
    engine: cs.Engine = SATURATING,
    steps: int = 6,
    **cluster: float,
) -> float:
    return cs.simulate(policy, cs.Cluster(1, engine, **cluster), workload, steps=steps, seed=seed).traj_per_s


def ep(*tokens: float, tools: tuple[float, ...] = (), prompt: int = 0) -> cs.Episode:
    return cs.Episode(list(tokens), list(tools), prompt=prompt)


@pytest.mark.parametrize("tool", [False, True])
def test_zero_variance_gives_every_policy_the_same_throughput(tool: bool) -> None:
    # every episode costs the same: grouping or a barrier cannot change when anything finishes
    w = tail(0.0, tool)
    rates = [
        rate(cs.Policy("single", 24, 24), w, 0),
        rate(cs.Policy("grouped", 24, 24, group=8), w, 0),
        rate(cs.Policy("async", 24, 24, max_staleness=100), w, 0),
    ]
    assert rates[1] == pytest.approx(rates[0], rel=1e-9)
    assert rates[2] == pytest.approx(rates[0], rel=1e-9)


def test_zero_variance_with_a_learner_step_keeps_single_and_grouped_equal() -> None:
    w = tail(0.0)
    kw = {"learner_fixed_s": 2.0, "push_s": 0.5}
    assert rate(cs.Policy("grouped", 24, 24, group=8), w, 0, **kw) == pytest.approx(
        rate(cs.Policy("single", 24, 24), w, 0, **kw), rel=1e-9
    )


@pytest.mark.parametrize("tool", [False, True])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_grouped_is_never_faster_than_single_stream_with_the_same_in_flight_count(sigma: float, tool: bool) -> None:
    for seed in range(5):
        single = rate(cs.Policy("single", 24, 24), tail(sigma, tool), seed)
        grouped = rate(cs.Policy("grouped", 24, 24, group=8), tail(sigma, tool), seed)
        assert grouped <= single


@pytest.mark.parametrize("tool", [False, True])
def test_larger_tails_widen_the_gap(tool: bool) -> None:
    def gap(sigma: float) -> float:
        seeds = range(6)
        s = np.mean([rate(cs.Policy("single", 24, 24), tail(sigma, tool), k) for k in seeds])
        g = np.mean([rate(cs.Policy("grouped", 24, 24, group=8), tail(sigma, tool), k) for k in seeds])
        return s / g

    gaps = [gap(s) for s in (0.0, 0.5, 1.0, 1.5)]
    assert gaps[0] == pytest.approx(1.0, abs=1e-9)
    assert all(a < b for a, b in itertools.pairwise(gaps)), gaps


def test_same_seed_same_run_other_seed_other_run() -> None:
    pol, w = cs.Policy("single", 24, 48), tail(1.0)
    a = cs.simulate(pol, cs.Cluster(1, SATURATING), w, steps=4, seed=3)
    b = cs.simulate(pol, cs.Cluster(1, SATURATING), w, steps=4, seed=3)
    c = cs.simulate(pol, cs.Cluster(1, SATURATING), w, steps=4, seed=4)
    assert a.step_times == b.step_times
    assert a.step_times != c.step_times


def test_processor_sharing_by_hand() -> None:
    # step time 10 ms per running sequence: 100 and 300 tokens start together; both decode at
    # 20 ms per token until the first ends (2.0 s), the other decodes its last 200 alone at 10 ms
    engine = cs.Engine(((1, 0.01), (2, 0.02)))
    r = cs.simulate(
        cs.Policy("grouped", 2, 2, group=2), cs.Cluster(1, engine), None, steps=1, episodes=[ep(100), ep(300)]
    )
    assert r.step_times == [pytest.approx(4.0)]


def test_single_stream_and_barrier_by_hand() -> None:
    # flat 10 ms per token, B = 2, two in flight; durations 1, 4, 2, 1.5, 3 s in start order.
    # single: e0 ends 1.0 (e2 starts, ends 3.0): step 1 at 3.0 (e0, e2); e3 starts at 3.0 and ends 4.5,
    # e1 ends 4.0: step 2 at 4.5. grouped: (e0, e1) end at 4.0, then (e2, e3) at 4.0 + 2.0 = 6.0.
    eps = [ep(100), ep(400), ep(200), ep(150), ep(300), ep(100), ep(100)]
    single = cs.simulate(cs.Policy("single", 2, 2), cs.Cluster(1, FLAT), None, steps=2, episodes=eps)
    grouped = cs.simulate(cs.Policy("grouped", 2, 2, group=2), cs.Cluster(1, FLAT), None, steps=2, episodes=eps)
    assert np.cumsum(single.step_times) == pytest.approx([3.0, 4.5])
    assert np.cumsum(grouped.step_times) == pytest.approx([4.0, 6.0])
    assert single.traj_per_s == pytest.approx(4 / 4.5)
    assert grouped.traj_per_s == pytest.approx(4 / 6.0)


def test_context_cost_by_hand() -> None:
    # step time 10 ms + 10 us per token of context; prompt 1,000 tokens, 500 generated:
    # sum over steps of (0.01 + 1e-5 (1000 + i)) = 5 + 1e-5 (1000 * 500 + 500^2 / 2) = 11.25 s
    engine = cs.Engine(((1, 0.01),), kv_s_per_token=1e-5)
    r = cs.simulate(cs.Policy("single", 1, 1), cs.Cluster(1, engine), None, steps=1, episodes=[ep(500, prompt=1000)])
    assert r.step_times == [pytest.approx(11.25)]


def test_tool_calls_request_latency_and_learner_by_hand() -> None:
    # 10 tokens, a 2 s tool call, 10 tokens at 0.1 s per token; 0.5 s before each of the two
    # requests; then a 3 s learner step and a 1 s weight push: 0.5 + 1 + 2 + 0.5 + 1 + 3 + 1 = 9 s
    engine = cs.Engine(((1, 0.1),))
    cluster = cs.Cluster(1, engine, request_latency_s=0.5, learner_fixed_s=3.0, push_s=1.0)
    r = cs.simulate(cs.Policy("single", 1, 1), cluster, None, steps=1, episodes=[ep(10, 10, tools=(2.0,)), ep(10)])
    assert r.step_times == [pytest.approx(9.0)]


def test_kv_cache_admission_serialises_what_does_not_fit() -> None:
    # 150 tokens of cache: the second 100-token prompt waits until the first episode is done
    engine = cs.Engine(((1, 0.01),), kv_tokens=150)
    r = cs.simulate(
        cs.Policy("grouped", 2, 2, group=2),
        cs.Cluster(1, engine),
        None,
        steps=1,
        episodes=[ep(100, prompt=100), ep(100, prompt=100)],
    )
    assert r.step_times == [pytest.approx(2.0)]


def test_kv_cache_overflow_preempts_the_newest_sequence() -> None:
    # 300 tokens of cache, two 100-token prompts admitted; after 50 steps the context (200 + 2 x 50)
    # fills the cache and the newer one is preempted: the older ends at 1.0 s, the preempted one
    # resumes then for its last 50 tokens and ends at 1.5 s
    engine = cs.Engine(((1, 0.01),), kv_tokens=300)
    sim = cs.Simulation(
        cs.Policy("grouped", 2, 2, group=2),
        cs.Cluster(1, engine),
        None,
        episodes=[ep(100, prompt=100), ep(100, prompt=100)],
    )
    r = sim.run(1)
    assert r.step_times == [pytest.approx(1.5)]
    assert sim.replicas[0].preempted == 1


def test_async_overlaps_generation_and_learning_by_hand() -> None:
    # every episode takes 1 s, the learner 3 s, B = 1: synchronous steps take 1 + 3 s; the
    # asynchronous learner is the bottleneck: one step every 3 s after the first episode
    w = cs.Workload(gen_median=100, gen_sigma=0.0, gen_max=100)
    sync = cs.simulate(cs.Policy("single", 1, 1), cs.Cluster(1, FLAT, learner_fixed_s=3.0), w, steps=3)
    asyn = cs.simulate(cs.Policy("async", 1, 1, max_staleness=5), cs.Cluster(1, FLAT, learner_fixed_s=3.0), w, steps=3)
    assert np.cumsum(sync.step_times) == pytest.approx([4.0, 8.0, 12.0])
    assert np.cumsum(asyn.step_times) == pytest.approx([4.0, 7.0, 10.0])


def test_async_drops_trajectories_past_the_staleness_bound() -> None:
    # one long episode (10 s) among 1 s ones, B = 1, two in flight, learner 1 s: the short ones keep
    # the learner going (a version every 2 s), so when the long one ends it is about 5 versions
    # old: dropped with a bound of 1, used with a bound of 100
    eps = [ep(1000)] + [ep(100) for _ in range(40)]
    strict = cs.simulate(
        cs.Policy("async", 1, 2, max_staleness=1), cs.Cluster(1, FLAT, learner_fixed_s=1.0), None, steps=8, episodes=eps
    )
    loose = cs.simulate(
        cs.Policy("async", 1, 2, max_staleness=100),
        cs.Cluster(1, FLAT, learner_fixed_s=1.0),
        None,
        steps=8,
        episodes=eps,
    )
    assert strict.dropped == 1
    assert loose.dropped == 0
    assert max(loose.step_times) > 0 and loose.staleness > strict.staleness


@pytest.mark.parametrize(
    "bad",
    [
        lambda: cs.Policy("grouped", 10, 10, group=3),
        lambda: cs.Policy("grouped", 16, 8, group=8),
        lambda: cs.Policy("ring", 8, 8),
        lambda: cs.Engine(((24, 0.02), (8, 0.01))),
        lambda: cs.Workload(gen_median=10, gen_sigma=0.5, gen_max=100, calls_mean=3, calls_max=2),
    ],
)
def test_bad_input_is_a_clear_error(bad: Callable[[], object]) -> None:
    with pytest.raises(SPOError):
        bad()


def test_running_out_of_fixed_episodes_says_so() -> None:
    with pytest.raises(ConfigError, match="ran out"):
        cs.simulate(cs.Policy("single", 2, 2), cs.Cluster(1, FLAT), None, steps=3, episodes=[ep(10), ep(10), ep(10)])


def test_gpu_figures_name_their_sources_and_the_roofline_matches_the_published_batching_gain() -> None:
    figs = cs.load_figures()
    v = cs.figure_values(figs)
    assert "workload.response_median_tokens" in cs.assumptions(figs)
    assert "gpu.hbm_bytes_per_s" not in cs.assumptions(figs)
    predicted, published = cs.roofline_check(v)
    assert predicted == pytest.approx(published, rel=0.2)
    # the KV cache of one GPU holds a few hundred thousand tokens: a handful of 16k-token episodes
    assert 1e5 < cs.gpu_engine(v).kv_tokens < 1e6


def test_a_figure_without_a_source_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "f.json"
    bad.write_text('{"gpu": {"hbm_bytes_per_s": {"value": 1, "kind": "published"}}}')
    with pytest.raises(ConfigError, match="names no `source`"):
        cs.load_figures(bad)
