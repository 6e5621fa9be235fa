"""PPO-clip policy loss (docs/algorithm.md section 3): per-token reference loop, clip cases, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_agents.algorithm.loss import policy_loss
from spo_agents.errors import ConfigError


def ref_token(logp, old, a, eps_low=0.2, eps_high=0.28, c=10.0, ref=None, kl_coef=0.0, ent=0.0, ent_coef=0.0):
    """One token's loss, written out from the formula."""
    ratio = math.exp(logp - old)
    l1 = -a * ratio
    l2 = -a * min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = max(l1, l2)
    if a < 0 and c > 1:
        loss = min(loss, -a * c)
    if ref is not None:
        d = ref - logp
        loss += kl_coef * (math.exp(d) - d - 1)
    return loss - ent_coef * ent


def ref_loss(logp, old, adv, mask, aggregation="token-mean", **kw):
    """Slow reference: a Python loop over samples and tokens."""
    ref = kw.pop("ref", None)
    ent = kw.pop("ent", None)
    per_seq, total, n = [], 0.0, 0
    for b in range(len(logp)):
        s, k = 0.0, 0
        for t in range(len(logp[b])):
            if mask[b][t]:
                x = ref_token(
                    logp[b][t],
                    old[b][t],
                    adv[b],
                    ref=None if ref is None else ref[b][t],
                    ent=0.0 if ent is None else ent[b][t],
                    **kw,
                )
                s, k = s + x, k + 1
        total, n = total + s, n + k
        if k:
            per_seq.append(s / k)
    if aggregation == "token-mean":
        return total / max(n, 1)
    return sum(per_seq) / max(len(per_seq), 1)


def batch(seed, B=4, T=6, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(torch.float64)
    return logp, old, adv, mask


# ------------------------------------------------------------------ hand-computed cases
@pytest.mark.parametrize(
    "log_ratio, adv, expected, grad_zero",
    [
        (math.log(1.1), 1.0, -1.1, False),  # inside the trust region
        (math.log(1.5), 1.0, -1.28, True),  # clip-higher: capped at 1 + 0.28
        (math.log(1.25), 1.0, -1.25, False),  # between 1.2 and 1.28: NOT clipped (clip-higher)
        (math.log(0.5), 1.0, -0.5, False),  # A > 0, ratio low: unclipped (pessimistic)
        (math.log(0.5), -1.0, 0.8, True),  # A < 0, ratio < 0.8: clipped at 1 - 0.2
        (math.log(3.0), -1.0, 3.0, False),  # A < 0, ratio high: unclipped below c
        (math.log(20.0), -1.0, 10.0, True),  # dual clip: capped at c * |A|
    ],
)
def test_single_token_cases_by_hand(log_ratio, adv, expected, grad_zero):
    logp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([adv]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    assert (logp.grad.abs().item() == 0.0) == grad_zero


def test_dual_clip_at_most_one_disables_it():
    logp = torch.tensor([[math.log(20.0)]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=1.0)
    assert loss.item() == pytest.approx(20.0)
    assert stats.clip_frac_dual == 0.0


def test_gradient_direction_follows_advantage_sign():
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    loss.backward()
    assert (logp.grad[0] < 0).all()  # descent raises log-probs of the positive sample
    assert (logp.grad[1] > 0).all()  # and lowers those of the negative one


def test_masked_tokens_have_no_effect():
    logp, old, adv, mask = batch(0)
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask)
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all()
    changed = logp.detach().clone()
    changed[mask == 0] += 5.0
    assert policy_loss(changed, old, adv, mask)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    assert stats.num_tokens == mask.sum().item()


def test_stats_by_hand():
    # 4 tokens: clipped high (A>0, r=1.5), clipped low (A<0, r=0.5), dual (A<0, r=20), plain (A<0, r=1)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 20.0], [1.0, 1.0]], dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0, -1.0])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    _, s = policy_loss(logp, torch.zeros(3, 2, dtype=torch.float64), adv, mask)
    assert (s.clip_frac_high, s.clip_frac_low, s.clip_frac_dual) == (0.25, 0.25, 0.25)
    assert s.ratio_max == pytest.approx(20.0)
    assert s.ratio_mean == pytest.approx((1.5 + 0.5 + 20 + 1) / 4)
    assert s.abs_logp_diff == pytest.approx((math.log(1.5) + math.log(2) + math.log(20)) / 4)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 20.0, 1.0)]  # KL(pi_old || pi) with tokens drawn from pi_old
    assert s.approx_kl == pytest.approx(sum(k3) / 4)
    assert (s.num_tokens, s.num_sequences) == (4.0, 3.0)
    assert s.as_dict()["loss/clip_frac_dual"] == 0.25


def test_empty_mask_gives_zero_loss_that_backpropagates():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and stats.num_tokens == 0.0
    assert (logp.grad == 0).all()


# ------------------------------------------------------------------ reference loop
@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from(["token-mean", "seq-mean-token-mean"]),
    st.sampled_from([0.6, 3.5]),  # 3.5 drives ratios past the dual-clip bound
    st.sampled_from([10.0, 3.0, 1.0]),
)
def test_matches_per_token_reference_loop(seed, aggregation, spread, c):
    logp, old, adv, mask = batch(seed, spread=spread)
    loss, _ = policy_loss(logp, old, adv, mask, aggregation=aggregation, dual_clip=c)
    expected = ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), aggregation, c=c)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_kl_and_entropy_terms_match_reference_loop(aggregation):
    logp, old, adv, mask = batch(3)
    ref = old + 0.1
    ent = torch.rand(logp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, stats = policy_loss(
        logp, old, adv, mask, aggregation=aggregation, ref_logprobs=ref, kl_coef=0.05, entropy=ent, entropy_coef=0.01
    )
    expected = ref_loss(
        logp.tolist(),
        old.tolist(),
        adv.tolist(),
        mask.tolist(),
        aggregation,
        ref=ref.tolist(),
        kl_coef=0.05,
        ent=ent.tolist(),
        ent_coef=0.01,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert stats.kl_loss > 0 and stats.entropy > 0


# ------------------------------------------------------------------ micro-batches
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_with_normalizer_equal_full_batch(aggregation):
    logp, old, adv, mask = batch(5, B=8, T=7, spread=1.0)
    mask[2] = 0  # a sample with no trained tokens
    full_in = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_in, old, adv, mask, aggregation=aggregation)
    full.backward()
    norm = mask.sum().item() if aggregation == "token-mean" else float((mask.sum(-1) > 0).sum())
    split_in = logp.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 3), slice(3, 5), slice(5, 8)):
        part, _ = policy_loss(split_in[sl], old[sl], adv[sl], mask[sl], aggregation=aggregation, normalizer=norm)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(split_in.grad, full_in.grad, rtol=1e-12, atol=1e-15)


def test_bfloat16_inputs_are_computed_in_float32():
    logp, old, adv, mask = batch(7)
    loss, _ = policy_loss(logp.to(torch.bfloat16), old.to(torch.bfloat16), adv, mask)
    assert loss.dtype == torch.float32


def test_shape_errors_are_explained():
    with pytest.raises(ConfigError, match=r"`advantages` must be \[B\]"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="`mask` must have the shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ConfigError, match="normalizer"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), normalizer=0)
