"""Every `spo-agent` subcommand's help text ends with a full sentence (none is cut mid-sentence)."""

from __future__ import annotations

import argparse
import re

import pytest

from spo_agents.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((f"{prefix}{name}", sub))
                out += _subcommands(sub, f"{prefix}{name} ")
    return out


SUBCOMMANDS = _subcommands(build_parser())
SENTENCE_END = re.compile(r"[.!?][)`'\"]*$")


def test_the_walk_finds_the_commands():
    names = {name for name, _ in SUBCOMMANDS}
    assert {"train", "eval", "envs", "check-env", "view", "rescore"} <= names


@pytest.mark.parametrize("name,sub", SUBCOMMANDS, ids=[n for n, _ in SUBCOMMANDS])
def test_help_text_ends_with_a_full_sentence(name, sub):
    if not sub.description:
        pytest.skip(f"`spo-agent {name}` has no description; its help is the usage and options")
    text = " ".join(sub.description.split())
    assert SENTENCE_END.search(text), f"`spo-agent {name} --help` ends mid-sentence: ...{text[-80:]!r}"
    assert text[0].isupper() or text[0] in "`'\"", f"`spo-agent {name} --help` does not start a sentence: {text[:40]!r}"
