"""`spo-agent view`: pages over a fake run dir, escaping of model text, the server's guards,
and the SVG charts."""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from view_fixtures import TOK, episode, make_eval_dir, make_run

from spo_agents.cli import main
from spo_agents.trajectories import TrajectoryLog
from spo_agents.view import ViewServer
from spo_agents.view.svg import Series, line_chart, nice_ticks


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    a = make_run(root, "run-a", steps=12, batch=8, num_problems=60, k=2, inject=True)
    b = make_run(root, "run-b", steps=8, batch=8, num_problems=60, k=2, seed=1, checkpoint=False)
    e = make_eval_dir(root, k=4, inject=True)
    return a, b, e


@pytest.fixture(scope="module")
def server(dirs):
    s = ViewServer(list(dirs), port=0).start()
    yield s
    s.stop()


def get(server, path: str, host: str | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(server.url.rstrip("/") + path, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def _paths(page: str) -> list[tuple[str, int]]:
    """(label, points) of each series path of the page's charts."""
    out = []
    for m in re.finditer(r'<path class="series" data-label="([^"]*)" d="([^"]*)"', page):
        out.append((html.unescape(m.group(1)), len(re.findall(r"[ML]", m.group(2)))))
    return out


def test_overview_draws_a_curve_per_logged_metric(server, dirs):
    status, page, headers = get(server, "/r/0")
    assert status == 200
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    series = dict(_paths(page))
    assert series["train/reward_mean"] == 12  # one point per training step
    assert series["eval/avg_at_k"] == 4  # steps 0, 5, 10 and the last
    for key in ("tracker/v_hat_p50", "tracker/rho_mean", "tracker/drift", "sampler/entropy_ratio", "perf/tokens_per_s"):
        assert series[key] == 12


def test_problems_table_shows_the_checkpoint_tracker(server, dirs):
    import torch

    state = torch.load(dirs[0] / "checkpoints" / "step-000012" / "trainer_state.pt", weights_only=False)
    alpha, beta = state["tracker"]["alpha"].astype(float), state["tracker"]["beta"].astype(float)
    status, page, _ = get(server, "/r/0/problems?sort=v_hat&desc=0")
    assert status == 200
    shown = [float(x) for x in re.findall(r'<td class="bar">.*?</span></span>([0-9.]+)</td>', page)]
    v = np.sort(alpha / (alpha + beta))
    assert shown == pytest.approx(v[: len(shown)], abs=5e-4)  # ascending, the tracker's own values
    # sampling probabilities of prioritised sampling, Eq. 11: w = sqrt(v (1 - v)) + 0.05, normalised
    _, page, _ = get(server, "/r/0/problems")
    top = float(re.findall(r"([0-9.]+)%</td></tr>", page)[0]) / 100
    w = np.sqrt(v * (1 - v)) + 0.05
    assert top == pytest.approx(w.max() / w.sum(), abs=5e-6)
    _, page, _ = get(server, "/r/0/problems?q=mul&visited=1")
    ids = [html.unescape(x) for x in re.findall(r'/r/0/problem\?id=([^"]+)"', page)]
    assert ids and all("mul" in urllib.request.unquote(i) for i in ids)


def test_problem_history_lists_every_visit(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("env: {id: math-python}\n")
    rng = np.random.default_rng(0)
    with TrajectoryLog(run, keep_last_steps=1, older_sample=0.0) as log:
        for step, pids in enumerate([["a", "b"], ["a"], ["c", "a"]], start=1):
            trajs = [episode(p, "What is 1 + 2?", 3, True, rng, step - 1) for p in pids]
            log.record(step, trajs, [0.5] * len(pids), [0.25] * len(pids), [0.9] * len(pids), TOK)
    s = ViewServer([run], port=0).start()
    try:
        status, page, _ = get(s, "/r/0/problem?id=a")
        assert status == 200
        rows = re.findall(r'<tr><td class="num">(\d+)</td>', page)
        assert rows == ["3", "2", "1"]  # newest first, each visit once
        assert page.count("not kept") == 2 and page.count('class="traj-link"') == 1  # only the last step was kept
        status, page, _ = get(s, "/r/0/problems")
        assert status == 200 and "No checkpoint yet" in page
    finally:
        s.stop()


def test_model_text_is_escaped_everywhere(server):
    _, page, _ = get(server, "/r/0/trajectories?step=12")
    links = re.findall(r'href="(/r/0/traj\?step=12&amp;index=\d+)"', page)
    pages = [get(server, html.unescape(link))[1] for link in links]
    pages += [get(server, "/r/0/traj?step=12&index=0&lp=1")[1]]
    _, ev, _ = get(server, "/e/2")
    pid = html.unescape(re.search(r'href="/e/2/problem\?id=([^"]+)"', ev).group(1))
    pages += [get(server, f"/e/2/sample?id={pid}&i=0")[1]]
    injected = [p for p in pages if "window.__pwned" in p]
    assert injected, "the fixture's injected markup should appear (escaped) somewhere"
    for p in injected:
        assert "<script>window" not in p and "<img src" not in p
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in p
    for p in pages:
        assert re.findall(r"<script[^>]*>", p) == ['<script src="/static/view.js" defer>']
        assert re.search(r"<[a-z]+[^<>]*\son\w+=", p) is None  # no element with an event handler


def test_host_header_and_unknown_pages(server):
    status, body, _ = get(server, "/r/0", host="evil.example:8765")
    assert status == 403 and "localhost only" in body
    assert get(server, "/r/0", host="localhost:1")[0] == 200
    assert get(server, "/r/9")[0] == 404
    assert get(server, "/r/0/traj?step=999&index=0")[0] == 404
    assert get(server, "/e/0")[0] == 404  # target 0 is a run, not an eval dir
    assert get(server, "/favicon.ico")[0] == 204
    conn = http.client.HTTPConnection(*server.httpd.server_address[:2])
    conn.request("POST", "/r/0")
    assert conn.getresponse().status == 501
    conn.close()


def test_eval_page_shows_pass_at_k_and_answer_clusters(server, dirs):
    status, page, _ = get(server, "/e/2")
    assert status == 200
    results = json.loads((dirs[2] / "results.json").read_text())
    for j, v in results["pass_at_k"].items():
        assert f'{v:.3f}</div><div class="k">pass@{j}' in page
    p = results["problems"][0]
    _, prob, _ = get(server, f"/e/2/problem?id={urllib.request.quote(p['problem_id'])}")
    votes = [int(x) for x in re.findall(r'<td class="num">(\d+)</td><td class="">(?:<span class="(?:ok|bad)">)', prob)]
    answered = sum(a is not None for a in p["answers"])
    assert sum(votes) == answered  # every answer votes in exactly one cluster
    assert prob.count('class="traj-link"') == 4


def test_compare_puts_runs_on_the_same_axes(server):
    status, page, _ = get(server, "/compare?runs=0&runs=1")
    assert status == 200
    labels = [label for label, _ in _paths(page)]
    assert labels.count("run-a") >= 5 and labels.count("run-b") >= 5
    assert ("run-a", 12) in _paths(page) and ("run-b", 8) in _paths(page)


def test_overview_refreshes_only_while_the_run_writes_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/reward_mean": 0.5}) + "\n")
    s = ViewServer([run], port=0).start()
    try:
        assert 'data-refresh="10"' in get(s, "/r/0")[1]
        old = time.time() - 3600
        os.utime(run / "metrics.jsonl", (old, old))
        assert "data-refresh" not in get(s, "/r/0")[1]
    finally:
        s.stop()


def test_svg_ticks_cover_the_data_and_gaps_split_the_path():
    for lo, hi in [(0.0, 1.0), (0.875, 0.96), (3.0, 41.0), (-2.5, 7.1), (0.9998, 1.0001)]:
        t = nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and len(t) <= 12
    svg = line_chart([Series("x", [1, 2, 3, 4, 5], [0.1, 0.2, None, 0.4, 0.5])])
    d = re.search(r' d="([^"]*)"', svg).group(1)
    assert d.count("M") == 2 and d.count("L") == 2
    assert "no data yet" in line_chart([Series("x", [], [])])
    assert "&lt;b&gt;" in line_chart([Series("<b>", [1, 2], [1, 2])], title="<b>")


def test_cli_refuses_a_directory_that_is_neither(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 1
    assert "neither a run dir" in capsys.readouterr().err
