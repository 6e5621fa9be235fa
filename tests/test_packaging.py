"""The distribution: a wheel builds, installs into a clean venv and imports, with `envs/` and
`sandboxes/` under the `spo_agents` namespace and no bare top-level packages."""

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked, or new and not ignored), without build leftovers that
    an in-tree build would pick up."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    src = _source_copy(tmp_path_factory.mktemp("src"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
    )
    (whl,) = out.glob("spo_agents-*.whl")
    return whl


def test_wheel_maps_envs_and_sandboxes_under_the_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "spo_agents/envs/base.py" in names
    assert "spo_agents/sandboxes/base.py" in names
    # data the code reads at run time
    for data in (
        "spo_agents/envs/data/code_problems.jsonl",
        "spo_agents/sandboxes/docker/setup-engine.sh",
        "spo_agents/sandboxes/docker/Dockerfile",
        "spo_agents/sandboxes/local/worker.py",
        "spo_agents/sandboxes/docker/driver.py",
    ):
        assert data in names, data
    top_level = {n.split("/")[0] for n in names if not n.endswith(".dist-info/") and "/" in n}
    assert "envs" not in top_level and "sandboxes" not in top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "spo-agent = spo_agents.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_module_of_the_source_is_in_the_wheel(wheel):
    """A new subpackage must be listed in pyproject's `packages`, or the wheel silently lacks it."""
    names = set(zipfile.ZipFile(wheel).namelist())
    mapping = {"spo_agents": "spo_agents", "envs": "spo_agents/envs", "sandboxes": "spo_agents/sandboxes"}
    missing = []
    for folder, installed in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            name = f"{installed}/{path.relative_to(ROOT / folder).as_posix()}"
            if name not in names:
                missing.append(name)
    assert not missing, f"not in the wheel (add the package to pyproject's `packages`): {missing}"


def test_wheel_installs_and_imports_in_a_clean_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # Install the wheel itself into the clean venv; its dependencies (torch, transformers, ...)
    # come from the test's own environment through a path entry placed AFTER the venv's site.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import spo_agents, spo_agents.envs.base, spo_agents.sandboxes.base, spo_agents.cli, importlib.util;"
        "assert spo_agents.__file__.startswith(%r), spo_agents.__file__;"
        "assert importlib.util.find_spec('envs') is None and importlib.util.find_spec('sandboxes') is None;"
        "print('ok')" % str(site)
    )
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    cli = subprocess.run([py, "-m", "spo_agents", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "train" in cli.stdout
