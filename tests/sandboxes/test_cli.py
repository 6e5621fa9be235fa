"""`spo-agent sandbox run` and `spo-agent sandbox list` (issue "Sandboxes", item 5)."""

from __future__ import annotations

import io
import json

from spo_agents.cli import main as cli_main


def main(argv):
    # No numpy/sympy pre-import: these tests are about the command, and start a worker each.
    if argv[:2] == ["sandbox", "run"]:
        argv = [*argv, "-o", "preload=[]"]
    return cli_main(argv)


def test_run_prints_one_json_result_per_call(tmp_path, capsys):
    code = tmp_path / "code.py"
    code.write_text("n = globals().get('n', 0) + 1\nprint('n =', n)\n")
    rc = main(["sandbox", "run", str(code), "--repeat", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    results = [json.loads(line) for line in lines]
    assert [r["stdout"] for r in results] == ["n = 1\n", "n = 2\n"]
    assert results[0]["backend"] == "local" and results[0]["isolation"] in ("bubblewrap", "unshare", "none")


def test_run_stateless_forgets(tmp_path, capsys):
    code = tmp_path / "code.py"
    code.write_text("n = globals().get('n', 0) + 1\nprint('n =', n)\n")
    main(["sandbox", "run", str(code), "--repeat", "2", "--stateless"])
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["stdout"] for r in results] == ["n = 1\n", "n = 1\n"]


def test_run_from_stdin_with_timeout_and_pretty(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("print('hi')\nwhile True:\n    pass\n"))
    rc = main(["sandbox", "run", "-", "--timeout", "0.5", "--pretty"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "timed_out" in out and "session_restarted" in out and "hi" in out


def test_run_reports_a_missing_file(capsys):
    rc = main(["sandbox", "run", "/nonexistent/code.py"])
    assert rc == 1
    assert "cannot read the code file" in capsys.readouterr().err


def test_run_rejects_an_unknown_backend(tmp_path, capsys):
    code = tmp_path / "c.py"
    code.write_text("print(1)")
    rc = main(["sandbox", "run", str(code), "--backend", "lokal"])
    assert rc == 1
    assert "Did you mean `local`?" in capsys.readouterr().err


def test_list_shows_backends_with_availability(capsys):
    assert main(["sandbox", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"local", "docker", "e2b"} <= set(rows)
    assert rows["local"]["available"] is True
    assert "isolation" in rows["local"]["detail"]
