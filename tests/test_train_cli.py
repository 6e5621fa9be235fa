"""The training command line (`train --env-arg`, `estimate-values`, `plot`) and offline values:
the tracker initialised from the actual counts and the summed rewards, and a bad values file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from training_fixtures import FirstTokenEnv, tiny_components

from spo_agents.config import load_config


# --- the command line: train, estimate-values, plot ----------------------------------------------
class RegisteredFirstTokenEnv(FirstTokenEnv):
    def __init__(self, split="train", sandbox=None, sandbox_limits=None, n=48):
        super().__init__(n=n, split=split)


@pytest.fixture
def first_token_registered():
    from spo_agents import envs

    envs.register("first-token-v0", RegisteredFirstTokenEnv, override=True)
    yield "first-token"


def test_cli_train_takes_env_args_like_eval(tmp_path, first_token_registered, capsys):
    from spo_agents.cli import main

    args = [
        "train",
        "--env",
        "first-token",
        "--env-arg",
        "n=12",
        "--steps",
        "1",
        "model.name=tiny-random",
        "rollout.max_new_tokens=1",
        "rollout.max_episode_tokens=1",
        "logging.progress=false",
        "train.batch_size=8",
        f"train.output_dir={tmp_path}",
        "train.run_name=envarg",
        "eval.every=0",
    ]
    assert main(args) == 0
    assert load_config(tmp_path / "envarg" / "config.yaml").env.kwargs == {"n": 12}
    assert main(["train", "--env-arg", "n", "--steps", "1"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_estimate_values_then_train_from_them_then_plot(tmp_path, first_token_registered, capsys):

    from spo_agents.cli import main

    common = [
        "model.name=tiny-random",
        "rollout.max_new_tokens=1",
        "rollout.max_episode_tokens=1",
        "rollout.max_in_flight=16",
        "logging.progress=false",
    ]
    values = tmp_path / "values.json"
    assert (
        main(["estimate-values", "--env", "first-token", "-n", "3", "--limit", "5", "--out", str(values), *common]) == 0
    )
    doc = json.loads(values.read_text())
    assert len(doc["problems"]) == 5 and all(v["samples"] == 3 for v in doc["problems"].values())
    assert doc["sampling"]["temperature"] == 1.0  # the training sampling settings
    assert (
        main(
            [
                "train",
                "--env",
                "first-token",
                "--steps",
                "1",
                *common,
                "train.batch_size=8",
                f"train.output_dir={tmp_path}",
                "train.run_name=cli",
                "eval.every=0",
                f"tracker.init_values={values}",
            ]
        )
        == 0
    )
    run = tmp_path / "cli"
    assert (run / "checkpoints" / "latest").is_file()
    assert main(["plot", str(run)]) == 0
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert "train.png" in pngs and "tracker.png" in pngs
    assert (run / "plots" / "train.png").read_bytes()[:4] == b"\x89PNG"


def test_offline_values_initialise_the_tracker_with_actual_counts(tmp_path):
    from spo_agents.algorithm.tracker import ValueTracker
    from spo_agents.config import TrackerConfig
    from spo_agents.training.values import init_tracker, write_values

    path = tmp_path / "v.json"
    write_values(path, {"a": (3, 4), "b": (0, 2), "zzz": (1, 1)}, {"env": "x"})
    tr = ValueTracker.from_config(["a", "b", "c"], TrackerConfig())
    assert init_tracker(tr, path) == 2
    n0 = 1 / (1 - 0.875)
    np.testing.assert_allclose(
        tr.v_hat(tr.indices(["a", "b", "c"])), [(3.5 / 5) / ((3.5 + 1.5) / 5), 0.5 / 3, 0.5], rtol=1e-6
    )
    assert tr.alpha[tr.indices(["a"])[0]] == pytest.approx(n0 * 3.5 / 5, rel=1e-6)


class HalfCreditEnv(FirstTokenEnv):
    """Every answer earns 0.5 and none is fully correct (partial credit)."""

    def step(self, text):
        return "", 0.5, True, False, {"correct": False, "answer": text[:8]}


def test_offline_values_sum_the_reward_training_folds_in(tmp_path):
    import asyncio

    from spo_agents.algorithm.tracker import ValueTracker
    from spo_agents.config import TrackerConfig
    from spo_agents.rollout.policy.base import SamplingParams
    from spo_agents.training.values import estimate, init_tracker, write_values

    comp = tiny_components()
    counts = asyncio.run(
        estimate(
            lambda: HalfCreditEnv(),
            comp.policy,
            ["train-0", "train-1"],
            n=4,
            sampling=SamplingParams(max_new_tokens=1),
            concurrency=4,
            max_episode_tokens=1,
            progress=False,
        )
    )
    assert counts == {"train-0": (2.0, 4), "train-1": (2.0, 4)}  # 4 x 0.5, not 0 fully correct
    write_values(tmp_path / "v.json", counts, {"env": "x"})
    tr = ValueTracker.from_config(["train-0", "train-1"], TrackerConfig())
    init_tracker(tr, tmp_path / "v.json")
    # alpha0 = N0 (s + 0.5) / (n + 1) with s = 2: v_hat0 = 2.5 / 5 = 0.5, the expected reward
    assert tr.v_hat(tr.indices(["train-0"]))[0] == pytest.approx(0.5)


def test_a_bad_values_file_says_how_to_make_one(tmp_path):
    from spo_agents.errors import ConfigError
    from spo_agents.training.values import read_values

    p = tmp_path / "v.json"
    p.write_text('{"problems": {}}')
    with pytest.raises(ConfigError, match="estimate-values"):
        read_values(p)
    with pytest.raises(ConfigError, match="does not exist"):
        read_values(tmp_path / "nope.json")
