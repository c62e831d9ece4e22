"""Constant folding that also reads static dims out of partially symbolic shapes.

Exporters compute channel counts at run time (`Shape -> Gather -> Div -> Unsqueeze -> Concat`)
even when they are static. Folding those makes shapes inferable for the cost counter and
shape vectors readable for the channel rules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.counters import count
from prunec.graph.fold_native import fold_natively
from prunec.graph.ir import bypass, cleanup
from prunec.graph.shapes import infer_shapes, tensor_shapes
from prunec.graph.subgraphs import fold_constants_safely
from prunec.runtime.inputs import graph_inputs, resolve_input_shapes
from prunec.runtime import session as _session  # noqa: F401  (quiets ONNX Runtime's logger)


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """Value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        if v is not None:
            return np.asarray(getattr(v, "values", v))
    return None


def graph_shapes(graph: gs.Graph, input_shapes: dict | None = None, *,
                 symbolic: bool = False) -> dict[str, tuple]:
    """Inferred shapes of every tensor of a gs.Graph: at concrete input shapes, or (with
    `symbolic`) at the declared ones, so symbolic dims stay symbolic."""
    if not symbolic:
        propagated = _propagated_shapes(graph, input_shapes)
        if propagated is not None:
            return propagated
    return _inferred_shapes(graph, input_shapes, symbolic=symbolic)


def _inferred_shapes(graph: gs.Graph, input_shapes: dict | None, *, symbolic: bool) -> dict[str, tuple]:
    """`graph_shapes` by ONNX's shape inference on an exported skeleton."""
    model = _export_skeleton(graph)
    if symbolic:
        del model.graph.value_info[:]
        return tensor_shapes(infer_shapes(model))
    return concrete_shapes(model, resolve_input_shapes(model, input_shapes))


def _propagated_shapes(graph: gs.Graph, input_shapes: dict | None) -> dict[str, tuple] | None:
    """`graph_shapes` at concrete input shapes, propagated in numpy (`shape_eval`) without an
    export; None unless every tensor of the graph gets its shape that way (a subgraph, a
    function or an op it does not cover: ONNX's inference then decides, as before)."""
    from prunec.graph.shape_eval import tensor_shapes_at

    if graph.functions or next(iter(graph.subgraphs()), None) is not None:
        return None
    declared = _declared_inputs(graph)
    try:
        base = resolve_input_shapes(declared, input_shapes)
    except Exception:  # noqa: BLE001  (the inferred path raises its own error for bad shapes)
        return None
    [shapes] = tensor_shapes_at(graph, base)
    if any(name and name not in shapes for name in graph.tensors()):
        return None
    return shapes


def _declared_inputs(graph: gs.Graph) -> onnx.ModelProto:
    """A model of the graph's declared inputs alone, as the skeleton export declares them."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    return onnx.helper.make_model(onnx.helper.make_graph(
        [], "inputs", [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs], []))


def _export_skeleton(graph: gs.Graph, outputs: list[gs.Tensor] | None = None) -> onnx.ModelProto:
    """Export a gs.Graph for shape inference, without copying float weight data: large float
    constants are swapped for typed graph inputs during the export, then put back (copying the
    whole graph instead cost most of constant folding's time). `outputs` replaces the graph's."""
    swapped = []
    for t in list(graph.tensors().values()):
        if isinstance(t, gs.Constant) and _is_float_dtype(t.dtype) and int(np.prod(t.shape)) > 64:
            v = gs.Variable(t.name, dtype=t.dtype, shape=list(t.shape))
            uses = [(node, i) for node in list(t.outputs) for i, x in enumerate(node.inputs) if x is t]
            for node, i in uses:
                node.inputs[i] = v
            swapped.append((t, v, uses))
    inputs, outs = list(graph.inputs), list(graph.outputs)
    try:
        graph.inputs = inputs + [v for _, v, _ in swapped]
        if outputs is not None:
            graph.outputs = outputs
        count("export_skeleton")
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        graph.inputs, graph.outputs = inputs, outs
        for t, _, uses in swapped:
            for node, i in uses:
                node.inputs[i] = t
    model.ir_version = min(model.ir_version, 10)
    return model


def static_shape_reads(graph: gs.Graph, input_shapes: dict | None = None) -> dict[str, tuple] | None:
    """Shapes of the tensors that Shape/Size nodes read, with None for every dim that depends on
    a symbolic input dim; None when they cannot be measured.

    Exporters compute shapes at run time (`Shape -> Gather -> Div -> Concat -> Reshape`), and
    symbolic inference stops at every such Reshape, so folding them took a round of inference
    and folding per block. Here ONNX Runtime runs the graph twice instead (weights as zero-filled
    inputs, so they are not copied): at the resolved input shapes and with every symbolic input
    dim doubled. A dim that is the same in both runs is taken as static, so one round of folding
    resolves every block at once. Where every such shape follows from the ops `shape_eval`
    covers, it computes them at the same two sets of input shapes instead of running."""
    readers = [n for n in graph.nodes if n.op in ("Shape", "Size") and n.inputs and n.inputs[0].name]
    targets = list({id(n.inputs[0]): n.inputs[0] for n in readers if not isinstance(n.inputs[0], gs.Constant)}.values())
    if not targets:
        return {}
    propagated = _propagated_shape_reads(graph, targets, input_shapes)
    if propagated is not None:
        return propagated
    return _measured_shape_reads(graph, targets, input_shapes)


def _measured_shape_reads(graph: gs.Graph, targets: list[gs.Tensor],
                          input_shapes: dict | None) -> dict[str, tuple] | None:
    """`static_shape_reads` by two ONNX Runtime runs."""
    import onnxruntime as ort

    untyped = [t for t in targets if t.dtype is None]
    for t in untyped:
        t.dtype = np.float32  # exporting needs a type; ORT reports the tensor's real one anyway
    try:
        model = _export_skeleton(graph, targets)
    finally:
        for t in untyped:
            t.dtype = None
    _drop_output_types(model)
    real = [t.name for t in graph.inputs]
    specs = {s.name: s for s in graph_inputs(model)}
    try:
        base = resolve_input_shapes(onnx.helper.make_model(onnx.helper.make_graph(
            [], "inputs", [vi for vi in model.graph.input if vi.name in real], [])), input_shapes)
        doubled = {name: tuple(v if isinstance(d, int) else 2 * v for v, d in zip(dims, specs[name].dims))
                   for name, dims in base.items()}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # one run: not worth it
        so.log_severity_level = 4  # a failed run is expected (then inference decides), not news
        if sum(int(np.prod(s.dims)) for s in specs.values() if s.name not in real) < 64 << 20:
            so.intra_op_num_threads = 1  # a small model's runs: threads would cost more than they save
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [t.name for t in targets]
        got = []
        for shapes in (base, doubled):
            feeds = random_inputs_for(specs, shapes)
            for name, s in specs.items():
                if name not in shapes:
                    feeds[name] = np.zeros([int(d) for d in s.dims], dtype=s.dtype)
            got.append([np.shape(v) for v in sess.run(names, feeds)])
    except Exception:  # noqa: BLE001  (an input ORT cannot take at doubled dims, an op it lacks: infer)
        return None
    return {name: tuple(x if x == y else None for x, y in zip(a, b)) if len(a) == len(b) else (None,) * len(a)
            for name, a, b in zip(names, *got)}


def _propagated_shape_reads(graph: gs.Graph, targets: list[gs.Tensor],
                            input_shapes: dict | None) -> dict[str, tuple] | None:
    """What `static_shape_reads` measures, computed in numpy (`shape_eval`) at the same two sets
    of input shapes, without an export or a session; None where any target's shape does not
    follow from the ops it covers (then ONNX Runtime measures, as before)."""
    from prunec.graph.shape_eval import tensor_shapes_at

    try:
        declared = _declared_inputs(graph)
        base = resolve_input_shapes(declared, input_shapes)
    except Exception:  # noqa: BLE001  (shapes it cannot resolve: the measured path decides, as before)
        return None
    specs = {s.name: s for s in graph_inputs(declared)}
    doubled = {name: tuple(v if isinstance(d, int) else 2 * v for v, d in zip(dims, specs[name].dims))
               for name, dims in base.items()}
    got = tensor_shapes_at(graph, base, doubled)
    if any(t.name not in known for t in targets for known in got):
        return None
    return {t.name: tuple(x if x == y else None for x, y in zip(got[0][t.name], got[1][t.name]))
            if len(got[0][t.name]) == len(got[1][t.name]) else (None,) * len(got[0][t.name]) for t in targets}


def _drop_output_types(model: onnx.ModelProto) -> None:
    """Leave the graph outputs untyped, so a guessed type cannot contradict the real one."""
    for vi in model.graph.output:
        vi.ClearField("type")


def random_inputs_for(specs: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Deterministic random feeds for the inputs named in `shapes` (see runtime.inputs.random_inputs)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in shapes.items():
        dtype = specs[name].dtype
        if dtype.kind == "f":
            out[name] = (rng.random(shape, dtype=np.float32) * 2 - 1).astype(dtype, copy=False)
        elif dtype.kind == "b":
            out[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            out[name] = rng.integers(0, 2, size=shape).astype(dtype)
    return out


def _is_float_dtype(dtype) -> bool:
    """Floating point, including types numpy does not name (graphsurgeon keeps bfloat16 as the
    ONNX enum)."""
    if isinstance(dtype, int):
        return dtype in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT,
                         onnx.TensorProto.DOUBLE)
    try:
        return np.dtype(dtype).kind == "f" or "float" in np.dtype(dtype).name
    except TypeError:
        return False


def fold_constants(graph: gs.Graph, input_shapes: dict | None = None, *, max_rounds: int = 32) -> gs.Graph:
    """Fold constant subgraphs, including shape arithmetic on statically known dims.

    The tensors that Shape nodes read get their static dims first (`static_shape_reads`, measured
    in one go; symbolic inference, a round per block, when that fails), so the
    `Shape -> Gather -> Div -> Unsqueeze` chains exporters emit for chunk/view fold into
    constants the channel rules can read. Folding can reveal more static shapes, so with
    inferred shapes it repeats until nothing changes.
    """
    count("fold")
    ins = {id(t) for t in graph.inputs}
    _share_identity_constants(graph)
    for _ in range(max_rounds):
        before = len(graph.nodes)
        shapes = static_shape_reads(graph, input_shapes)
        measured = shapes is not None
        if not measured:
            shapes = graph_shapes(graph, input_shapes, symbolic=True)
        for name, t in graph.tensors().items():
            if isinstance(t, gs.Variable) and t.shape is None and name in shapes and id(t) not in ins:
                t.shape = [d if isinstance(d, int) else None for d in shapes[name]]
        _fold_static_shape_reads(graph)
        if _may_fold(graph):
            # numpy where it reproduces graphsurgeon's folding exactly (no graph copy, no session)
            if not fold_natively(graph):
                fold_constants_safely(graph, error_ok=True, fold_shapes=False)
            cleanup(graph)
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and id(t) not in ins and t not in graph.outputs:
                t.shape = None  # partial shapes were only for folding; export re-infers them
        if measured or len(graph.nodes) == before:
            break
    return graph


def _may_fold(graph: gs.Graph) -> bool:
    """Whether graphsurgeon's folding could change anything: a node computing from constants
    alone, a shape read or a subgraph. Most exported CNNs have none, and folding them still
    copied the whole graph."""
    for node in graph.nodes:
        if node.op in ("Shape", "Size", "Constant") or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return True
        if all(isinstance(t, gs.Constant) or (len(t.inputs) == 1 and t.inputs[0].op == "Constant")
               for t in node.inputs if t.name):
            return True
    return False


def _share_identity_constants(graph: gs.Graph) -> None:
    """Point readers of `Identity(weight)` at the weight itself. Exporters write shared weights
    that way (torch: identical initializers deduplicated behind Identity); folding the Identity
    instead would give every reader its own copy and double the stored weights.

    Only matrices and kernels (2-D and up) stay shared: a shared constant couples the channels
    of all its readers, and per-channel vectors (BN parameters, biases) are often identical by
    coincidence, not by design; those get their own copies when folded."""
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Identity" or not isinstance(node.inputs[0], gs.Constant) \
                or len(node.inputs[0].shape) < 2 or id(node.outputs[0]) in outputs:
            continue
        bypass(node)
    cleanup(graph)


_FLOAT_KINDS = "f"


def materialize_weights(graph: gs.Graph) -> dict[str, int]:
    """Make every constant a plain initializer, once, before any pass runs: the outputs of
    Constant nodes (PP-OCR's exports hold every weight that way), Identity of a constant, and a
    float-to-float Cast of a constant (the cast done here, exactly as the runtime would). Without
    this, passes that look for initializers find none and silently change nothing.

    Identity of a matrix or kernel is bypassed so its readers share it (as in `fold_constants`);
    of a vector, it becomes a copy, so coincidentally equal per-channel vectors do not couple
    unrelated layers. Graph outputs are left as they are. Returns counts per kind."""
    counts = {"constant_nodes": 0, "identity": 0, "cast": 0}
    outputs = {id(t) for t in graph.outputs}
    for _ in range(8):  # Constant -> Identity -> Cast chains resolve in a few sweeps
        changed = False
        for node in list(graph.nodes):
            if len(node.outputs) != 1 or id(node.outputs[0]) in outputs or not node.outputs[0].name:
                continue
            out = node.outputs[0]
            if node.op == "Constant" and not node.inputs:
                value = const_value(out)
                kind = "constant_nodes"
            elif node.op in ("Identity", "Cast") and node.inputs and isinstance(node.inputs[0], gs.Constant):
                src = node.inputs[0]
                if node.op == "Identity" and len(src.shape) >= 2:
                    bypass(node)
                    counts["identity"] += 1
                    changed = True
                    continue
                value = np.asarray(src.values)
                kind = "identity"
                if node.op == "Cast":
                    to = node.attrs.get("to")
                    target = onnx.helper.tensor_dtype_to_np_dtype(to) if to is not None else None
                    if target is None or value.dtype.kind not in _FLOAT_KINDS or \
                            np.dtype(target).kind not in _FLOAT_KINDS:
                        continue
                    value = value.astype(target)
                    kind = "cast"
            else:
                continue
            if value is None or value.dtype == object:
                continue
            const = gs.Constant(out.name, np.asarray(value))
            for reader in list(out.outputs):
                for i, t in enumerate(reader.inputs):
                    if t is out:
                        reader.inputs[i] = const
            node.inputs.clear()
            node.outputs.clear()
            counts[kind] += 1
            changed = True
        if not changed:
            break
    graph.cleanup(remove_unused_graph_inputs=False)
    return counts


def _known_dims(t: gs.Tensor) -> list | None:
    """Dims of `t` as far as known: its inferred shape, or for a Reshape output whose inferred
    shape is missing, the positive constant entries of its target shape. (ONNX's inference
    gives nothing for `Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), 32, 8, 8))` with a
    symbolic batch, which torch's older exports write for every channel shuffle.)"""
    known = list(t.shape) if t.shape is not None else None
    if known is not None and all(isinstance(d, int) and d > 0 for d in known[1:]):
        return known
    if len(t.inputs) != 1 or t.inputs[0].op != "Reshape":
        return known
    target = t.inputs[0].inputs[1]
    parts = [target] if const_value(target) is not None else \
        (list(target.inputs[0].inputs) if len(target.inputs) == 1 and target.inputs[0].op == "Concat" else None)
    if parts is None:
        return known
    dims: list = []
    for p in parts:
        v = const_value(p)
        if v is not None:
            dims += [int(d) if d > 0 else None for d in np.ravel(v)]
        elif p.shape is not None and len(p.shape) == 1 and isinstance(p.shape[0], int):
            dims += [None] * p.shape[0]
        else:
            return known
    if known is not None and len(known) == len(dims):
        dims = [k if isinstance(k, int) and k > 0 else d for k, d in zip(known, dims)]
    return dims


def _fold_static_shape_reads(graph: gs.Graph) -> None:
    """Replace `Gather(Shape(x), i)` by a constant where dim i of x is static, even when
    other dims (the batch) are symbolic; graphsurgeon folds only fully static shapes."""
    for node in list(graph.nodes):
        if node.op != "Shape":
            continue
        dims = _known_dims(node.inputs[0])
        if dims is None:
            continue
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        dims = dims[slice(start, end)]
        out = node.outputs[0]
        if dims and all(isinstance(d, int) and d > 0 for d in dims) and out not in graph.outputs:
            # A fully static read (any start/end). graphsurgeon's own shape folding is off: it
            # ignores Shape's start/end (opset 15, which the dynamo exporter always writes) and
            # would fold Shape(x, start=1, end=2) to the whole shape.
            const = gs.Constant(out.name + "_static", np.asarray(dims, dtype=np.int64))
            for consumer in list(out.outputs):
                for k, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[k] = const
            node.outputs.clear()
            continue
        for g in list(node.outputs[0].outputs):
            if g.op != "Gather" or g.attrs.get("axis", 0) != 0:
                continue
            idx = const_value(g.inputs[1])
            if idx is None:
                continue
            picked = [dims[int(i)] for i in np.ravel(idx)]
            if not all(isinstance(d, int) and d > 0 for d in picked):
                continue
            value = np.asarray(picked, dtype=np.int64).reshape(np.shape(idx))
            const = gs.Constant(g.outputs[0].name + "_static", value)
            for consumer in list(g.outputs[0].outputs):
                for k, t in enumerate(consumer.inputs):
                    if t is g.outputs[0]:
                        consumer.inputs[k] = const
            if g.outputs[0] in graph.outputs:
                continue
            g.outputs.clear()




def concrete_shapes(model: onnx.ModelProto, shapes_in: dict[str, tuple[int, ...]], *,
                    base_dir: str | Path | None = None) -> dict[str, tuple]:
    """Shapes of every tensor at concrete input shapes. When ONNX's inference cannot follow
    run-time shape arithmetic, a folded copy of the model is inferred instead. `base_dir`: where
    the external data of a model whose weights are not in the proto (a skeleton) lies, for the
    shapes only a run can give."""
    from prunec.graph.shapes import skeleton, with_fixed_inputs

    shapes = tensor_shapes(infer_shapes(model, shapes_in))
    if not _has_unknown(model, shapes):
        return shapes
    count("import")
    # Weights as typed inputs: folding needs their shapes, never their values (and a run's store
    # keeps them outside the proto).
    g = gs.import_onnx(with_fixed_inputs(skeleton(model), shapes_in))
    fold_constants(g)
    count("export")
    folded = gs.export_onnx(g, do_type_check=False)
    folded.ir_version = min(model.ir_version or 8, 10)
    more = tensor_shapes(infer_shapes(folded))
    for k, v in more.items():
        old = shapes.get(k)
        if old is None or not all(isinstance(d, int) for d in old):
            shapes[k] = v
    if _has_unknown(model, shapes) and any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        shapes.update(_runtime_shapes(model, shapes_in, shapes, base_dir))
    return shapes


def _runtime_shapes(model: onnx.ModelProto, shapes_in: dict, shapes: dict,
                    base_dir: str | Path | None = None) -> dict[str, tuple]:
    """Shapes ONNX's inference cannot give (outputs of com.microsoft ops such as QLinearAdd, and
    everything after them), measured by running the model once on zeros at the input shapes."""
    from prunec.runtime.inputs import graph_inputs
    from prunec.runtime.session import make_session

    want = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output
            if o and not all(isinstance(d, int) for d in (shapes.get(o) or (None,)))]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if base_dir is not None:  # a skeleton: ONNX Runtime runs on the weights, read for this run only
        onnx.external_data_helper.load_external_data_for_model(m, str(base_dir))
    listed = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(want) if t not in listed)
    try:
        sess = make_session(m, threads=1)
        feeds = {s.name: np.zeros(shapes_in[s.name], s.dtype) for s in graph_inputs(model)}
        values = sess.run(want, feeds)
    except _session.ORT_ERRORS:  # a model that does not run on zeros keeps its unknown shapes
        return {}
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(want, values)}


def _has_unknown(model: onnx.ModelProto, shapes: dict[str, tuple]) -> bool:
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        for o in n.output:
            s = shapes.get(o)
            if o and (s is None or not all(isinstance(d, int) for d in s)):
                return True
    return False
