"""The sign of the whole SPO signal, through the real trainer, on the tiny model.

`FirstTokenEnv` rewards an answer whose first token does not start with a space. The probability
the model gives that behaviour is computed exactly from its next-token distribution on every
training prompt, before and after a few SPO steps: SPO must raise it, and with the reward's sign
flipped (the same behaviour now costs 1) it must lower it, with either scheduler of the `hf`
backend.

The tiny model's weights are random, so "starts without a space" is no feature of its embeddings:
a policy gradient from freshly drawn tokens pushes each sampled token on its own, and a few steps
of 16 samples from a near-uniform 49k-token distribution barely move the behaviour's total
probability. `rewarded_direction` gives the rewarded tokens' embeddings one shared component
(leaving the initial probability at about 0.35), which the policy can learn as a model would
learn a real feature.
"""

from __future__ import annotations

import pytest
import torch
from training_fixtures import FirstTokenEnv, tiny_components, tiny_config

from spo_agents.training.loop import train


class FlippedEnv(FirstTokenEnv):
    def step(self, text):
        obs, r, term, trunc, info = super().step(text)
        return obs, -r, term, trunc, info


@torch.no_grad()
def p_rewarded(comp) -> float:
    """Mean over the training prompts of P(first token does not start with a space)."""
    tok, model = comp.tokenizer, comp.model
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(len(tok))]
    ok = torch.tensor([bool(t) and not t.startswith(" ") for t in texts])  # the env's own rule
    env = FirstTokenEnv()
    probs = []
    for pid in env.problem_ids:
        msgs, _ = env.reset(options={"problem_id": pid})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        logits = model(torch.tensor([ids])).logits[0, -1, : len(texts)]
        probs.append(float(torch.softmax(logits.float(), -1)[ok[: logits.shape[0]]].sum()))
    return sum(probs) / len(probs)


@torch.no_grad()
def rewarded_direction(comp, scale: float = 0.05) -> None:
    """Add `scale` times one random unit vector to the (tied) embedding of every rewarded token."""
    tok, emb = comp.tokenizer, comp.model.get_input_embeddings().weight
    texts = [tok.decode([i], skip_special_tokens=True) for i in range(min(len(tok), emb.shape[0]))]
    ok = torch.tensor([bool(t) and not t.startswith(" ") for t in texts])
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    emb[: len(texts)][ok] += scale * v / v.norm()


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
@pytest.mark.parametrize("flipped", [False, True], ids=["reward", "flipped-reward"])
def test_spo_moves_the_rewarded_behaviour_in_the_direction_of_the_reward(tmp_path, flipped, scheduler):
    comp = tiny_components(seed=0)
    comp.policy.scheduler = scheduler  # before its first request starts the worker
    rewarded_direction(comp)
    if flipped:
        comp.env_factory = lambda split: FlippedEnv(split=split)
    before = p_rewarded(comp)
    cfg = tiny_config(
        tmp_path, train={"steps": 6, "batch_size": 16, "checkpoint_every": 0, "seed": 0}, optim={"lr": 3e-2}
    )
    train(cfg, run_dir=tmp_path / "run", components=comp)
    after = p_rewarded(comp)
    # `continuous` draws from per-request seeds, so the run is the same on every machine and the
    # move must be clear; `static` batches whatever requests have arrived (timing decides) and
    # draws per call, so its episodes differ from run to run: only the direction is asserted
    # (a loaded CI machine saw +0.036 where an idle one sees more than +0.05)
    margin = 0.05 if scheduler == "continuous" else 0.0
    if flipped:
        assert after < before - margin, (before, after)
    else:
        assert after > before + margin, (before, after)
