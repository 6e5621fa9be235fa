"""Configs: every shipped YAML loads, mirrors `Config` key for key, and opens with its command;
unknown keys and bad values are errors with a suggestion."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from spo_agents.config import Config, apply_overrides, from_dict, load_config, to_dict
from spo_agents.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        path = f"{prefix}{k}"
        out.add(path)
        if isinstance(v, dict) and not path.endswith(("kwargs", "options")):
            out |= _keys(v, path + ".")
    return out


def test_the_required_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"cpu-default.yaml", "qwen3-8b-math-python.yaml", "grpo-cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_mirrors_the_dataclasses(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert _keys(raw) == _keys(to_dict(Config())), "a shipped YAML must list every field of `Config`, no more, no less"
    assert from_dict(Config, to_dict(cfg)) == cfg
    cfg.check_trainable()  # every shipped config trains


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_opens_with_the_command_that_runs_it(path):
    head = [line for line in path.read_text().splitlines() if line.startswith("#")]
    runs = [line for line in head if line.startswith("# Run: spo-agent ")]
    assert runs, f"{path.name} must say how it is run (`# Run: spo-agent ...`)"
    assert f"configs/{path.name}" in runs[0]


def test_cpu_default_yaml_is_exactly_the_defaults():
    assert load_config(Path(__file__).parent.parent / "configs" / "cpu-default.yaml") == Config()


def test_paper_config_has_the_paper_settings():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "qwen3-8b-math-python.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-6, 0.01, 1.0)
    assert (cfg.train.batch_size, cfg.train.mini_batches, cfg.train.epochs) == (2048, 8, 1)
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.dual_clip) == (0.2, 0.28, 10.0)
    assert (cfg.tracker.d_half, cfg.tracker.rho_min, cfg.tracker.rho_max) == (0.06, 0.875, 0.96)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens) == (1.0, 1.0, 16384)
    assert (cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k) == (32, 0.6, 0.95, 20)
    assert cfg.sampler.eps == 0.05 and cfg.algorithm.name == "spo"


@pytest.mark.parametrize("override", ["rollout.top_p=0.5", "rollout.top_k=20"])
def test_training_refuses_truncated_sampling_and_evaluation_keeps_it(override):
    with pytest.raises(ConfigError, match="full softmax.*`eval.top_"):
        load_config(None, [override])
    cfg = load_config(None, ["eval.top_p=0.5", "eval.top_k=20"])
    assert (cfg.eval.top_p, cfg.eval.top_k) == (0.5, 20)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def test_the_grpo_comparison_differs_from_the_default_only_in_the_algorithm():
    spo = _flat(to_dict(load_config(Path(__file__).parent.parent / "configs" / "cpu-default.yaml")))
    grpo = _flat(to_dict(load_config(Path(__file__).parent.parent / "configs" / "grpo-cpu.yaml")))
    differ = {k for k in spo if spo[k] != grpo[k]}
    assert differ and all(k.startswith("algorithm.") or k == "sampler.type" for k in differ), sorted(differ)
    assert grpo["sampler.type"] == "uniform" and grpo["algorithm.name"] == "grpo"
    assert grpo["train.batch_size"] % grpo["algorithm.group_size"] == 0  # same trajectories per step


def test_the_paper_config_is_synchronous_and_the_async_variant_differs_only_in_collection():
    here = Path(__file__).parent.parent / "configs"
    paper = _flat(to_dict(load_config(here / "qwen3-8b-math-python.yaml")))
    async_ = _flat(to_dict(load_config(here / "qwen3-8b-math-python-async.yaml")))
    assert paper["rollout.oversample"] == 1.0 and paper["rollout.max_staleness"] == 0
    assert async_["rollout.oversample"] > 1.0
    assert {k for k in paper if paper[k] != async_[k]} <= {
        "rollout.oversample",
        "rollout.max_staleness",
        "rollout.max_in_flight",
    }


def test_grpo_config_selects_grouped_collection():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "grpo-cpu.yaml")
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.group_size >= 2
    assert cfg.train.batch_size % cfg.algorithm.group_size == 0


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key `tracker.rho_mni`.*Did you mean `rho_min`"):
        load_config(None, ["tracker.rho_mni=0.9"])
    with pytest.raises(ConfigError, match=r"unknown config key `trainn`.*Did you mean `train`"):
        from_dict(Config, {"trainn": {}})


def test_bad_choice_suggests_a_valid_one():
    with pytest.raises(ConfigError, match=r"`algorithm.name` must be one of `spo`, `grpo`.*Did you mean `grpo`"):
        load_config(None, ["algorithm.name=gpro"])


def test_bad_types_and_ranges_say_what_was_expected():
    with pytest.raises(ConfigError, match=r"`train.batch_size` must be int, got 'many'"):
        load_config(None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match=r"rho_min <= rho_max"):
        load_config(None, ["tracker.rho_min=0.99"])
    with pytest.raises(ConfigError, match=r"`section.key=value`"):
        apply_overrides({}, ["tracker.rho_min"])


def test_scientific_notation_without_a_dot_is_a_float():
    assert load_config(None, ["optim.lr=1e-6"]).optim.lr == 1e-6
    with pytest.raises(ConfigError):
        load_config(None, ["optim.lr=fast"])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_a_default_so_an_empty_file_is_the_default_config(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()
    assert all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(Config)
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.eps_low=1.5", "loss.eps_low"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.mini_batches=0", "train.mini_batches"),
        ("train.mini_batches=17", "train.mini_batches"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("train.max_minutes=0", "train.max_minutes"),
        ("sampler.eps=-1", "sampler.eps"),
        ("eval.k=0", "eval.k"),
        ("algorithm.group_size=0", "algorithm.group_size"),
        ("rollout.oversample=0.5", "rollout.oversample"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("sandbox.timeout_s=0", "sandbox.timeout_s"),
    ],
)
def test_out_of_range_values_are_errors_that_name_the_key_and_the_rule(override, key):
    with pytest.raises(ConfigError, match=rf"`{key}` must be .*, got"):
        load_config(overrides=[override])


def test_boundary_values_are_accepted():
    cfg = load_config(
        overrides=[
            "train.mini_batches=16",
            "optim.grad_clip=0",
            "eval.temperature=0",
            "train.max_minutes=null",
            "rollout.max_staleness=0",
        ]
    )
    assert cfg.train.mini_batches == cfg.train.batch_size and cfg.train.max_minutes is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.name=grpo", "algorithm.group_size=1"], "`algorithm.group_size` >= 2"),
        (["algorithm.name=grpo", "algorithm.group_size=3"], "multiple of `algorithm.group_size`"),
        (["algorithm.advantage=rloo"], "needs grouped collection"),
        (["algorithm.name=grpo", "algorithm.group_size=4", "algorithm.advantage_norm=token"], "normalises within"),
    ],
)
def test_rules_across_sections_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_an_openai_server_is_refused_for_training_only():
    cfg = load_config(overrides=["rollout.backend=openai", "rollout.base_url=http://127.0.0.1:9/v1"])
    with pytest.raises(ConfigError, match="cannot push the learner's weights"):
        cfg.check_trainable()
