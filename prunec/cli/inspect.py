"""`prunec inspect`: inputs/outputs, op histogram, params and MACs per layer."""

from __future__ import annotations

import json

import click
import onnx
from rich.table import Table

from prunec.cli.options import input_shape_options, json_option, model_argument
from prunec.graph.costs import analyze_costs
from prunec.graph.io import default_opset, load_model
from prunec.report.console import console as make_console
from prunec.report.files import check_output_file, write_text_atomic
from prunec.report.format import human, nbytes
from prunec.runtime.inputs import chosen_sizes, graph_inputs, sized_dims_note


def _io(model):
    ins = [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.dims)} for s in graph_inputs(model)]
    outs = []
    for vi in model.graph.output:
        if not vi.type.HasField("tensor_type"):
            # A sequence or map (a classifier's per-class scores): its type, no shape.
            outs.append({"name": vi.name, "dtype": type_name(vi.type), "shape": None})
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else "unknown"
        outs.append({"name": vi.name, "dtype": dtype, "shape": dims})
    return ins, outs


def type_name(tp: onnx.TypeProto) -> str:
    """seq(map(int64, float32)) and the like, for types that are not plain tensors."""
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        et = tp.tensor_type.elem_type
        return str(onnx.helper.tensor_dtype_to_np_dtype(et)) if et else "tensor"
    if kind == "sequence_type":
        return f"seq({type_name(tp.sequence_type.elem_type)})"
    if kind == "map_type":
        key = onnx.helper.tensor_dtype_to_np_dtype(tp.map_type.key_type)
        return f"map({key}, {type_name(tp.map_type.value_type)})"
    if kind == "optional_type":
        return f"optional({type_name(tp.optional_type.elem_type)})"
    return kind or "unknown"


@click.command("inspect")
@model_argument
@input_shape_options
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size for a symbolic batch.")
@json_option("Write the model's inputs, outputs, ops and costs as JSON here.", stdout=True)
@click.option("--top", type=int, default=None, help="Show only the first N layers in the table.")
def command(model: str, input_shapes, batch: int, json_path: str | None, top: int | None) -> None:
    """Inputs/outputs, op histogram, params and MACs per layer and in total."""
    if json_path and json_path != "-":
        check_output_file(json_path, "--json")
    loaded = load_model(model)
    m = loaded.model
    costs = analyze_costs(m, input_shapes, batch=batch)
    ins, outs = _io(m)
    chosen = chosen_sizes(m, input_shapes)
    if json_path:
        doc = {"model": str(loaded.path), "opset": default_opset(m), "ir_version": m.ir_version,
               "producer": m.producer_name, "file_bytes": loaded.path.stat().st_size,
               "inputs": ins, "outputs": outs, **costs.to_dict(), "chosen_dims": chosen}
        text = json.dumps(doc, indent=2, default=list)
        if json_path == "-":
            click.echo(text)
            return
        write_text_atomic(json_path, text, f"--json {json_path}")
    console = make_console()
    console.print(f"[bold]{loaded.path}[/bold]  opset {default_opset(m)}, IR {m.ir_version}, "
                  f"producer {m.producer_name or '?'}, {nbytes(loaded.path.stat().st_size)}")
    if loaded.converted_from_opset:
        console.print(f"(converted in memory from opset {loaded.converted_from_opset})")
    t = Table(title="inputs / outputs", title_justify="left")
    for col in ("kind", "name", "dtype", "shape"):
        t.add_column(col)
    for kind, rows in (("input", ins), ("output", outs)):
        for r in rows:
            t.add_row(kind, r["name"], r["dtype"], "x".join(str(d) for d in r["shape"] or ()))
    console.print(t)
    h = Table(title="ops", title_justify="left")
    h.add_column("op")
    h.add_column("count", justify="right")
    for op, n in sorted(costs.op_histogram.items(), key=lambda kv: (-kv[1], kv[0])):
        h.add_row(op, str(n))
    console.print(h)
    from prunec.report.summary import costs_table

    console.print(costs_table(costs, limit=top))
    shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in costs.input_shapes.items())
    macs = human(costs.macs) if costs.macs_min == costs.macs else \
        f"{human(costs.macs_min)} to {human(costs.macs)} (depending on the path through If/Loop)"
    console.print(f"nodes {costs.nodes}, params {human(costs.params)}, MACs {macs} at {shapes}")
    if chosen:
        console.print(sized_dims_note(chosen))
    if costs.unknown_mac_layers:
        console.print(f"[yellow]MACs unknown for {len(costs.unknown_mac_layers)} layer(s) "
                      f"(shapes not inferable): {', '.join(costs.unknown_mac_layers[:5])}[/yellow]")
