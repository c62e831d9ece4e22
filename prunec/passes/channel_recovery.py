"""What the `channels` pass measures on calibration data, and the compensation it applies.

Everything the pass needs from the data before it removes anything (producer activations for
`importance=activation`, reader patch moments for `importance=reconstruction`, reader input
means for `compensate=mean`) is requested together, so the calibration samples go through the
model once (`gather_evidence`). The compensation itself is computed per reader by name
(`prunec.graph.compensation`), so it can be applied to any graph with those readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import InputShapeError
from prunec.graph.channels import ChannelAnalysis
from prunec.graph.compensation import Compensation, Reader, compensation_deltas, constant_classes, readers_of
from prunec.graph.int_sets import member
from prunec.graph.ir import export_graph
from prunec.graph.linear import PatchMoments, PatchStats
from prunec.passes.base import PassContext
from prunec.runtime.activations import ActivationStore, ChannelMoments, ChannelStats, Request

#: Output positions per calibration sample whose patches `importance=reconstruction` uses.
SELECTION_POSITIONS = 32
#: Accumulators of patch moments larger than this are collected in more than one pass.
PATCH_BYTES = 1 << 30


def compensate_mode(option: str, ctx: PassContext) -> str:
    """'mean', 'constant' (data-free: only provably constant channels) or 'none'. `auto` means
    mean with independent calibration data (--calib), else the data-free fold."""
    if option != "auto":
        return option
    return "mean" if ctx.calib is not None and ctx.calib.independent else "constant"


@dataclass
class Evidence:
    """Measurements of the unpruned graph on calibration data."""

    moments: dict[str, ChannelStats] = field(default_factory=dict)  # tensor -> per-channel stats
    patches: dict[str, PatchStats] = field(default_factory=dict)  # reader name -> patch moments
    readers: list[Reader] = field(default_factory=list)
    passes: int = 0  # passes over the data this took


def _producer_outputs(analysis: ChannelAnalysis) -> dict[str, tuple[str, int]]:
    """Producer node name -> (output tensor, channel axis) for weight-layer producers."""
    labels = analysis.labels
    out = {}
    for s in analysis.sites:
        if s.role == "producer" and s.node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            t = s.node.outputs[0].name
            lab = labels.get(t)
            if lab is not None and lab.single:
                out[s.node.name] = (t, lab.axes[0])
    return out


def gather_evidence(analysis: ChannelAnalysis, ctx: PassContext, *, importance: str, mean: bool,
                    user: str = "channels") -> Evidence | None:
    """Collect, in one pass over the calibration data, what `importance` and mean compensation
    need; None when neither needs data."""
    want_act, want_rec = importance == "activation", importance == "reconstruction"
    if not (want_act or want_rec or mean):
        return None
    what = [f"{user}.importance={importance}"] if want_act or want_rec else []
    what += [f"{user}.compensate=mean"] if mean else []
    for w in what:
        store = ctx.store(w)
    ev = Evidence()
    ev.readers, _ = readers_of(analysis)
    requests: list[Request] = []
    if want_act:
        for _, (t, axis) in sorted(_producer_outputs(analysis).items()):
            requests.append(Request(t, ChannelMoments(axis)))
    if mean:
        for r in ev.readers:
            requests.append(Request(r.layer.in_tensor.name, ChannelMoments(r.layer.in_axis)))
    patch_reqs = []
    if want_rec:
        patch_reqs = [Request(r.layer.in_tensor.name, PatchMoments.of(r.layer, SELECTION_POSITIONS, ctx.seed))
                      for r in ev.readers]
    model = export_graph(analysis.graph)
    from prunec.runtime.activations import fingerprint

    fp = fingerprint(model)
    before = store.passes
    # Patch moments are d^2 per reader: collect them in chunks that fit PATCH_BYTES, the
    # first chunk together with everything else.
    chunks, size, cur = [], 0, list(requests)
    for r in patch_reqs:
        v = r.reducer.view
        b = 8 * v.groups * (v.features ** 2)
        if cur and size + b > PATCH_BYTES and any(isinstance(x.reducer, PatchMoments) for x in cur):
            chunks.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += b
    chunks.append(cur)
    for chunk in chunks:
        if not chunk:
            continue
        res = store.collect(model, chunk, fp=fp)
        for r, v in res.items():
            if isinstance(r.reducer, PatchMoments):
                ev.patches[r.reducer.layer] = v
            else:
                ev.moments[r.tensor] = v
        if len(chunks) > 1:  # big accumulators: do not keep them in the memo
            store.forget(fp)
    ev.passes = store.passes - before
    return ev


def activation_scores(analysis: ChannelAnalysis, ev: Evidence) -> np.ndarray:
    """Mean |activation| of each producer output channel, summed per class."""
    n = len(analysis.roots)
    score = np.zeros(n, dtype=np.float64)
    starts = {name: (start, count) for start, count, name in _producer_ranges(analysis)}
    for node_name, (t, _) in _producer_outputs(analysis).items():
        st = ev.moments.get(t)
        if st is None or node_name not in starts:
            continue
        start, count = starts[node_name]
        if len(st.abs_mean) != count:
            continue
        atoms = np.arange(start, start + count)
        score += np.bincount(analysis.roots[atoms], weights=st.abs_mean, minlength=n)
    return score


def _producer_ranges(analysis: ChannelAnalysis):
    """(first atom, count, producer name) per producer, from the atom -> producer map."""
    for k, name in enumerate(analysis.producer_names):
        atoms = np.nonzero(analysis.atom_producer == k)[0]
        if len(atoms):
            yield int(atoms[0]), len(atoms), name


def compensation_for(analysis: ChannelAnalysis, removed: set[int], ctx: PassContext, mode: str,
                     ev: Evidence | None) -> Compensation | None:
    """Bias deltas for the removed classes: their means (mode 'mean'), or only the channels that
    are provably constant, measured on random inputs (mode 'constant'); None for 'none'."""
    if mode == "none" or not removed:
        return None
    readers, skipped = readers_of(analysis, removed)
    values: dict[str, np.ndarray] = {}
    spatial: dict[str, tuple[int, ...]] = {}
    if mode == "mean":
        for r in readers:
            st = ev.moments[r.layer.in_tensor.name]
            values[r.layer.in_tensor.name] = st.mean
            spatial[r.layer.in_tensor.name] = st.sample_shape[1:]
    else:
        try:
            values, spatial = _constant_values(analysis, readers, removed, ctx)
        except InputShapeError as exc:  # symbolic dims and no --input-shape: say so, go on
            skipped.append(("constant channels", f"need a runnable input shape ({exc})"))
    comp = compensation_deltas(readers, values, spatial)
    comp.skipped = skipped + [s for s in comp.skipped if mode == "mean"]
    return comp


def _constant_values(analysis: ChannelAnalysis, readers: list[Reader], removed: set[int], ctx: PassContext):
    """Reader input values of removed channels that hold one value everywhere, found without
    data: all-zero producer weights, then checked constant on random inputs (NaN elsewhere)."""
    from prunec.runtime.inputs import random_inputs, resolve_input_shapes

    const = constant_classes(analysis, removed)
    values: dict[str, np.ndarray] = {}
    spatial: dict[str, tuple[int, ...]] = {}
    if not const:
        return values, spatial
    const_arr = np.fromiter(const, dtype=np.int64)
    involved = []
    for r in readers:
        lab = analysis.labels[r.layer.in_tensor.name]
        if member(analysis.roots[lab.atoms[r.removed]], const_arr, len(analysis.roots)).any():
            involved.append(r)
    if not involved:
        return values, spatial
    model = export_graph(analysis.graph)
    feeds = random_inputs(model, resolve_input_shapes(model, ctx.input_shapes or None, batch=2), seed=ctx.seed)
    store = ActivationStore(feeds)
    res = store.collect(model, [Request(r.layer.in_tensor.name, ChannelMoments(r.layer.in_axis))
                                for r in involved])
    for r in involved:
        st = res[Request(r.layer.in_tensor.name, ChannelMoments(r.layer.in_axis))]
        lab = analysis.labels[r.layer.in_tensor.name]
        v = np.full(len(st.mean), np.nan)
        is_const = member(analysis.roots[lab.atoms], const_arr, len(analysis.roots))
        flat = st.var <= np.square(1e-6 * np.maximum(1.0, np.abs(st.mean)))
        ok = is_const & flat
        v[ok] = st.mean[ok]
        values[r.layer.in_tensor.name] = v
        spatial[r.layer.in_tensor.name] = st.sample_shape[1:]
    return values, spatial


def lost_channels(analysis: ChannelAnalysis, kept: dict[str, dict[int, np.ndarray]]) -> dict:
    """The entries of `kept` for tensors that lost at least one channel."""
    out = {}
    for name, axes in kept.items():
        lab = analysis.labels[name]
        lost = {ax: idx for k, (ax, idx) in enumerate(axes.items()) if len(idx) < lab.atoms.shape[k]}
        if lost:
            out[name] = lost
    return out


#: Calibration samples on which mean compensation must improve the pass's outputs to be kept.
CHECK_SAMPLES = 64


def output_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> float:
    """Squared error of the candidate's outputs over the reference's, summed over outputs and
    relative to the reference's energy, on `inputs`."""
    from prunec.runtime.session import make_session, run_session

    ref, got = run_session(make_session(reference), inputs), run_session(make_session(candidate), inputs)
    num = sum(float(np.sum(np.square(ref[k].astype(np.float64) - got[k]))) for k in ref)
    den = sum(float(np.sum(np.square(ref[k].astype(np.float64)))) for k in ref)
    return num / den if den > 0 else num


def check_compensation(before: onnx.ModelProto, removed: gs.Graph, deltas: dict[str, np.ndarray],
                       kept, calib) -> tuple[bool, float, float]:
    """Whether folding `deltas` into the pruned graph `removed` brings its outputs on a few
    calibration samples closer to those of `before` (the graph the pass started from); with the
    output errors without and with. Means are the best constants for each reader alone, but a
    heavy-tailed channel (a transformer neuron that fires hugely on one token) has a mean that
    no token has, and adding it everywhere can wreck what follows: measured end to end."""
    from prunec.graph.compensation import apply_bias_deltas

    inputs = calib.take(CHECK_SAMPLES).inputs
    without = export_graph(removed)
    trial = gs.import_onnx(without)
    apply_bias_deltas(trial, deltas, kept)
    with_ = export_graph(trial.cleanup().toposort())
    e0, e1 = output_error(before, without, inputs), output_error(before, with_, inputs)
    return e1 < e0, e0, e1

