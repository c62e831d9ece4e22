"""`prunec diff`: what changed between two models, layer by layer; and the per-pass diffs of `run`."""

from __future__ import annotations

from pathlib import Path

import click
import onnx

from prunec.cli.options import input_shape_options
from prunec.errors import BreakingChange, OptionError, OutputFileError
from prunec.graph.diff import ModelDiff, diff_models
from prunec.graph.io import load_model
from prunec.report.diff import render_html, render_json, text_report
from prunec.report.console import console
from prunec.report.files import check_output_file, write_text_atomic


def render_for(path: str | Path, diff: ModelDiff, labels: tuple[str, str], *, only_changed: bool = False) -> str:
    """JSON for a .json path, HTML otherwise."""
    if str(path).lower().endswith(".json"):
        return render_json(diff, only_changed=only_changed, labels=labels)
    return render_html(diff, labels=labels, only_changed=only_changed)


@click.command("diff")
@click.argument("before", type=click.Path(path_type=str))
@click.argument("after", type=click.Path(path_type=str))
@click.option("--json", "json_path", default=None, type=click.Path(path_type=str),
              help="Write the complete diff as JSON here (schema: docs/diff-schema.md).")
@click.option("--html", "html_path", default=None, type=click.Path(path_type=str),
              help="Write a self-contained HTML page here (sortable table, per-layer chart).")
@click.option("--only-changed", is_flag=True,
              help="Leave unchanged layers, initializers and I/O out of the JSON and HTML.")
@click.option("--limit", type=int, default=None, help="Show at most N layers in the terminal table.")
@click.option("--fail-on-breaking", is_flag=True,
              help="Exit 5 when a model input or output changed name, dtype or shape (for CI).")
@input_shape_options
def command(before: str, after: str, json_path: str | None, html_path: str | None, only_changed: bool,
            limit: int | None, fail_on_breaking: bool, input_shapes) -> None:
    """Compare BEFORE and AFTER: matched, removed and added layers, shapes, params, MACs, I/O."""
    for flag, p in (("--json", json_path), ("--html", html_path)):
        if p:
            check_output_file(p, flag)
    lb, la = load_model(before), load_model(after)
    diff = diff_models(lb.model, la.model, input_shapes=input_shapes,
                       file_sizes=(lb.path.stat().st_size, la.path.stat().st_size))
    labels = (str(lb.path), str(la.path))
    # Render everything before writing anything, so a failure leaves no partial set of files.
    docs = []
    if json_path:
        docs.append((json_path, render_json(diff, only_changed=only_changed, labels=labels), "--json"))
    if html_path:
        docs.append((html_path, render_html(diff, labels=labels, only_changed=only_changed), "--html"))
    for p, text, flag in docs:
        write_text_atomic(p, text, f"{flag} {p}")
    console().print(text_report(diff, labels=labels, limit=limit))
    for p, _, _ in docs:
        click.echo(f"wrote {p}")
    if fail_on_breaking and diff.breaking:
        broken = [f"{x.kind} {x.name!r}: {', '.join(x.changes) or x.status}" for x in diff.io if x.breaking]
        raise BreakingChange(f"{len(broken)} breaking interface change(s): " + "; ".join(broken[:3]))


class PassDiffs:
    """Collects `prunec run`'s per-pass diffs via PassManager's on_pass hook; writes them at the end."""

    def __init__(self, model: onnx.ModelProto, folder: str | None, input_shapes=None):
        self.folder = Path(folder) if folder else None
        if self.folder is not None and self.folder.exists() and not self.folder.is_dir():
            raise OptionError(f"--diff-each {folder}: exists and is not a folder")
        self.previous = model
        self.input_shapes = input_shapes
        self.pages: list[tuple[str, str]] = []

    def on_pass(self, index: int, record, model: onnx.ModelProto) -> None:
        """Diff the model before this pass against the one after it (rendered now, written later)."""
        if self.folder is not None:
            d = diff_models(self.previous, model, input_shapes=self.input_shapes)
            name = f"{index + 1:02d}-{record.name}.html"
            labels = (f"before {record.name} (pass {index + 1})", f"after {record.name}")
            self.pages.append((name, render_html(d, labels=labels)))
        self.previous = model

    def write(self) -> list[Path]:
        """Write the collected pages into the folder (created if missing)."""
        if self.folder is None:
            return []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputFileError(f"--diff-each {self.folder}: cannot create it: {exc.strerror or exc}") from None
        return [write_text_atomic(self.folder / name, page, f"--diff-each {self.folder / name}")
                for name, page in self.pages]


def write_run_diff(path: str, before: onnx.ModelProto, after: onnx.ModelProto, labels: tuple[str, str],
                   *, input_shapes=None, file_sizes=None) -> Path:
    """The whole run's diff (input vs final model) as HTML, or JSON for a .json path."""
    d = diff_models(before, after, input_shapes=input_shapes, file_sizes=file_sizes)
    return write_text_atomic(path, render_for(path, d, labels), f"--diff {path}")
