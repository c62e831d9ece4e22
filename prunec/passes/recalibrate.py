"""`recalibrate`: correct per-channel statistics drifted by pruning.

Removing channels shifts the mean and scale of every later pre-activation: BatchNorm statistics
estimated on the original no longer describe the pruned model's inputs, and where BN was folded
into a Conv/Gemm the folded bias is off the same way. Going through the layers in graph order
(each measured with every earlier correction applied, via `StagedRunner`), this pass makes each
kept channel's mean and variance *before the activation* equal to the original model's on the
calibration data, by a per-channel affine map `a * y + b`:

- where a BatchNormalization follows the layer, its statistics are re-estimated: running mean
  and variance are rewritten so that the BN maps the pruned model's inputs to the original's
  output distribution (gamma and beta take the change only where the statistics cannot);
- otherwise (BN folded, or none) the layer's weights and bias are scaled and shifted.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from prunec.errors import OptionError
from prunec.graph.fold import const_value
from prunec.graph.ir import NameGen
from prunec.graph.linear import LinearLayer, NotLinear, linear_layer
from prunec.graph.staged import StagedRunner
from prunec.passes.base import Pass, PassContext, PassResult, Skip, check_regex, option, register
from prunec.runtime.activations import ChannelMoments, Request


@dataclass
class RecalibrateOptions:
    samples: int | None = option(None, "calibration samples used (the first N; default: all of them, "
                                       "see --calib-samples)")
    layers: str | None = option(None, "regex of node names to correct (default: every weight layer from "
                                      "the first one that reads removed channels on)")
    variance: bool = option(True, "match each channel's variance as well as its mean")
    batch: int = option(32, "samples per ONNX Runtime batch")

    def validate(self) -> None:
        if (self.samples is not None and self.samples < 1) or self.batch < 1:
            raise OptionError("recalibrate: samples and batch must be positive")
        check_regex("recalibrate.layers", self.layers)


@dataclass
class Point:
    """Where one layer's pre-activation statistics are measured and corrected."""

    layer: LinearLayer
    bn: gs.Node | None  # a BatchNormalization right after the layer
    tensor: str
    kept: np.ndarray | None

    @property
    def nodes(self) -> list[gs.Node]:
        return [n for n in (self.layer.node, self.layer.bias_node, self.bn) if n is not None]


def _following_bn(layer: LinearLayer) -> gs.Node | None:
    y = layer.out_tensor
    if len(y.outputs) != 1 or y.outputs[0].op != "BatchNormalization":
        return None
    bn = y.outputs[0]
    if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0) or \
            any(const_value(t) is None for t in bn.inputs[1:5]):
        return None
    return bn


def _points(graph: gs.Graph, ctx: PassContext, o: RecalibrateOptions, base_names: set[str],
            skipped: list[Skip]) -> list[Point]:
    pattern = re.compile(o.layers) if o.layers else None
    started = False
    out = []
    for node in list(graph.nodes):
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        started = started or bool(node.inputs and node.inputs[0].name in ctx.kept)
        if (pattern is not None and not pattern.search(node.name or "")) or (pattern is None and not started):
            continue
        try:
            layer = linear_layer(node, graph)
        except NotLinear as exc:
            if node.op != "MatMul" or isinstance(node.inputs[1], gs.Constant):
                skipped.append(Skip(node.name, f"not recalibrated: {exc}"))
            continue
        bn = _following_bn(layer)
        t = bn.outputs[0].name if bn is not None else layer.out_tensor.name
        if t not in base_names:
            skipped.append(Skip(node.name, f"not recalibrated: the original model has no tensor {t!r}"))
            continue
        axes = ctx.kept.get(t, {})
        out.append(Point(layer, bn, t, next(iter(axes.values())) if len(axes) == 1 else None))
    return out


def affine_to_match(pruned, original, variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (a, b) with a * y + b having the original's mean (and variance)."""
    a = np.ones_like(pruned.mean)
    if variance:
        floor = 1e-12 * max(float(np.max(pruned.var)), 1e-30)
        ok = (pruned.var > floor) & (original.var > 0)
        a[ok] = np.sqrt(original.var[ok] / pruned.var[ok])
    return a, original.mean - a * pruned.mean


def recalibrate_layers(graph: gs.Graph, ctx: PassContext, o: RecalibrateOptions) -> tuple[dict, list[Skip]]:
    """Correct each point's per-channel mean and variance to the baseline's, in graph order."""
    t0 = time.perf_counter()
    calib = ctx.require_calib("recalibrate")
    skipped: list[Skip] = []
    baseline = ctx.baseline
    if baseline is None:
        return {"layers": 0, "note": "no baseline model: nothing to recalibrate towards"}, skipped
    graph.toposort()
    base_names = {t for n in baseline.graph.node for t in n.output}
    points = _points(graph, ctx, o, base_names, skipped)
    n = calib.n if o.samples is None else min(o.samples, calib.n)
    corrected, bns, shifts = [], [], []
    if points:
        store = ctx.store("recalibrate", targets=True)
        reqs = {p.tensor: Request(p.tensor, ChannelMoments(p.layer.in_axis)) for p in points}
        target = store.collect(baseline, list(reqs.values()), samples=n)
        part = calib.take(n)
        runner = StagedRunner(graph, part.inputs, batch=o.batch, mask=part.mask)
        names = NameGen(graph)
        for p in points:
            runner.advance(before=p.layer.node)
            acc = ChannelMoments(p.layer.in_axis).start()
            for first, vals in runner.peek(p.nodes, [p.tensor]):
                acc.add(vals[p.tensor], first, runner.mask_of(first, len(vals[p.tensor])))
            now, want = acc.result(), target[reqs[p.tensor]]
            if p.kept is not None:
                want = _take(want, p.kept)
            if len(want.mean) != len(now.mean):
                skipped.append(Skip(p.layer.name, f"not recalibrated: {len(now.mean)} channels here, "
                                                  f"{len(want.mean)} kept in the original"))
                continue
            a, b = affine_to_match(now, want, o.variance)
            if p.bn is not None:
                _correct_bn(p.bn, a, b, names)
                bns.append(p.bn.name)
            else:
                _correct_layer(p.layer, a, b, names)
            corrected.append(p.layer.name)
            shifts.append(float(np.max(np.abs(now.mean - want.mean) / np.sqrt(want.var + 1e-12))))
    details = {"layers": len(corrected), "batchnorms": len(bns), "samples": n,
               "max_mean_shift_sd": max(shifts, default=0.0), "variance": o.variance,
               "seconds": round(time.perf_counter() - t0, 3)}
    return details, skipped


def _take(stats, idx):
    from prunec.runtime.activations import ChannelStats

    return ChannelStats(stats.count, stats.mean[idx], stats.var[idx], stats.abs_mean[idx], stats.sample_shape)


def _correct_layer(layer: LinearLayer, a: np.ndarray, b: np.ndarray, names) -> None:
    mats = layer.matrices()
    g, _, cout_g = mats.shape
    mats = mats * a.reshape(g, 1, cout_g)
    layer.set_matrices(mats, names)
    layer.set_bias(a * layer.bias() + b, names)


def _correct_bn(bn: gs.Node, a: np.ndarray, b: np.ndarray, names) -> None:
    """a * BN(x) + b as new BN statistics (mean', var'), or as gamma/beta where a statistic
    would have to be negative or gamma is zero."""
    gamma, beta, mean, var = (const_value(t).astype(np.float64) for t in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    sd = np.sqrt(var + eps)
    sd_new = sd / np.where(a > 0, a, 1.0)
    var_new = np.square(sd_new) - eps
    ok = (a > 0) & (gamma != 0) & (var_new >= 0)
    # gamma (x - m') / sd' + beta = a * (gamma (x - m) / sd + beta) + b, solved for m'.
    mean_new = np.where(ok, mean + (sd_new / np.where(gamma != 0, gamma, 1.0)) * (beta * (1 - a) - b), mean)
    var_new = np.where(ok, var_new, var)
    gamma_new = np.where(ok, gamma, a * gamma)
    beta_new = np.where(ok, beta, a * beta + b)
    dtype = const_value(bn.inputs[1]).dtype
    for i, v in zip(range(1, 5), (gamma_new, beta_new, mean_new, var_new)):
        bn.inputs[i] = gs.Constant(names(f"{bn.name}_recal_{i}"), v.astype(dtype))


@register
class Recalibrate(Pass):
    name = "recalibrate"
    summary = ("Match each kept channel's pre-activation mean and variance to the original's on "
               "calibration data (BatchNorm statistics, or the producer's weights where BN was folded).")
    exact = False
    Options = RecalibrateOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        details, skipped = recalibrate_layers(graph, ctx, self.options)
        return PassResult(changed=details.get("layers", 0) > 0, details=details, skipped=skipped)
