"""The README describes what the code does: metric keys, commands and the quick start."""

import re
from pathlib import Path

from spo_agents.cli import build_parser
from spo_agents.metrics import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_metrics_table_matches_the_code():
    assert markdown_table().strip() in (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert "docs/metrics.md" in README


def test_quick_start_has_exactly_the_two_make_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make train", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert steps[0] == "make test"  # the README's test command first, then the marked suites
    assert all(re.fullmatch(r"make test-[a-z]+", step) for step in steps[1:]), steps
    makefile = (ROOT / "Makefile").read_text()
    assert "spo-agent train --env math-python" in makefile.split("\ntrain:", 1)[1].split("\n\n", 1)[0]


def test_every_spo_agent_subcommand_in_the_readme_exists():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    used = set(re.findall(r"spo-agent ([a-z][a-z-]+)", README))
    assert used <= set(sub.choices), used - set(sub.choices)
