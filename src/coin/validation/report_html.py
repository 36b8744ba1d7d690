"""``report.html``: the gate's result as one static HTML page that opens offline.

Great Expectations' Data Docs pull their CSS and JavaScript from CDNs; offline, the site index lists
nothing (its tables are drawn by JavaScript) and every page is unstyled. This page has no external
asset at all: the per-check table, rejects per reason, the similarity distribution, what the leak
checks compared against, and links to the Data Docs pages (which still render their content
without styles).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from coin.validation.result import REJECTS_FILE, GateReport
from coin.validation.text import apart, shorten

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #196c2e; font-weight: 600; } .fail { color: #b00020; font-weight: 600; }
.reason { font-size: 12px; color: #555; max-width: 640px; } code { background: #f6f6f6; padding: 0 3px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _rows(rows: list[list[Any]], numeric: set[int]) -> str:
    return "\n".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )


def render(report: GateReport, out_dir: Path) -> str:
    """The page for ``report``; links are relative to ``out_dir`` (where the page is written)."""
    ok = report.passed
    verdict = f'<span class="{"pass" if ok else "fail"}">{"passed" if ok else "FAILED"}</span>'
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>CoIN validation gate</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>Paraphrase-validation gate {verdict}</h1>",
        f"<p>{report.rows_valid} of {report.rows_in} rows valid: pass rate "
        f"<b>{apart(report.pass_rate, report.min_pass_rate)}</b> "
        f"(threshold <code>validate.min_pass_rate</code> = {report.min_pass_rate}); {report.rows_rejected} rejected "
        f"to <code>rejects.jsonl</code> with their reasons."
        + (f' <span class="fail">And {_e(report.emptied_note)}.</span>' if report.emptied_note else "") + "</p>",
        "<h2>Checks</h2>",
        "<table><tr><th>check</th><th>pass rate</th><th>failures</th><th>first failing row</th></tr>",
        _rows([[f"<code>{_e(name)}</code>", f"{s.pass_rate:.3f}", s.failures,
                "" if s.example_pair_id is None else
                f'<code>{_e(s.example_pair_id)}</code><div class="reason">'
                f'{_e(shorten(s.example_reason or "", 300, REJECTS_FILE))}</div>']
               for name, s in report.checks.items()], {1, 2}),
        "</table>",
    ]
    if report.per_task:
        parts += ["<h2>Rows per task</h2>",
                  "<table><tr><th>task</th><th>rows in</th><th>valid</th><th>rejected</th><th>pass rate</th></tr>",
                  _rows([[f"<code>{_e(t)}</code>", c["rows_in"], c["valid"], c["rejected"],
                          apart(c["pass_rate"], report.min_pass_rate)
                          + (" (no training row left)" if t in report.emptied_tasks else
                             " (below the threshold)" if t in report.thinned_tasks else "")]
                         for t, c in report.per_task.items()], {1, 2, 3, 4}), "</table>"]
    if report.rejects_per_reason:
        parts += ["<h2>Rejected rows per reason</h2>", "<table><tr><th>check.reason</th><th>rows</th></tr>",
                  _rows([[f"<code>{_e(k)}</code>", v] for k, v in report.rejects_per_reason.items()], {1}), "</table>"]
    sim = report.stats.get("semantic_similarity", {})
    if sim.get("n"):
        parts += [
            "<h2>Instruction similarity (MiniLM cosine of original vs paraphrase instruction)</h2>",
            "<table><tr><th>rows</th><th>min</th><th>p05</th><th>median</th><th>p95</th><th>max</th>"
            "<th>bounds</th><th>below</th><th>above</th></tr>",
            _rows([[sim["n"], sim["min"], sim["p05"], sim["median"], sim["p95"], sim["max"],
                    f"[{sim['min_similarity']}, {sim['max_similarity']}]", sim["below_min"], sim["above_max"]]],
                  {0, 1, 2, 3, 4, 5, 7, 8}),
            "</table>",
        ]
    src = report.stats.get("eval_sources", {})
    inst, ex = report.stats.get("instruction_leakage", {}), report.stats.get("example_leakage", {})
    if src:
        parts += [
            "<h2>Leakage: compared against</h2><ul>",
            f"<li>{src.get('instructions')} evaluation instructions "
            f"(sets: {_e(', '.join(src.get('instruction_sets', [])))}) "
            f"from <code>{_e(src.get('instruction_file'))}</code>; closest training instruction: MiniLM cosine "
            f"{inst.get('max_cosine')}, text ratio {inst.get('max_text_ratio')} (leak bounds "
            f"{inst.get('leak_max_similarity')} / {inst.get('leak_max_text_ratio')})</li>",
            f"<li>{src.get('examples')} evaluation examples of {_e(', '.join(src.get('example_tasks', [])))}; "
            f"{ex.get('partial_example_matches', 0)} multi-field examples share a field (not the whole example) "
            f"with a training input</li>",
            *[f"<li>{_e(n)}</li>" for n in src.get("notes", [])], "</ul>",
        ]
    if settings := report.stats.get("settings"):
        parts += ["<h2>Settings applied</h2>", "<table><tr><th>key</th><th>value</th></tr>",
                  _rows([[f"<code>{_e(k)}</code>", f"<code>{_e(json.dumps(v))}</code>"] for k, v in settings.items()],
                        set()), "</table>"]
    pages = sorted((out_dir / "data_docs" / "validations").rglob("*.html")) if (out_dir / "data_docs").is_dir() else []
    if pages:
        parts.append("<h2>Great Expectations Data Docs</h2><ul>")
        for p in pages:
            rel = Path(os.path.relpath(p, out_dir)).as_posix()
            suite = p.relative_to(out_dir / "data_docs" / "validations").parts[0]
            parts.append(f'<li><a href="{_e(rel)}">{_e(suite)}</a> (<code>{_e(rel)}</code>)</li>')
        parts.append("</ul><p>The Data Docs load their styles from CDNs; offline they show unstyled.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
