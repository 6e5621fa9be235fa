"""`--env-arg KEY=VALUE` means the same to `train` and `eval`: YAML values, dotted keys nest."""

from __future__ import annotations

import pytest

from spo_agents.cli.env_args import env_arg_overrides, parse_env_args
from spo_agents.config import apply_overrides
from spo_agents.errors import ConfigError

ITEMS = ["num_problems=4", "source=jsonl:data/x.jsonl", "fields.prompt=question", "skip_bad=true", "tags=[a, b]"]


def test_values_are_yaml_and_dotted_keys_nest():
    assert parse_env_args(ITEMS) == {
        "num_problems": 4,
        "source": "jsonl:data/x.jsonl",
        "fields": {"prompt": "question"},
        "skip_bad": True,
        "tags": ["a", "b"],
    }


def test_train_overrides_give_the_same_options_as_eval():
    config = apply_overrides({}, env_arg_overrides(ITEMS))
    assert config["env"]["kwargs"] == parse_env_args(ITEMS)


@pytest.mark.parametrize("bad", ["n", "=3", "a..b=1", "1x=2", "a b=1", "-x=1"])
def test_an_item_that_is_not_key_value_is_refused_by_both(bad):
    for parse in (parse_env_args, env_arg_overrides):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse([bad])
