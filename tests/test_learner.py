"""The learner: packing, scoring, micro-batch equivalence, the update's direction, drift."""

from __future__ import annotations

import copy

import pytest
import torch

from spo_agents.training.learner import Learner, LearnerSettings, micro_batches, pack, token_logprobs
from spo_agents.types import Trajectory

PAD = 2


@pytest.fixture(scope="module")
def base_model():
    from transformers import AutoModelForCausalLM

    from spo_agents.models import tiny_model_dir

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)


def make_traj(
    pid: str,
    prompt: list[int],
    tokens: list[int],
    mask: list[int] | None = None,
    reward: float = 0.0,
    model=None,
    temperature: float = 1.0,
) -> Trajectory:
    mask = mask if mask is not None else [1] * len(tokens)
    t = Trajectory(
        problem_id=pid,
        env_id="fake",
        prompt_ids=prompt,
        token_ids=tokens,
        loss_mask=mask,
        logprobs=[0.0] * len(tokens),
        reward=reward,
    )
    if model is not None:  # behaviour log-probs of the current model (as the hf backend reports them)
        lp = Learner(model, LearnerSettings(temperature=temperature, lr=0.0), pad_id=PAD).score([t])[0]
        t.logprobs = [v if m else 0.0 for v, m in zip(lp, mask)]
    return t


def batch(model, n=4, temperature=1.0):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        p = torch.randint(10, 5000, (3 + i,), generator=g).tolist()
        r = torch.randint(10, 5000, (5 + 2 * i,), generator=g).tolist()
        m = [1] * len(r)
        m[2] = 0  # an environment-inserted token in the middle
        out.append(make_traj(f"p{i}", p, r, m, reward=float(i % 2), model=model, temperature=temperature))
    return out


def test_pack_aligns_targets_with_their_behaviour_logprobs():
    t = Trajectory(
        problem_id="a",
        env_id="e",
        prompt_ids=[5, 6],
        token_ids=[7, 8, 9],
        loss_mask=[1, 0, 1],
        logprobs=[-0.1, 0.0, -0.3],
        reward=1.0,
    )
    u = Trajectory(
        problem_id="b", env_id="e", prompt_ids=[5], token_ids=[7], loss_mask=[1], logprobs=[-0.5], reward=0.0
    )
    b = pack([t, u], pad_id=PAD)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [PAD, PAD, PAD, 5, 7]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert b.position_ids[1, 3:].tolist() == [0, 1]
    # targets are input_ids[:, 1:]; mask/old_logprobs live at the same positions
    assert b.mask.tolist() == [[0, 1, 0, 1], [0, 0, 0, 1]]
    assert b.old_logprobs[0].tolist() == pytest.approx([0.0, -0.1, 0.0, -0.3])
    assert b.num_tokens == 3


def test_micro_batches_respect_the_padded_token_budget():
    ts = [Trajectory("x", "e", [1] * 3, [1] * n, [1] * n, [0.0] * n, 0.0) for n in (2, 2, 7, 1, 1)]
    groups = micro_batches(ts, token_budget=10)
    assert [i for g in groups for i in g] == list(range(5))
    for g in groups:
        lens = [3 + len(ts[i].token_ids) for i in g]
        assert len(g) == 1 or max(lens) * len(g) <= 10


def test_left_padding_does_not_change_log_probs(base_model):
    ts = batch(base_model, n=3)
    together = Learner(base_model, LearnerSettings(lr=0.0), pad_id=PAD).score(ts)
    for t, lp in zip(ts, together):
        alone = Learner(base_model, LearnerSettings(lr=0.0), pad_id=PAD).score([t])[0]
        assert lp == pytest.approx(alone, abs=1e-5)


def test_scoring_divides_logits_by_the_temperature(base_model):
    t = batch(base_model, n=1)[0]
    b = pack([t], PAD)
    with torch.no_grad():
        logits = base_model(input_ids=b.input_ids).logits[:, :-1].float()
        ref = torch.log_softmax(logits / 0.7, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
        got, _ = token_logprobs(base_model, b, 0.7)
    m = b.mask > 0
    assert m.sum() > 0
    assert torch.allclose(got[m], ref[m], atol=1e-5)


def _update(model, ts, adv, **kw):
    m = copy.deepcopy(model)
    learner = Learner(m, LearnerSettings(lr=1e-3, **kw), pad_id=PAD)
    stats = learner.update(ts, adv)
    return m, learner, stats


def _gradient(model, ts, adv, **kw):
    """The accumulated gradient of one update, read just before the optimiser step (Adam's first
    step is about lr * sign(g), which would turn float noise on near-zero gradients into
    lr-sized differences, so parameters are the wrong thing to compare)."""
    m = copy.deepcopy(model)
    learner = Learner(m, LearnerSettings(lr=1e-3, **kw), pad_id=PAD)
    grads = []
    learner.optimizer.register_step_pre_hook(
        lambda opt, a, k: grads.append(torch.cat([p.grad.reshape(-1).clone() for p in m.parameters()]))
    )
    stats = learner.update(ts, adv)
    assert len(grads) == 1
    return grads[0], stats


def test_micro_batching_gives_the_same_gradient_as_one_pass(base_model):
    ts = batch(base_model)
    adv = [1.0, -1.0, 0.5, -0.5]
    ga, sa = _gradient(base_model, ts, adv, micro_batch_tokens=100_000)
    gb, sb = _gradient(base_model, ts, adv, micro_batch_tokens=16)
    assert ga.abs().max() > 0
    assert torch.allclose(ga, gb, atol=2e-5 * float(ga.abs().max()))  # fp32 sums in another order (threads, padding)
    assert sa.loss == pytest.approx(sb.loss, abs=1e-6)


def test_seq_mean_aggregation_is_also_split_exactly(base_model):
    ts = batch(base_model)
    adv = [1.0, -1.0, 0.5, -0.5]
    ga, _ = _gradient(base_model, ts, adv, micro_batch_tokens=100_000, aggregation="seq-mean-token-mean")
    gb, _ = _gradient(base_model, ts, adv, micro_batch_tokens=16, aggregation="seq-mean-token-mean")
    assert torch.allclose(ga, gb, atol=2e-5 * float(ga.abs().max()))  # fp32 sums in another order (threads, padding)


def test_update_raises_log_prob_of_positive_advantage_tokens_and_lowers_negative(base_model):
    ts = batch(base_model, n=2)
    m, learner, stats = _update(base_model, ts, [1.0, -1.0])
    after = learner.score(ts)

    def mean_lp(t, lp):
        return sum(v for v, k in zip(lp, t.loss_mask) if k) / t.num_generated

    before = [mean_lp(t, t.logprobs) for t in ts]
    now = [mean_lp(t, lp) for t, lp in zip(ts, after)]
    assert now[0] > before[0]
    assert now[1] < before[1]
    assert stats.optimizer_steps == 1
    assert stats.tokens == sum(t.num_generated for t in ts)
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), base_model.parameters()))


def test_drift_is_mean_abs_logprob_change_and_zero_without_a_step(base_model):
    ts = batch(base_model)
    m, learner, stats = _update(base_model, ts, [1.0, -1.0, 0.5, -0.5])
    after = learner.score(ts)
    expected = Learner.mean_abs_diff(ts, after, [t.logprobs for t in ts])
    assert stats.drift == pytest.approx(expected, rel=1e-4)
    assert stats.drift > 0
    _, _, still = _update(base_model, ts, [0.0, 0.0, 0.0, 0.0], weight_decay=0.0)  # no gradient, no decay
    assert still.drift == pytest.approx(0.0, abs=1e-6)


def test_mini_batches_take_one_optimizer_step_each(base_model):
    ts = batch(base_model)
    _, _, stats = _update(base_model, ts, [1.0, -1.0, 0.5, -0.5], mini_batches=2)
    assert stats.optimizer_steps == 2
    assert stats.drift > 0


def test_advantage_count_must_match(base_model):
    ts = batch(base_model, n=2)
    learner = Learner(copy.deepcopy(base_model), LearnerSettings(), pad_id=PAD)
    with pytest.raises(ValueError, match="one advantage per trajectory"):
        learner.update(ts, [1.0])


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_per_prompt_drift_counts_every_update_since_the_policy_acted(base_model, mini_batches):
    ts = batch(base_model, n=4)
    m = copy.deepcopy(base_model)
    learner = Learner(m, LearnerSettings(lr=1e-3, drift="per-prompt", mini_batches=mini_batches), pad_id=PAD)
    assert learner.prompt_drift(["p0", "p1"]) == [0.0, 0.0]  # nothing stored yet
    first = learner.update(ts[:2], [1.0, -1.0])
    d1 = learner.prompt_drift(["p0", "p1", "p2"])
    # the policy moved since it acted on p0 and p1: by exactly this update's drift
    assert d1[0] > 0 and d1[1] > 0 and d1[2] == 0.0
    n0, n1 = ts[0].num_generated, ts[1].num_generated
    assert (d1[0] * n0 + d1[1] * n1) / (n0 + n1) == pytest.approx(first.drift, rel=1e-4)
    assert first.drift > 0  # measured with several mini-batches too
    learner.update(ts[2:], [1.0, -1.0])  # the policy moves on other problems
    d2 = learner.prompt_drift(["p0", "p1"])
    assert d2[0] != pytest.approx(d1[0], rel=1e-3)  # the second update changed D(p0) too


def test_mini_batches_mix_finish_order_and_are_reproducible():
    from spo_agents.training.learner import mini_batch_order

    # finish order: shortest responses first, as the collector delivers them
    trajs = [make_traj(f"p{i}", [1, 2], list(range(3, 4 + i))) for i in range(16)]
    order = mini_batch_order(trajs)
    assert sorted(order) == list(range(16)) and order != list(range(16))
    assert order == mini_batch_order(list(trajs))  # same batch, same split (all ranks, after a resume)
    first_half = [len(trajs[i].token_ids) for i in order[:8]]
    assert max(first_half) > 8  # the first mini-batch is not just the 8 shortest responses


def test_half_precision_weights_without_a_master_copy_are_warned_about(base_model):
    m = copy.deepcopy(base_model).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="round away"):
        Learner(m, LearnerSettings(lr=1e-6), pad_id=PAD)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_non_finite_behaviour_log_prob_is_a_policy_error_not_a_zero(bad):
    from spo_agents.errors import PolicyError

    t = Trajectory(
        problem_id="a", env_id="e", prompt_ids=[5], token_ids=[7, 8], loss_mask=[1, 1], logprobs=[-0.1, bad], reward=1.0
    )
    with pytest.raises(PolicyError, match="`a`.*log-prob"):
        pack([t], pad_id=PAD)
    # an inserted token's log-prob is not used: whatever it holds, packing works and it counts 0
    u = Trajectory(
        problem_id="b", env_id="e", prompt_ids=[5], token_ids=[7, 8], loss_mask=[1, 0], logprobs=[-0.1, bad], reward=1.0
    )
    assert pack([u], pad_id=PAD).old_logprobs.isfinite().all()


def test_the_update_leaves_the_model_in_eval_mode_and_scores_without_dropout():
    from transformers import AutoConfig, AutoModelForCausalLM

    from spo_agents.models import tiny_model_dir

    cfg = AutoConfig.from_pretrained(tiny_model_dir())
    cfg.attention_dropout = 0.5  # dropout that only train mode applies
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    learner = Learner(model, LearnerSettings(lr=1e-3), pad_id=PAD)
    trajs = batch(model.eval(), n=2)
    learner.update(trajs, [1.0, -1.0])
    assert not model.training
    # scores are deterministic: the drift measured on an unchanged model is exactly 0
    a, b = learner.score(trajs), learner.score(trajs)
    assert a == b


@pytest.mark.parametrize(
    ("field", "override", "value"),
    [
        ("temperature", "rollout.temperature", 0.0),
        ("epochs", "train.epochs", 0),
        ("tis_cap", "loss.tis_cap", 0.5),
    ],
)
def test_learner_settings_break_the_same_rule_with_the_same_message_as_the_config(base_model, field, override, value):
    from spo_agents.config import load_config
    from spo_agents.errors import ConfigError

    with pytest.raises(ConfigError) as from_config:
        load_config(None, [f"{override}={value}"])
    with pytest.raises(ConfigError) as from_learner:
        Learner(base_model, LearnerSettings(**{field: value}), pad_id=PAD)
    assert str(from_learner.value) == str(from_config.value)
    assert f"`{override}`" in str(from_learner.value)
