"""The accuracy gate: original vs candidate on every slice, against thresholds, as a GateReport.

The metric is chosen from the data and the output: top-1 accuracy when there are labels for a
classifier, top-1 agreement with the original (fidelity) without labels, and output cosine
similarity for anything that is not a classifier. All values are in percent; drops in points.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from prunec.errors import DataError, GateFailure, OptionError
from prunec.eval.corruptions import corrupt, image_layout
from prunec.eval.data import EvalData
from prunec.eval.metrics import (MIN_SAMPLES, Estimate, agreement, cosine, estimate, is_classifier,
                                 relative_error, topk_correct)
from prunec.eval.slices import CLEAN, Slice, build_slices
from prunec.runtime.inputs import graph_inputs
from prunec.runtime.runtimes import Session, open_session
from prunec.runtime.target import Target, as_target


@dataclass
class GateThresholds:
    """What the candidate must keep. Drops in points (percent); agreement as a fraction (0.97)."""

    max_drop: float | None = 1.0
    #: Per-slice overrides keyed by slice name, slice kind (class, rare, user, length,
    #: corruption) or a glob over names (`gaussian_noise@*`); the most specific wins.
    slice_max_drop: dict[str, float] = field(default_factory=dict)
    min_agreement: float | None = None
    min_samples: int = MIN_SAMPLES
    fail_on_small: bool = False

    def max_drop_for(self, s: Slice) -> float | None:
        """The drop allowed on slice `s`: by exact name, then a matching glob, then its kind, then the default."""
        if s.name in self.slice_max_drop:
            return self.slice_max_drop[s.name]
        for key, value in self.slice_max_drop.items():
            if any(ch in key for ch in "*?[") and fnmatch.fnmatchcase(s.name, key):
                return value
        return self.slice_max_drop.get(s.kind, self.max_drop)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"max_drop": self.max_drop, "slice_max_drop": dict(self.slice_max_drop),
                "min_agreement": self.min_agreement, "min_samples": self.min_samples,
                "fail_on_small": self.fail_on_small}


@dataclass
class SliceResult:
    """One slice: metric for both models, the drop (with a paired interval), agreement, verdict."""

    name: str
    kind: str
    variant: str
    n: int
    original: Estimate
    candidate: Estimate
    drop: Estimate
    agreement: Estimate | None
    rel_error: Estimate | None
    max_drop: float | None
    min_agreement: float | None
    #: pass | fail | too few (thresholds met on fewer than min_samples samples: not proof)
    status: str
    reasons: list[str] = field(default_factory=list)
    topk: tuple[Estimate, Estimate] | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = {"name": self.name, "kind": self.kind, "variant": self.variant, "n": self.n,
             "original": self.original.to_dict(), "candidate": self.candidate.to_dict(),
             "drop": self.drop.to_dict(), "max_drop": self.max_drop,
             "agreement": self.agreement.to_dict() if self.agreement else None,
             "min_agreement": self.min_agreement,
             "rel_error": self.rel_error.to_dict() if self.rel_error else None,
             "status": self.status, "reasons": self.reasons}
        if self.topk:
            d["topk"] = {"original": self.topk[0].to_dict(), "candidate": self.topk[1].to_dict()}
        return d


@dataclass
class GateReport:
    """Every slice's result and the overall verdict; render with prunec.report.gate."""

    metric: str  # top1 | agreement | cosine
    output: str
    n_samples: int
    thresholds: GateThresholds
    slices: list[SliceResult]
    top_k: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[SliceResult]:
        """Slices that broke a threshold (or were too small under fail_on_small)."""
        return [s for s in self.slices if s.status == "fail"]

    @property
    def too_few(self) -> list[SliceResult]:
        """Slices that met their thresholds on too few samples to be evidence."""
        return [s for s in self.slices if s.status == "too few"]

    @property
    def passed(self) -> bool:
        """True when no slice failed."""
        return not self.failed

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"passed": self.passed, "metric": self.metric, "output": self.output,
                "n_samples": self.n_samples, "top_k": self.top_k,
                "thresholds": self.thresholds.to_dict(), "notes": self.notes,
                "failed": [s.name for s in self.failed], "too_few": [s.name for s in self.too_few],
                "slices": [s.to_dict() for s in self.slices]}

    def raise_if_failed(self) -> None:
        """Raise GateFailure (exit 3) naming the failed slices."""
        if self.failed:
            names = ", ".join(s.name for s in self.failed[:5]) + (" ..." if len(self.failed) > 5 else "")
            raise GateFailure(f"accuracy gate failed on {len(self.failed)} slice(s): {names}")


def predict(model: onnx.ModelProto | ort.InferenceSession | Session, inputs: dict[str, np.ndarray], *,
            output: str | None = None, batch_size: int = 64, provider: str = "cpu",
            threads: int | None = None, target: Target | None = None) -> np.ndarray:
    """Run a model (or an open session) over all samples in batches; one output, concatenated.

    A model is opened on `target` (default: ONNX Runtime on `provider`)."""
    if isinstance(model, ort.InferenceSession):
        from prunec.runtime.ort_runtime import OrtSession

        model = OrtSession(model)
    sess = model if isinstance(model, Session) else \
        open_session(model, as_target(target, provider=provider, threads=threads))
    outputs = sess.output_names
    name = output or outputs[0]
    if name not in outputs:
        raise OptionError(f"--eval-output {name!r} is not an output of the model ({', '.join(outputs)})")
    if isinstance(model, onnx.ModelProto):
        fixed = {s.dims[0] for s in graph_inputs(model) if s.dims and isinstance(s.dims[0], int)}
        if len(fixed) > 1:
            raise DataError(f"inputs declare different fixed batch sizes {sorted(fixed)}")
        fixed_batch = fixed.pop() if fixed else None
    else:
        fixed_batch = sess.input_batch()
    pad = fixed_batch is not None
    step = fixed_batch if pad else batch_size
    n = len(next(iter(inputs.values())))
    outs = []
    for start in range(0, n, step):
        feed = {k: v[start:start + step] for k, v in inputs.items()}
        got = len(next(iter(feed.values())))
        if pad and got < step:
            # A fixed batch dim: pad with the last sample and drop the padding afterwards.
            feed = {k: np.concatenate([v, np.repeat(v[-1:], step - got, axis=0)]) for k, v in feed.items()}
        outs.append(sess.run(feed)[name][:got])
    return np.concatenate(outs)


def corrupted_variants(data: EvalData, model: onnx.ModelProto, corruptions: list[str],
                       severities: list[int], *, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs for each `corruption@severity`: image inputs corrupted, other inputs shared."""
    if not corruptions:
        return {}
    images = {s.name: image_layout(s.dims) for s in graph_inputs(model)
              if s.dtype.kind == "f" and image_layout(s.dims)}
    if not images:
        raise DataError("corruptions need a 4-D float image input (NCHW or NHWC); this model has none "
                        "(use --corruptions none)")
    out = {}
    for c in corruptions:
        for sev in severities:
            feeds = dict(data.inputs)
            for name, layout in images.items():
                x = data.inputs[name]
                feeds[name] = corrupt(x, c, sev, seed=seed, layout=layout,
                                      value_range=(float(x.min()), float(x.max())))
            out[f"{c}@{sev}"] = feeds
    return out


class Evaluator:
    """The original model's outputs on clean and corrupted data, computed once, to compare candidates with."""

    def __init__(self, original: onnx.ModelProto, data: EvalData, *, corruptions: list[str] = (),
                 severities: list[int] = (3,), output: str | None = None, top_k: int = 1,
                 batch_size: int = 64, provider: str = "cpu", threads: int | None = None,
                 seed: int = 0, rare_quantile: float = 0.25, n_boot: int = 1000,
                 target: Target | None = None):
        self.data = data
        self.specs = graph_inputs(original)
        self.target = as_target(target, provider=provider, threads=threads)
        self.run_kw = dict(output=output, batch_size=batch_size)
        self.top_k = top_k
        self.seed = seed
        self.n_boot = n_boot
        self.variants = {CLEAN: data.inputs, **corrupted_variants(data, original, list(corruptions),
                                                                  list(severities), seed=seed)}
        sess = open_session(original, self.target)
        self.output = output or sess.output_names[0]
        self.reference = {v: predict(sess, x, **self.run_kw) for v, x in self.variants.items()}
        clean = self.reference[CLEAN]
        labels = data.labels
        self.classifier = is_classifier(clean, labels)
        if labels is not None and not self.classifier:
            raise DataError(f"labels have shape {labels.shape} but output {self.output!r} has shape "
                            f"{clean.shape}; labels need one class id per sample (per position for sequences)")
        self.metric = ("top1" if labels is not None else "agreement") if self.classifier else "cosine"
        classes = None
        prefix = "class"
        if self.classifier and clean.ndim == 2:
            classes = labels if labels is not None else clean.argmax(-1)
            prefix = "class" if labels is not None else "pred"
        self.slices = build_slices(data, self.specs, classes=classes, class_prefix=prefix,
                                   corruption_variants=[v for v in self.variants if v != CLEAN],
                                   rare_quantile=rare_quantile)

    def outputs(self, candidate: onnx.ModelProto, variants: list[str] | None = None) -> dict[str, np.ndarray]:
        """The candidate's output on each input variant (all by default)."""
        self._check_interface(candidate)
        sess = open_session(candidate, self.target)
        return {v: predict(sess, self.variants[v], **self.run_kw) for v in (variants or self.variants)}

    def _check_interface(self, candidate: onnx.ModelProto) -> None:
        names = {s.name for s in graph_inputs(candidate)}
        if names != {s.name for s in self.specs}:
            raise DataError(f"the candidate's inputs ({', '.join(sorted(names))}) differ from the "
                            f"original's ({', '.join(sorted(s.name for s in self.specs))})")

    def scores(self, variant: str, cand: np.ndarray, idx: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample metric scores (original, candidate) on `variant`, restricted to `idx`."""
        ref = self.reference[variant]
        if idx is not None:
            ref, cand = ref[idx], cand[idx]
        if self.metric == "top1":
            labels = self.data.labels if idx is None else self.data.labels[idx]
            return topk_correct(ref, labels, 1).astype(float), topk_correct(cand, labels, 1).astype(float)
        if self.metric == "agreement":
            return np.ones(len(ref)), agreement(ref, cand).astype(float)
        return np.ones(len(ref)), cosine(ref, cand)

    def metric_value(self, candidate: onnx.ModelProto, variant: str = CLEAN) -> float:
        """The candidate's metric (percent) over all samples of one variant; fast path for sweeps."""
        cand = self.outputs(candidate, [variant])[variant]
        return float(self.scores(variant, cand)[1].mean() * 100)

    def reference_value(self, variant: str = CLEAN) -> float:
        """The original model's own metric (percent) on one variant."""
        return float(self.scores(variant, self.reference[variant])[0].mean() * 100)

    def compare(self, candidate: onnx.ModelProto, thresholds: GateThresholds) -> GateReport:
        """Evaluate the candidate on every slice against the thresholds."""
        outs = self.outputs(candidate)
        results = []
        for k, s in enumerate(self.slices):
            results.append(self._slice_result(s, outs[s.variant], thresholds, seed=self.seed + k))
        notes = []
        if self.metric == "agreement":
            notes.append("no labels: the metric is top-1 agreement with the original model (fidelity)")
        if self.metric == "cosine":
            notes.append(f"output {self.output!r} is not a classifier output: the metric is cosine similarity")
        return GateReport(self.metric, self.output, self.data.n, thresholds, results, self.top_k, notes)

    def _slice_result(self, s: Slice, cand: np.ndarray, th: GateThresholds, *, seed: int) -> SliceResult:
        ref = self.reference[s.variant]
        o, c = self.scores(s.variant, cand, s.indices)
        kw = dict(n_boot=self.n_boot, seed=seed)
        orig, candi = estimate(o * 100, **kw), estimate(c * 100, **kw)
        drop = estimate((o - c) * 100, **kw)  # paired: same samples, same resamples
        agree = rel = topk = None
        if self.classifier:
            agree = estimate(agreement(ref[s.indices], cand[s.indices]).astype(float) * 100, **kw)
        else:
            agree = estimate(cosine(ref[s.indices], cand[s.indices]) * 100, **kw)
            rel = estimate(relative_error(ref[s.indices], cand[s.indices]), **kw)
        if self.metric == "top1" and self.top_k > 1 and ref.ndim == 2:
            labels = self.data.labels[s.indices]
            topk = (estimate(topk_correct(ref[s.indices], labels, self.top_k) * 100.0, **kw),
                    estimate(topk_correct(cand[s.indices], labels, self.top_k) * 100.0, **kw))
        limit = th.max_drop_for(s)
        reasons = []
        if limit is not None and drop.value > limit + 1e-9:
            reasons.append(f"drop {drop.value:.2f} > {limit:g} points")
        if th.min_agreement is not None and agree.value < th.min_agreement * 100 - 1e-9:
            what = "agreement" if self.classifier else "cosine"
            reasons.append(f"{what} {agree.value:.2f}% < {th.min_agreement * 100:g}%")
        small = s.n < th.min_samples
        if small and th.fail_on_small:
            reasons.append(f"only {s.n} samples (< {th.min_samples})")
        status = "fail" if reasons else ("too few" if small else "pass")
        return SliceResult(s.name, s.kind, s.variant, s.n, orig, candi, drop, agree, rel, limit,
                           th.min_agreement, status, reasons, topk)


def evaluate_gate(original: onnx.ModelProto, candidate: onnx.ModelProto, data: EvalData,
                  thresholds: GateThresholds, **kw) -> GateReport:
    """One-shot gate: build an Evaluator for `original` (kw: corruptions, severities, ...) and compare."""
    return Evaluator(original, data, **kw).compare(candidate, thresholds)


def parse_slice_max_drop(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """`rare=2.0` (repeatable, or comma separated) -> {'rare': 2.0}."""
    out: dict[str, float] = {}
    for item in items or ():
        for part in item.split(","):
            if not part.strip():
                continue
            key, eq, value = part.rpartition("=")
            try:
                if not eq or not key.strip():
                    raise ValueError
                out[key.strip()] = float(value)
            except ValueError:
                raise OptionError(f"--slice-max-drop {part!r}: expected SLICE=POINTS, e.g. rare=2.0") from None
    return out
