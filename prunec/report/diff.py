"""Renderers for a `ModelDiff`: a rich text table, the JSON document, one self-contained HTML page.

They only format what prunec.graph.diff computed. The JSON document is `ModelDiff.to_dict()`
(schema: docs/diff-schema.md). The HTML page has no external resources at all (inline CSS and a
few lines of inline JS for sorting), so it can be attached to a review or opened offline.
"""

from __future__ import annotations

import html
import json
from typing import Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from prunec.graph.diff import CHANNEL_OPS, ModelDiff, NodeDiff
from prunec.report.format import arrow, human, nbytes

_STATUS_MARK = {"changed": "~", "removed": "-", "added": "+", "unchanged": " "}
_STATUS_STYLE = {"changed": "yellow", "removed": "red", "added": "green", "unchanged": "dim"}


def shape_str(s) -> str:
    """[1, 64, 8, 8] -> '1x64x8x8'; None -> '?'."""
    if s is None:
        return "?"
    return "x".join("?" if v is None else str(v) for v in s) or "scalar"


def channel_summary(d: NodeDiff) -> str:
    """'64→32 out, 16→8 in', or '64→32 ch' when a non-weight op's in and out move together."""
    ch = d.channels
    if d.status in ("removed", "added") or not ch:
        return ""
    fmt = lambda p: f"{'-' if p[0] is None else p[0]}→{'-' if p[1] is None else p[1]}"  # noqa: E731
    if "in" in ch and "out" in ch and ch["in"] == ch["out"] and d.op_type not in CHANNEL_OPS:
        return f"{fmt(ch['out'])} ch"
    return ", ".join(f"{fmt(ch[k])} {k}" for k in ("out", "in") if k in ch)


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "…"


def change_summary(d: NodeDiff) -> str:
    """One line saying what happened to a node, for tables."""
    if d.status == "removed":
        return "removed"
    if d.status == "added":
        return "added"
    parts = []
    ch = channel_summary(d)
    if ch:
        parts.append(ch)
    for k, (vb, va) in d.attributes.items():
        parts.append(f"{k} {_short(vb) if vb is not None else '∅'}→{_short(va) if va is not None else '∅'}")
    if not ch:
        for s in d.outputs:
            if "shape" in s.changes:
                parts.append(f"out {shape_str(s.before.shape)}→{shape_str(s.after.shape)}")
            if "dtype" in s.changes:
                parts.append(f"out {s.before.dtype}→{s.after.dtype}")
        if not d.outputs:
            for s in d.inputs:
                if "shape" in s.changes:
                    parts.append(f"in {shape_str(s.before.shape)}→{shape_str(s.after.shape)}")
        for w in d.weights:
            if "shape" in w.changes:
                parts.append(f"weight {shape_str(w.before.shape)}→{shape_str(w.after.shape)}")
    for w in d.weights:
        if "dtype" in w.changes:
            parts.append(f"weight {w.before.dtype}→{w.after.dtype}")
        if "removed" in w.changes or "added" in w.changes:
            parts.append(f"input {w.slot} {w.changes[0]}")
    if "weight_values" in d.changes:
        parts.append("weights rewritten")
    return ", ".join(parts) or ", ".join(d.changes)


def _layer_name(d: NodeDiff) -> str:
    if d.renamed:
        return f"{d.before.name or '?'} → {d.after.name or '?'}"
    return d.name


def _total_rows(diff: ModelDiff) -> Iterable[tuple[str, str]]:
    t = diff.totals
    yield "nodes", arrow(*t["nodes"])
    yield "params", arrow(*t["params"])
    yield "MACs", arrow(*t["macs"])
    fb = t["file_bytes"]
    label = "file size" if diff.file_bytes_source == "file" else "serialized size"
    yield label, f"{nbytes(fb[0])} → {nbytes(fb[1])}" if fb[0] != fb[1] else f"{nbytes(fb[0])} (=)"
    for k in ("opset", "ir_version", "inputs", "outputs", "initializers", "sparse_initializers"):
        b, a = t[k]
        yield k.replace("_", " "), f"{b} → {a}" if b != a else f"{b} (=)"


def text_report(diff: ModelDiff, *, labels: tuple[str, str] = ("before", "after"),
                limit: int | None = None) -> Group:
    """Changed layers in graph order (one row each), then totals and warnings, for the terminal."""
    counts = diff.counts()
    m = diff.matched_by
    head = Text(f"{labels[0]} → {labels[1]}: {counts['changed']} changed, {counts['removed']} removed, "
                f"{counts['added']} added, {counts['unchanged']} unchanged "
                f"(matched by name {m['name']}, topology {m['topology']}, order {m['order']})")
    parts: list = [head]
    rows = diff.changed_nodes
    if rows:
        t = Table(title="changed layers", title_justify="left")
        t.add_column("")
        # Layer names are what reviewers search for: wrap them, never cut them short.
        t.add_column("layer", overflow="fold")
        t.add_column("op", overflow="fold")
        for col in ("change", "params", "MACs"):
            t.add_column(col)
        for d in rows[:limit] if limit else rows:
            t.add_row(Text(_STATUS_MARK[d.status], style=_STATUS_STYLE[d.status]),
                      Text(_layer_name(d), style=_STATUS_STYLE[d.status]), d.op_type,
                      change_summary(d), _pair_arrow(d.params), _pair_arrow(d.macs))
        if limit and len(rows) > limit:
            t.add_row("", f"… {len(rows) - limit} more", "", "", "", "")
        parts.append(t)
    inits = [i for i in diff.initializers if i.status != "unchanged"]
    if inits:
        it = Table(title=f"initializers ({len(inits)} changed)", title_justify="left")
        for col in ("", "name", "shape", "dtype", "storage", "sparsity", "changes"):
            it.add_column(col)
        for i in inits[:limit] if limit else inits:
            b, a = i.before, i.after
            pick = lambda f, fmt=str: _pair(getattr(b, f) if b else None,  # noqa: E731
                                            getattr(a, f) if a else None, fmt)
            it.add_row(Text(_STATUS_MARK[i.status], style=_STATUS_STYLE[i.status]), i.name,
                       pick("shape", shape_str), pick("dtype"), pick("storage"),
                       pick("sparsity", lambda v: f"{100 * v:.1f}%"), ", ".join(i.changes))
        parts.append(it)
    io = [x for x in diff.io if x.status != "unchanged"]
    if io:
        iot = Table(title="inputs / outputs", title_justify="left")
        for col in ("kind", "name", "change", "breaking"):
            iot.add_column(col)
        for x in io:
            iot.add_row(x.kind, x.name, ", ".join(x.changes),
                        Text("BREAKING", style="bold red") if x.breaking else "")
        parts.append(iot)
    tot = Table(title="totals", title_justify="left", show_header=False)
    tot.add_column()
    tot.add_column()
    for k, v in _total_rows(diff):
        tot.add_row(k, v)
    parts.append(tot)
    for w in diff.warnings:
        parts.append(Text(w, style="bold red" if w.startswith("BREAKING") else "yellow"))
    if diff.empty:
        parts.append(Text("no differences (node names aside)", style="green"))
    return Group(*parts)


def render_text(diff: ModelDiff, *, labels: tuple[str, str] = ("before", "after"), width: int = 120,
                limit: int | None = None) -> str:
    """The text report as a plain string (no colour codes)."""
    console = Console(width=width, record=True, file=_Null(), color_system=None)
    console.print(text_report(diff, labels=labels, limit=limit))
    return console.export_text()


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _pair(b, a, fmt=str) -> str:
    fb = "-" if b is None else fmt(b)
    fa = "-" if a is None else fmt(a)
    return fb if b == a else f"{fb} → {fa}"


def _pair_arrow(p) -> str:
    b, a = p
    if b is None or a is None:
        return f"{human(b) if b is not None else '-'} → {human(a) if a is not None else '-'}"
    return arrow(b, a) if b != a else human(b)


def render_json(diff: ModelDiff, *, only_changed: bool = False, labels: tuple[str, str] | None = None) -> str:
    """The JSON document (docs/diff-schema.md), pretty-printed; byte-identical for equal inputs."""
    doc = diff.to_dict(only_changed=only_changed)
    if labels:
        doc = {"schema_version": doc["schema_version"], "before": labels[0], "after": labels[1],
               **{k: v for k, v in doc.items() if k != "schema_version"}}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
table{border-collapse:collapse;margin:4px 0}th,td{padding:3px 8px;border-bottom:1px solid #e3e3e3;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#aaa}
.warn{background:#fdecea;border:1px solid #e57373;color:#b71c1c;padding:8px 12px;margin:8px 0;font-weight:600}
.note{background:#fff8e1;border:1px solid #ffcc80;padding:6px 12px;margin:8px 0}
.ok{color:#2e7d32;font-weight:600}
tr.changed td.st{color:#a66b00}tr.removed td.st{color:#c62828}tr.added td.st{color:#2e7d32}
tr.unchanged{color:#888}.hide-unchanged tr.unchanged{display:none}
.chart{display:grid;grid-template-columns:minmax(120px,max-content) 1fr 1fr;gap:2px 16px;align-items:center}
.chart .h{font-weight:600}.bars{display:flex;flex-direction:column;gap:1px}
.bar{height:7px;border-radius:2px;min-width:1px}.b0{background:#9e9e9e}.b1{background:#1e88e5}
.legend span{display:inline-block;width:12px;height:8px;margin:0 4px 0 12px}
.down{color:#2e7d32}.up{color:#c62828}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var b=t.tBodies[0],rows=Array.prototype.slice.call(b.rows),asc=th.dataset.dir!=='asc';
    t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir});th.dataset.dir=asc?'asc':'desc';
    rows.sort(function(r1,r2){var a=r1.cells[i].dataset.v,c=r2.cells[i].dataset.v,x,y;
      if(a!==undefined&&c!==undefined){x=parseFloat(a);y=parseFloat(c);}else{x=r1.cells[i].textContent;y=r2.cells[i].textContent;}
      return (x<y?-1:x>y?1:0)*(asc?1:-1);});
    rows.forEach(function(r){b.appendChild(r)});});});});
var cb=document.getElementById('show-unchanged');
if(cb){cb.addEventListener('change',function(){document.getElementById('layers').classList.toggle('hide-unchanged',!cb.checked)});}
"""


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _num_cell(v) -> str:
    if v is None:
        return '<td class="n" data-v="-1">-</td>'
    return f'<td class="n" data-v="{int(v)}" title="{int(v):,}">{_e(human(v))}</td>'


def _delta_cell(p) -> str:
    b, a = p
    d = (a or 0) - (b or 0)
    if d == 0:
        return '<td class="n" data-v="0"></td>'
    cls = "down" if d < 0 else "up"
    pct = f" ({100 * d / b:+.0f}%)" if b else ""
    return f'<td class="n {cls}" data-v="{d}">{_e(("+" if d > 0 else "-") + human(abs(d)))}{_e(pct)}</td>'


def _bars(p, top: int) -> str:
    out = []
    for k, v in enumerate(p):
        w = 0.0 if not v or not top else 100.0 * v / top
        title = f"{'before' if k == 0 else 'after'}: {'-' if v is None else f'{v:,}'}"
        # A layer absent on one side gets no bar at all; a tiny one still shows a sliver.
        style = f"width:{w:.2f}%" if v else "width:0;min-width:0"
        out.append(f'<div class="bar b{k}" style="{style}" title="{_e(title)}"></div>')
    return '<div class="bars">' + "".join(out) + "</div>"


def render_html(diff: ModelDiff, *, labels: tuple[str, str] = ("before", "after"),
                only_changed: bool = False) -> str:
    """One self-contained HTML page: summary, warnings, sortable layer table, bar chart, I/O, weights."""
    counts = diff.counts()
    m = diff.matched_by
    nodes = diff.changed_nodes if only_changed else diff.nodes
    o: list[str] = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width,initial-scale=1">',
                    f'<title>prunec diff: {_e(labels[0])} → {_e(labels[1])}</title>',
                    f'<style>{_CSS}</style></head><body>',
                    f'<h1>prunec diff</h1><div class="mono">{_e(labels[0])} → {_e(labels[1])}</div>']
    for w in diff.warnings:
        o.append(f'<div class="{"warn" if w.startswith("BREAKING") else "note"}">{_e(w)}</div>')
    if diff.empty:
        o.append('<p class="ok">No differences (node names aside).</p>')

    o.append('<h2>Summary</h2><table id="summary"><tbody>')
    for k, v in _total_rows(diff):
        o.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    o.append(f"<tr><th>layers</th><td>{counts['changed']} changed, {counts['removed']} removed, "
             f"{counts['added']} added, {counts['unchanged']} unchanged</td></tr>")
    o.append(f"<tr><th>matched by</th><td>name {m['name']}, topology {m['topology']}, "
             f"order {m['order']}</td></tr>")
    shapes_b, shapes_a = diff.input_shapes
    o.append(f"<tr><th>input shapes</th><td class=\"mono\">"
             f"{_e(', '.join(f'{k}={shape_str(v)}' for k, v in shapes_b.items()))}"
             + ("" if shapes_a == shapes_b else
                f" → {_e(', '.join(f'{k}={shape_str(v)}' for k, v in shapes_a.items()))}")
             + "</td></tr></tbody></table>")

    o.append(f'<h2>Layers ({len(nodes)})</h2>')
    if not only_changed:
        o.append('<label><input type="checkbox" id="show-unchanged" checked> show unchanged layers</label>')
    o.append('<table id="layers" class="sortable"><thead><tr>'
             + "".join(f"<th>{h}</th>" for h in ("#", "layer", "op", "status", "change", "params before",
                                                 "params after", "Δ params", "MACs before", "MACs after",
                                                 "Δ MACs"))
             + "</tr></thead><tbody>")
    for k, d in enumerate(nodes):
        o.append(f'<tr class="{d.status}"><td class="n" data-v="{k}">{k}</td>'
                 f'<td class="mono">{_e(_layer_name(d))}</td><td>{_e(d.op_type)}</td>'
                 f'<td class="st">{_e(d.status)}</td><td>{_e(change_summary(d)) if d.changes else ""}</td>'
                 + _num_cell(d.params[0]) + _num_cell(d.params[1]) + _delta_cell(d.params)
                 + _num_cell(d.macs[0]) + _num_cell(d.macs[1]) + _delta_cell(d.macs) + "</tr>")
    o.append("</tbody></table>")

    costly = [d for d in nodes if any(v for v in d.params + d.macs)]
    if costly:
        top_p = max((v or 0) for d in costly for v in d.params)
        top_m = max((v or 0) for d in costly for v in d.macs)
        o.append('<h2>Params and MACs per layer</h2><div class="legend">'
                 '<span class="b0"></span>before<span class="b1"></span>after</div>'
                 '<div class="chart" id="chart"><div class="h">layer</div><div class="h">params</div>'
                 '<div class="h">MACs</div>')
        for d in costly:
            o.append(f'<div class="mono">{_e(d.name)}</div>{_bars(d.params, top_p)}{_bars(d.macs, top_m)}')
        o.append("</div>")

    io = diff.io if not only_changed else [x for x in diff.io if x.status != "unchanged"]
    if io:
        o.append('<h2>Inputs and outputs</h2><table id="io"><thead><tr><th>kind</th><th>name</th>'
                 '<th>dtype</th><th>shape (inferred)</th><th>status</th></tr></thead><tbody>')
        for x in io:
            b, a = x.before, x.after
            o.append(f'<tr class="{"changed" if x.status != "unchanged" else "unchanged"}">'
                     f'<td>{x.kind}</td><td class="mono">{_e(_pair(b and b.name, a and a.name))}</td>'
                     f'<td>{_e(_pair(b and b.dtype, a and a.dtype))}</td>'
                     f'<td class="mono">{_e(_pair(x.inferred_shape[0], x.inferred_shape[1], shape_str))}</td>'
                     f'<td>{"<b class=up>BREAKING</b> " if x.breaking else ""}{_e(x.status)}</td></tr>')
        o.append("</tbody></table>")

    inits = diff.initializers if not only_changed else [i for i in diff.initializers if i.status != "unchanged"]
    changed_inits = [i for i in inits if i.status != "unchanged"]
    if changed_inits:
        o.append(f'<h2>Initializers ({len(changed_inits)} changed, removed or added)</h2>'
                 '<table id="initializers" class="sortable"><thead><tr><th>name</th><th>status</th>'
                 '<th>shape</th><th>dtype</th><th>storage</th><th>sparsity</th><th>changes</th></tr>'
                 '</thead><tbody>')
        for i in changed_inits:
            b, a = i.before, i.after
            g = lambda f, fmt=str: _pair(getattr(b, f) if b else None,  # noqa: E731
                                         getattr(a, f) if a else None, fmt)
            o.append(f'<tr class="{i.status}"><td class="mono">{_e(i.name)}</td><td class="st">{i.status}</td>'
                     f'<td class="mono">{_e(g("shape", shape_str))}</td><td>{_e(g("dtype"))}</td>'
                     f'<td>{_e(g("storage"))}</td><td>{_e(g("sparsity", lambda v: f"{100 * v:.1f}%"))}</td>'
                     f'<td>{_e(", ".join(i.changes))}</td></tr>')
        o.append("</tbody></table>")
    o.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(o) + "\n"
