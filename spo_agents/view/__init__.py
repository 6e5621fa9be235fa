"""`spo-agent view`: a local, offline web viewer of training runs and evaluations.

    spo-agent view runs/math-python-v0-spo-20261127-192500          # one run
    spo-agent view runs/runA runs/runB --port 8765                    # two runs, and their comparison
    spo-agent view runs/eval/run1                                     # an eval dir

Standard library only on the server side (`http.server`); pages are HTML with inline SVG charts
drawn by `spo_agents.view.svg`, one small script of our own for the live refresh, nothing
fetched from elsewhere. Modules: `data` (reading run and eval dirs), `svg` (charts), `html`
(escaping, tables, the page frame), the pages per view (`run_pages`, `problem_pages`,
`trajectory_pages`, `eval_pages`, gathered in `pages`), `static` (CSS, script), `server` (routes
and HTTP).
"""

from spo_agents.view.server import Viewer, ViewServer

__all__ = ["ViewServer", "Viewer"]
