"""HTML pages of the viewer, one module per view, gathered here for the server's routes.

Pages: the run overview (metric curves), the index and the comparison of several runs
(`run_pages`); problems (the tracker's table) and one problem's history (`problem_pages`); the
saved training trajectories and one trajectory (`trajectory_pages`); eval dirs with per-problem
pass@k, maj@k, answer clusters and every transcript (`eval_pages`). The building blocks they
share (escaping, tables, the page frame) are in `html`.
"""

from __future__ import annotations

from spo_agents.view.eval_pages import eval_page, eval_problem_page, eval_sample_page, evals_page
from spo_agents.view.html import PAGE_SIZE, REFRESH_S, Layout, esc, href
from spo_agents.view.problem_pages import problem_page, problems_page
from spo_agents.view.run_pages import CHARTS, COMPARE_KEYS, compare_page, index_page, overview_page
from spo_agents.view.trajectory_pages import trajectories_page, trajectory_page

__all__ = [
    "CHARTS",
    "COMPARE_KEYS",
    "PAGE_SIZE",
    "REFRESH_S",
    "Layout",
    "compare_page",
    "esc",
    "eval_page",
    "eval_problem_page",
    "eval_sample_page",
    "evals_page",
    "href",
    "index_page",
    "overview_page",
    "problem_page",
    "problems_page",
    "trajectories_page",
    "trajectory_page",
]
