"""The package's folders are its layers, and imports point one way.

Each module's imports (module level and inside functions alike) are read from its source. A
layer may import only the layers listed for it below; `cli` and `view` sit on top and may import
anything. No module imports another module's private (underscore) name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "spo_agents": ROOT / "spo_agents",
    "spo_agents.envs": ROOT / "envs",
    "spo_agents.sandboxes": ROOT / "sandboxes",
}

# The modules at the package root: configuration, records, errors, the registry, the model files.
BASE = "base"
# What each layer may import besides itself.
ALLOWED: dict[str, set[str]] = {
    BASE: set(),
    "algorithm": {BASE},
    "sandboxes": {BASE},
    "envs": {BASE, "sandboxes"},
    "rollout": {BASE, "algorithm", "envs", "sandboxes"},
    "serving": {BASE, "rollout"},
    "evaluation": {BASE, "algorithm", "envs", "sandboxes", "rollout"},
    "training": {BASE, "algorithm", "envs", "sandboxes", "rollout", "serving", "evaluation"},
}
TOP = {"cli", "view"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def layer(module: str) -> str:
    if module == "spo_agents.__main__":  # the `python -m spo_agents` entry point runs the CLI
        return "cli"
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "spo_agents":
        return BASE
    head = parts[1]
    if head in ALLOWED or head in TOP:
        return head
    return BASE


def imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


MODULES = modules()


def test_the_layers_are_folders():
    for name in ("algorithm", "rollout", "training", "serving", "evaluation"):
        assert (ROOT / "spo_agents" / name / "__init__.py").is_file(), name
    flat = sorted(p.stem for p in (ROOT / "spo_agents").glob("*.py"))
    assert len(flat) <= 12, f"the package root should hold only the shared basics, found {flat}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = layer(module)
    if own in TOP:
        return
    wrong = []
    for target, _names, line in imports(module, MODULES[module]):
        if not target.startswith("spo_agents"):
            continue
        other = layer(target)
        # `from spo_agents import envs` names a layer through the root package.
        for name in _names if target == "spo_agents" else []:
            if name in ALLOWED or name in TOP:
                other = name
        if other != own and other not in ALLOWED[own]:
            wrong.append(f"line {line}: {target} ({other})")
    assert not wrong, f"{module} ({own}) imports a layer above or beside it: {wrong}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_modules(module):
    crossing = []
    for target, names, line in imports(module, MODULES[module]):
        if not target.startswith("spo_agents") or target == module:
            continue
        crossing += [f"line {line}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossing, f"{module} imports private names of other modules: {crossing}"


def test_the_checker_sees_a_violation(tmp_path):
    """The import reader resolves relative imports and finds imports inside functions."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ..training.loop import train\n    from .tracker import _private\n")
    found = imports("spo_agents.algorithm.mod", source)
    assert ("spo_agents.training.loop", ["train"], 2) in found
    assert ("spo_agents.algorithm.tracker", ["_private"], 3) in found
    assert layer("spo_agents.training.loop") == "training"
    assert "training" not in ALLOWED[layer("spo_agents.algorithm.mod")]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_450_lines(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= 450, f"{module} has {lines} lines; split it by idea"
