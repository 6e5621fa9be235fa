"""The viewer's stylesheet, script and icon, served from `/static/` (never from a CDN).

The pages carry no inline script or style: the Content-Security-Policy allows scripts and styles
from the viewer itself only, so text injected by a model cannot run even if escaping failed.
The script only refreshes the page's `main` element while a run trains.
"""

from __future__ import annotations

CSS = """
:root {
  --fg: #1d2330; --muted: #5f6b7a; --line: #dde2ea; --bg: #f6f7f9; --card: #fff;
  --accent: #3b6fd4; --good: #23845b; --bad: #c2393f; --model: #eef3fd; --model-edge: #3b6fd4;
  --env: #f3f4f6; --env-edge: #9aa3af; --code: #0f172a; --code-fg: #e2e8f0;
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: var(--fg); background: var(--bg); }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header.top { background: #1d2330; color: #fff; padding: 0 20px; display: flex; align-items: center; gap: 18px;
  height: 46px; }
header.top .brand { font-weight: 600; color: #fff; letter-spacing: .2px; }
header.top nav a { color: #c9d3e3; margin-right: 14px; }
header.top nav a.on { color: #fff; font-weight: 600; }
header.top .live { margin-left: auto; font-size: 12px; color: #9fe3bf; }
.tabs { background: #fff; border-bottom: 1px solid var(--line); padding: 0 20px; display: flex; gap: 4px; }
.tabs a { padding: 10px 12px; color: var(--muted); border-bottom: 2px solid transparent; }
.tabs a.on { color: var(--fg); border-bottom-color: var(--accent); font-weight: 600; }
main { max-width: 1320px; margin: 0 auto; padding: 18px 20px 40px; }
h1 { font-size: 20px; margin: 4px 0 12px; }
h2 { font-size: 16px; margin: 22px 0 10px; }
h1.mono, h1 .mono { font-size: 18px; }
.muted { color: var(--muted); }
.small { font-size: 12px; }
.kpis { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 14px; }
.kpi { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px;
  min-width: 120px; }
.kpi .v { font-size: 18px; font-weight: 600; }
.kpi .k { font-size: 12px; color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(470px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px;
  overflow: hidden; }
svg.chart { display: block; width: 100%; height: auto; }
svg.chart .chart-title { font-size: 13px; font-weight: 600; fill: var(--fg); }
svg.chart .legend, svg.chart .tick, svg.chart .axis-label { font-size: 11px; fill: var(--muted); }
svg.chart .empty { font-size: 12px; fill: var(--muted); }
svg.chart .grid { stroke: #eef0f4; }
svg.chart .axis, svg.chart .tickmark { stroke: #b8c0cc; }
svg.chart path.series { fill: none; stroke-width: 1.8; stroke-linejoin: round; stroke-linecap: round; }
table.data { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; overflow: hidden; }
table.data th, table.data td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
table.data th { background: #f0f2f6; font-weight: 600; font-size: 12px; color: var(--muted); white-space: nowrap; }
table.data th a { color: var(--muted); }
table.data th a.on { color: var(--fg); }
table.data td.num, table.data th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data tr:hover td { background: #fafbfd; }
.mono, code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.ok { color: var(--good); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.track { display: inline-block; width: 64px; height: 8px; background: #e6eaf0; border-radius: 4px;
  vertical-align: middle; margin-right: 8px; overflow: hidden; }
.fill { display: block; height: 100%; background: var(--accent); opacity: .8; }
.f0 { width: 0; } .f1 { width: 10%; } .f2 { width: 20%; } .f3 { width: 30%; } .f4 { width: 40%; } .f5 { width: 50%; }
.f6 { width: 60%; } .f7 { width: 70%; } .f8 { width: 80%; } .f9 { width: 90%; } .f10 { width: 100%; }
td.bar { white-space: nowrap; font-variant-numeric: tabular-nums; }
form.filter { display: flex; gap: 8px; align-items: center; margin: 6px 0 12px; flex-wrap: wrap; }
form.filter input[type=text] { padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px; min-width: 260px; }
form.filter button { padding: 6px 12px; border: 1px solid var(--accent); background: var(--accent); color: #fff;
  border-radius: 6px; cursor: pointer; }
.pager { margin: 10px 0; display: flex; gap: 12px; align-items: center; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 8px; margin-bottom: 14px; }
.fact { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 6px 10px; }
.fact .k { font-size: 11px; color: var(--muted); text-transform: uppercase; letter-spacing: .4px; }
.fact .v { font-weight: 600; overflow-wrap: anywhere; }
.convo { display: flex; flex-direction: column; gap: 8px; }
.turn { border-radius: 8px; padding: 8px 12px; border-left: 4px solid; }
.turn .who { font-size: 11px; text-transform: uppercase; letter-spacing: .5px; color: var(--muted); margin-bottom: 4px;
  display: flex; gap: 10px; }
.turn.model { background: var(--model); border-color: var(--model-edge); }
.turn.env { background: var(--env); border-color: var(--env-edge); }
.turn.prompt { background: #fff; border-color: #c7cdd6; }
.turn .text { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font: inherit; }
.turn pre.code { background: var(--code); color: var(--code-fg); padding: 8px 10px; border-radius: 6px; margin: 6px 0;
  white-space: pre-wrap; overflow-wrap: anywhere; }
.turn pre.reply { background: #fff; border: 1px solid var(--line); padding: 6px 10px; border-radius: 6px; margin: 0;
  white-space: pre-wrap; overflow-wrap: anywhere; }
.tag { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 11px; background: #e4e8ef;
  color: #39424e; }
.tag.trained { background: #dbe6fb; color: #1f4fae; }
.tag.good { background: #dcf3e7; color: #1c6b47; }
.tag.bad { background: #fbe1e2; color: #9d2a30; }
.tok { white-space: pre-wrap; border-radius: 2px; }
.lp0 { background: #ffffff; } .lp1 { background: #fdf0e6; } .lp2 { background: #fbdcc4; } .lp3 { background: #f8c09a; }
.lp4 { background: #f3a06f; } .lp5 { background: #eb7d4c; color: #fff; } .lp6 { background: #d9573a; color: #fff; }
.lp7 { background: #b33a2e; color: #fff; }
.legend-lp span { padding: 0 6px; margin-right: 2px; }
details > summary { cursor: pointer; color: var(--muted); margin: 6px 0; }
.notice { background: #fff7e0; border: 1px solid #f0d9a0; padding: 8px 12px; border-radius: 8px; margin: 8px 0; }
.clusters span.cl { display: inline-block; margin: 1px 6px 1px 0; padding: 0 6px; border-radius: 4px;
  background: #f0f2f6; }
.clusters span.cl.win { outline: 1px solid var(--accent); }
.checks label { margin-right: 12px; color: var(--muted); }
"""

JS = """
(function () {
  var main = document.querySelector("main[data-refresh]");
  if (!main) { return; }
  var seconds = parseInt(main.getAttribute("data-refresh"), 10) || 10;
  function refresh() {
    fetch(window.location.href, { headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.querySelector("main");
        if (fresh) { main.innerHTML = fresh.innerHTML; }
      })
      .catch(function () {});
  }
  window.setInterval(refresh, seconds * 1000);
})();
"""

FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#1d2330"/>'
    '<path d="M2 12 L6 8 L9 10 L14 3" stroke="#7fb0ff" stroke-width="2" fill="none"/></svg>'
)

FILES = {
    "/static/view.css": ("text/css; charset=utf-8", CSS),
    "/static/view.js": ("text/javascript; charset=utf-8", JS),
    "/static/icon.svg": ("image/svg+xml", FAVICON),
}
