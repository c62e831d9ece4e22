"""`reconstruct`: re-fit pruned layers to the original model's outputs by least squares.

After channels are removed, each reader layer (a Conv, Gemm or MatMul that lost input
channels) is re-solved, in graph order, so that on calibration data its output matches the
*original* model's output at the same tensor (the baseline the pass manager kept), given the
*pruned* model's own input to that layer, with every earlier layer already re-fitted: errors
are corrected where they arise instead of compounding.

The fit is ridge-regularized closed-form least squares: `[X 1] @ [W; b] ~ Y`, with X the
layer's input patches (im2col for a Conv, rows for a Gemm/MatMul) at `positions` output
positions per sample (drawn from a seed fixed per sample, so X rows from the pruned model and
Y rows from the original line up), solved per conv group. Only the normal equations
(X^T X, X^T Y) are accumulated over batches, never the rows. The targets of a slice of layers
come from one pass over the original model; the pruned model is run segment by segment
(`StagedRunner`), so over the whole pass each node runs about once.

Every fifth sample (`holdout`) is left out of the fit; the fitted weights must beat the layer's
current ones on those held-out samples or the layer keeps its weights, so reconstruction never
makes a layer's calibration error worse than no reconstruction. The weights written are the
ones checked (no refit on every sample: one factorization per group, and on the demo and
ResNet-50 no measurable difference).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from prunec.errors import OptionError
from prunec.graph.ir import NameGen
from prunec.graph.linear import LinearLayer, NotLinear, gram_upper, linear_layer, symmetric
from prunec.graph.staged import StagedRunner
from prunec.passes.base import Pass, PassContext, PassResult, Skip, check_regex, option, register
from prunec.runtime.activations import Request, SampledRows


@dataclass
class ReconstructOptions:
    samples: int | None = option(None, "calibration samples used (the first N; default: all of them, "
                                       "see --calib-samples)")
    positions: int = option(32, "output positions sampled per sample for a Conv or token MatMul: "
                                "rows of the fit (memory and time grow with samples x positions)")
    ridge: float = option(1e-3, "ridge penalty, relative to the mean diagonal of X^T X")
    layers: str | None = option(None, "regex of node names to re-fit (default: every layer that reads "
                                      "removed channels)")
    holdout: float = option(0.2, "fraction of samples held out of the fit: a fit worse than the "
                                 "current weights on them is discarded (0: no check)")
    max_features: int = option(8192, "skip layers with more unknowns per output channel "
                                     "(input channels per group x kernel taps)")
    batch: int = option(32, "samples per ONNX Runtime batch")
    memory: int = option(1024, "MiB of target rows gathered per pass over the original model")

    def validate(self) -> None:
        if (self.samples is not None and self.samples < 1) or min(self.positions, self.batch, self.memory) < 1:
            raise OptionError("reconstruct: samples, positions, batch and memory must be positive")
        if self.ridge < 0 or not 0 <= self.holdout < 1:
            raise OptionError("reconstruct: ridge must be >= 0 and holdout in [0, 1)")
        check_regex("reconstruct.layers", self.layers)


@dataclass
class Target:
    """A layer to re-fit and where its target lives in the original model."""

    layer: LinearLayer
    tensor: str  # name of the output tensor in both models
    axis: int  # channel axis of the output
    kept: np.ndarray | None  # kept output channels, as indices into the original's


@dataclass
class Normal:
    """Normal equations of one group's fit, [X 1] @ W ~ Y, accumulated over rows."""

    xtx: np.ndarray  # upper triangle only, until `system`
    xs: np.ndarray
    xty: np.ndarray
    ys: np.ndarray
    yy: float = 0.0
    n: int = 0

    @classmethod
    def zeros(cls, d: int, c: int) -> "Normal":
        return cls(np.zeros((d, d)), np.zeros(d), np.zeros((d, c)), np.zeros(c))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.xtx += gram_upper(x)
        self.xs += x.sum(axis=0, dtype=np.float64)
        self.xty += (x.T @ y).astype(np.float64)
        self.ys += y.sum(axis=0, dtype=np.float64)
        self.yy += float(np.sum(np.square(y, dtype=np.float64)))
        self.n += len(x)

    def __iadd__(self, other: "Normal") -> "Normal":
        self.xtx += other.xtx
        self.xs += other.xs
        self.xty += other.xty
        self.ys += other.ys
        self.yy += other.yy
        self.n += other.n
        return self

    def system(self) -> tuple[np.ndarray, np.ndarray]:
        """[X 1]^T [X 1] and [X 1]^T Y."""
        d = len(self.xs)
        a = np.empty((d + 1, d + 1))
        a[:d, :d], a[:d, d], a[d, :d], a[d, d] = symmetric(self.xtx), self.xs, self.xs, self.n
        return a, np.vstack([self.xty, self.ys[None]])

    def errors(self, *ws: np.ndarray) -> list[float]:
        """Sum of squared residuals of [X 1] @ w against Y over the accumulated rows, per w."""
        a, b = self.system()
        return [float(np.sum(w * (a @ w)) - 2 * np.sum(w * b) + self.yy) for w in ws]


def solve(eq: Normal, ridge: float) -> np.ndarray:
    """Ridge least squares [d + 1, c]; the bias row is not penalized."""
    a, b = eq.system()
    d = len(eq.xs)
    scale = float(np.mean(np.diag(a)[:d])) if d else 0.0
    lam = ridge * (scale if scale > 0 else 1.0)
    a[np.arange(d), np.arange(d)] += lam
    import scipy.linalg  # here: importing it with the pass registry costs every prunec run 20 MB

    try:
        factor = scipy.linalg.cho_factor(a, overwrite_a=True, check_finite=False)
        return scipy.linalg.cho_solve(factor, b, overwrite_b=True, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(a, b, rcond=None)[0]


@dataclass
class Outcome:
    """What the reconstruction did."""

    details: dict = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)


def _targets(graph: gs.Graph, ctx: PassContext, o: ReconstructOptions, baseline_names: set[str],
             skipped: list[Skip]) -> list[Target]:
    pattern = re.compile(o.layers) if o.layers else None
    out = []
    for node in list(graph.nodes):
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        reads_removed = node.inputs and node.inputs[0].name in ctx.kept
        if pattern is not None and not pattern.search(node.name or ""):
            continue
        if pattern is None and not reads_removed:
            continue
        try:
            layer = linear_layer(node, graph)
        except NotLinear as exc:
            if reads_removed or pattern is not None:
                skipped.append(Skip(node.name, f"not reconstructed: {exc}"))
            continue
        if layer.features + 1 > o.max_features:
            skipped.append(Skip(node.name, f"not reconstructed: {layer.features + 1} unknowns per output "
                                           f"> reconstruct.max-features {o.max_features}"))
            continue
        t = layer.out_tensor.name
        if t not in baseline_names:
            skipped.append(Skip(node.name, f"not reconstructed: the original model has no tensor {t!r}"))
            continue
        axes = ctx.kept.get(t, {})
        kept = next(iter(axes.values())) if len(axes) == 1 else None
        out.append(Target(layer, t, layer.in_axis, kept))
    return out


def reconstruct_layers(graph: gs.Graph, ctx: PassContext, o: ReconstructOptions, *,
                       user: str = "reconstruct") -> Outcome:
    """Re-fit the layers that read removed channels (or match `o.layers`), in graph order."""
    t_start = time.perf_counter()
    calib = ctx.require_calib(user)
    out = Outcome()
    baseline = ctx.baseline
    if baseline is None:
        out.details = {"layers": 0, "note": "no baseline model: nothing to reconstruct towards"}
        return out
    graph.toposort()
    names_in_base = {t for n in baseline.graph.node for t in n.output} | {i.name for i in baseline.graph.input}
    targets = _targets(graph, ctx, o, names_in_base, out.skipped)
    n = calib.n if o.samples is None else min(o.samples, calib.n)
    fits: list[dict] = []
    peak = 0
    runner = None
    if targets:
        store = ctx.store(user, targets=True)
        part = calib.take(n)
        runner = StagedRunner(graph, part.inputs, batch=o.batch, mask=part.mask)
        from prunec.runtime.activations import fingerprint

        fp = fingerprint(baseline)
        names = NameGen(graph)
        for chunk in _chunks(targets, n, o):
            reqs = {id(t): Request(t.tensor, SampledRows(t.axis, o.positions, ctx.seed)) for t in chunk}
            rows = store.collect(baseline, list(reqs.values()), fp=fp, samples=n, memo=False)
            for t in chunk:
                runner.advance(before=t.layer.node)
                peak = max(peak, runner.cached_bytes())
                fit = _fit_layer(t, runner, rows[reqs[id(t)]], o, ctx.seed, names)
                if "skip" in fit:
                    out.skipped.append(Skip(t.layer.name, f"not reconstructed: {fit['skip']}"))
                else:
                    fits.append(fit)
            del rows
    done = [f for f in fits if f["refit"]]
    out.details = {
        "layers": len(done), "kept_old": [f["layer"] for f in fits if not f["refit"]],
        "samples": n, "positions": o.positions, "ridge": o.ridge,
        "seconds": round(time.perf_counter() - t_start, 3),
        "cache_peak_mib": round(peak / 2**20, 1),
        "segments": runner.segments if runner else 0,
        "fits": fits,
    }
    return out


def _chunks(targets: list[Target], n: int, o: ReconstructOptions):
    """Consecutive targets whose target rows fit in `o.memory` MiB together."""
    budget = o.memory * 2**20
    cur, size = [], 0
    for t in targets:
        b = n * o.positions * t.layer.cout * 4
        if cur and size + b > budget:
            yield cur
            cur, size = [], 0
        cur.append(t)
        size += b
    if cur:
        yield cur


def _fit_layer(t: Target, runner: StagedRunner, rows, o: ReconstructOptions, seed: int, names) -> dict:
    """Accumulate the layer's normal equations over the calibration samples, solve per group,
    keep the old weights of any group whose fit is worse on the held-out samples."""
    t0 = time.perf_counter()
    layer = t.layer
    g = layer.groups
    mats = layer.matrices()  # [g, d, cout_g]
    d, cout_g = mats.shape[1], mats.shape[2]
    every = int(round(1 / o.holdout)) if o.holdout > 0 else 0
    fit_eq = [Normal.zeros(d, cout_g) for _ in range(g)]
    hold_eq = [Normal.zeros(d, cout_g) for _ in range(g)]
    for first, x in runner.batches(layer.in_tensor.name):
        if x.ndim < 2 or x.shape[layer.in_axis] != layer.cin:
            return {"skip": f"input {layer.in_tensor.name!r} has shape {list(x.shape)}, the layer reads "
                            f"{layer.cin} channels"}
        p = layer.patches(x, first, o.positions, seed, runner.mask_of(first, len(x)))
        y = rows.of_samples(first, len(x))
        if t.kept is not None:
            y = y[:, t.kept]
        if len(y) != len(p) or y.shape[1] != layer.cout:
            return {"skip": f"target rows ({list(y.shape)}) do not line up with the layer's "
                            f"({len(p)} rows, {layer.cout} outputs)"}
        sample = np.repeat(first + np.arange(len(x)), rows.counts[first:first + len(x)])
        held = (sample % every == every - 1) if every else np.zeros(len(p), dtype=bool)
        for grp in range(g):
            xg = p[:, grp * d:(grp + 1) * d]
            yg = y[:, grp * cout_g:(grp + 1) * cout_g]
            if held.any():
                hold_eq[grp].add(xg[held], yg[held])
            fit_eq[grp].add(xg[~held], yg[~held])
    rows = sum(e.n for e in fit_eq + hold_eq)
    bias = layer.bias()
    new_mats, new_bias = mats.copy(), bias.copy()
    before = after = total = 0.0
    refit = False
    for grp in range(g):
        old = np.vstack([mats[grp], bias[grp * cout_g:(grp + 1) * cout_g][None]])
        w = solve(fit_eq[grp], o.ridge)
        check = hold_eq[grp] if hold_eq[grp].n else fit_eq[grp]
        e_old, e_new = check.errors(old, w)
        total += check.yy
        before += e_old
        if e_new < e_old:
            new_mats[grp], new_bias[grp * cout_g:(grp + 1) * cout_g] = w[:-1], w[-1]
            refit = True
            after += e_new
        else:
            after += e_old
    if refit:
        layer.set_matrices(new_mats, names)
        layer.set_bias(new_bias, names)
    scale = total if total > 0 else 1.0
    return {"layer": layer.name, "refit": refit, "rows": int(rows),
            "unknowns": d + 1, "error_before": before / scale, "error_after": after / scale,
            "seconds": round(time.perf_counter() - t0, 3)}


@register
class Reconstruct(Pass):
    name = "reconstruct"
    summary = ("Re-fit layers that read removed channels to the original outputs by least squares "
               "on calibration data.")
    exact = False
    Options = ReconstructOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = reconstruct_layers(graph, ctx, self.options)
        return PassResult(changed=res.details.get("layers", 0) > 0, details=res.details, skipped=res.skipped)
