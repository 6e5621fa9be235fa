"""The README and docs/ describe what the code does: metric keys, commands, links, make targets,
the quick start and the example environments."""

import argparse
import re
import shlex
import types
from pathlib import Path

import pytest

from spo_agents.cli import build_parser
from spo_agents.training.metrics import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code, where links and headings live."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _blocks(text: str, lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _commands(text: str) -> list[list[str]]:
    """Every `spo-agent ...` command of the page's bash blocks, as argument lists."""
    commands = []
    for block in _blocks(text, "bash"):
        for line in block.splitlines():
            tokens = shlex.split(line, comments=True)
            segment: list[str] = []
            for tok in [*tokens, "&&"]:
                if tok in ("&&", "|", ";", "||"):
                    if segment[:1] == ["spo-agent"]:
                        commands.append(segment[1:])
                    segment = []
                else:
                    segment.append(tok)
    return commands


def test_metrics_table_matches_the_code():
    assert markdown_table().strip() in (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert "docs/metrics.md" in README


def test_quick_start_has_exactly_the_two_make_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make train", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert steps[0] == "make test"  # the README's test command first, then the marked suites
    assert all(re.fullmatch(r"make test-[a-z]+", step) for step in steps[1:]), steps
    makefile = (ROOT / "Makefile").read_text()
    assert "spo-agent train --env math-python" in makefile.split("\ntrain:", 1)[1].split("\n\n", 1)[0]


def test_every_spo_agent_subcommand_in_the_readme_and_docs_exists():
    choices = set(_subparsers(build_parser()))
    for page in PAGES:
        used = set(re.findall(r"spo-agent ([a-z][a-z-]+)", page.read_text(encoding="utf-8")))
        assert used <= choices, (page.name, used - choices)


def test_every_spo_agent_command_in_a_bash_block_parses():
    """Each documented command line is accepted by the real CLI parser: no removed or misspelt flag."""
    assert len(_commands(README)) >= 8  # the extraction finds the README's commands
    bad = []
    for page in PAGES:
        for args in _commands(page.read_text(encoding="utf-8")):
            try:
                build_parser().parse_args(args)
            except SystemExit:
                bad.append(f"{page.name}: spo-agent {shlex.join(args)}")
    assert not bad, "\n".join(bad)


def test_every_flag_named_with_a_subcommand_exists():
    """`spo-agent <cmd> --flag` in running text names a flag that <cmd> takes."""
    subs = _subparsers(build_parser())
    bad = []
    for page in PAGES:
        for span in re.findall(r"`spo-agent ([^`]+)`", page.read_text(encoding="utf-8")):
            words = span.split()
            sub = subs.get(words[0])
            if sub is None:
                bad.append(f"{page.name}: {span}")
                continue
            if words[0] == "sandbox" and len(words) > 1 and words[1] in _subparsers(sub):
                sub = _subparsers(sub)[words[1]]
            for word in words[1:]:
                if word.startswith("-") and word != "-" and word.split("=")[0] not in sub._option_string_actions:
                    bad.append(f"{page.name}: `spo-agent {span}`: no {word.split('=')[0]}")
    assert not bad, "\n".join(bad)


def test_every_make_target_named_in_the_readme_and_docs_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    for page in PAGES:
        named = set(re.findall(r"\bmake ([a-z][a-z-]+)", page.read_text(encoding="utf-8")))
        assert named <= targets, (page.name, named - targets)


def test_every_relative_link_points_at_a_file_in_the_repository():
    """Links and images in README.md and docs/*.md resolve to files of the repository, and their
    `#anchors` to headings of the page they name."""
    bad = []
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{page.name}: {target} (no such file in the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: {target} (no heading `{anchor}` in {dest.name})")
    assert not bad, "\n".join(bad)


def test_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Run directory, checkpoints and `--resume`\n", encoding="utf-8")
    assert _anchors(page) == {"title", "run-directory-checkpoints-and---resume"}
    assert _prose("see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n").count("](") == 1


def test_readme_stays_a_front_door():
    lines = README.count("\n") + 1
    assert lines <= 250, f"README.md has {lines} lines; move reference material into docs/"
    sections = re.findall(r"^## (.+)$", _prose(README), re.MULTILINE)
    contents = README.split("## Contents", 1)[1].split("\n## ", 1)[0]
    for section in sections[1:]:
        assert f"(#{_slug(section)})" in contents, f"section `{section}` is missing from Contents"


def _env_class(page: Path, name: str) -> type:
    """The environment class a page's python example defines, executed as written."""
    code = next(b for b in _blocks(page.read_text(encoding="utf-8"), "python") if f"class {name}(" in b)
    module = types.ModuleType(f"doc_example_{name.lower()}")
    exec(compile(code, f"{page.name}:{name}", "exec"), module.__dict__)  # noqa: S102 - our own docs' example
    return module.__dict__[name]


@pytest.mark.parametrize(("page", "name"), [("README.md", "EchoEnv"), ("docs/environments.md", "SquareEnv")])
def test_documented_environment_passes_check_env(page, name):
    from spo_agents.envs.checker import check_env, load_tokenizer

    cls = _env_class(ROOT / page, name)
    results = check_env(lambda: cls(split="train", sandbox="local"), tokenizer=load_tokenizer(None))
    assert [r.name for r in results if not r.passed] == [], [(r.name, r.detail) for r in results]


def test_readme_plugin_example_rewards_the_magic_word_only():
    env = _env_class(ROOT / "README.md", "EchoEnv")()
    env.reset(options={"problem_id": "echo/1"})
    obs, reward, terminated, truncated, _ = env.step("No.")
    assert (reward, terminated, truncated) == (0.0, False, False) and obs
    _, reward, terminated, _, _ = env.step("Please!")
    assert (reward, terminated) == (1.0, True)


def test_docs_tool_example_runs_code_in_the_sandbox_and_checks_the_answer():
    env = _env_class(ROOT / "docs" / "environments.md", "SquareEnv")(split="test", sandbox="local")
    try:
        env.reset(options={"problem_id": "square/61"})
        obs, reward, terminated, _, info = env.step("<code>print(61 * 61)</code>")
        assert "3721" in obs and (reward, terminated, info["tool_calls"]) == (0.0, False, 1)
        _, reward, terminated, _, _ = env.step("So the answer is \\boxed{3721}.")
        assert (reward, terminated) == (1.0, True)
        env.reset(options={"problem_id": "square/61"})
        _, reward, terminated, _, _ = env.step("\\boxed{3600}")
        assert (reward, terminated) == (0.0, True)
    finally:
        env.close()
