"""The accuracy gate: original vs candidate on every slice, against thresholds, as a GateReport.

The metric is chosen from the data and the output: the user's task metric when one is given
(--metric, prunec.eval.task_metric), else top-1 accuracy when there are labels for a
classifier, top-1 agreement with the original (fidelity) without labels, and output cosine
similarity for anything that is not a classifier. All values are in percent; drops in points.

A gate passes only on evidence: thresholds that name no slice are errors, labels outside the
output's classes are errors, and a gate whose every slice is under --min-samples fails.
Corrupted slices where the original itself is near chance are reported, not gated.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from prunec.errors import DataError, GateFailure, OptionError
from prunec.eval.corruptions import corrupt, image_layout
from prunec.eval.data import EvalData
from prunec.eval.metrics import (MIN_SAMPLES, Estimate, agreement, cosine, estimate, is_classifier,
                                 relative_error, topk_correct)
from prunec.eval.slice_names import SliceNames, is_glob
from prunec.eval.slices import CLEAN, KINDS, Slice, build_slices, corruption_names
from prunec.eval.task_metric import TaskMetric
from prunec.runtime.inputs import graph_inputs
from prunec.runtime.batching import BatchChoice, fastest_batch
from prunec.runtime.ort_runtime import OrtSession
from prunec.runtime.runtimes import Session, open_session
from prunec.runtime.session import first_line, is_ort_error
from prunec.runtime.target import Target, as_target

#: Corrupted slices where the original scores less than this many points above chance are not gated.
CHANCE_MARGIN = 15.0

#: Evaluation batch when none is given and none is measured.
DEFAULT_BATCH = 64


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
    #: Corruption slices where the original is within this many points of chance are flagged
    #: `near chance` and not gated (a pruned model cannot be judged where the original guesses)...
    chance_margin: float = CHANCE_MARGIN
    #: ...unless this is set.
    gate_near_chance: bool = False

    def max_drop_for(self, s: Slice) -> float | None:
        """The drop allowed on slice `s`: by exact name, then a matching glob, then its kind, then the default."""
        if s.name in self.slice_max_drop:
            return self.slice_max_drop[s.name]
        for key, value in self.slice_max_drop.items():
            if is_glob(key) and fnmatch.fnmatchcase(s.name, key):
                return value
        return self.slice_max_drop.get(s.kind, self.max_drop)

    def check_names(self, slices: list[Slice] | SliceNames) -> None:
        """Every --slice-max-drop key must name a slice, a slice kind, or a glob matching a slice:
        of slices built, or (before any model runs) of the names expected_slice_names foresees."""
        names = slices if isinstance(slices, SliceNames) else SliceNames.of(slices)
        names.check(self.slice_max_drop)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"max_drop": self.max_drop, "slice_max_drop": dict(self.slice_max_drop),
                "min_agreement": self.min_agreement, "min_samples": self.min_samples,
                "fail_on_small": self.fail_on_small, "chance_margin": self.chance_margin,
                "gate_near_chance": self.gate_near_chance}


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
    #: pass | fail | too few (thresholds met on fewer than min_samples samples: not proof) |
    #: near chance (a corrupted slice where the original guesses: reported, not gated)
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

    metric: str  # top1 | agreement | cosine | task:<function name>
    output: str
    n_samples: int
    thresholds: GateThresholds
    slices: list[SliceResult]
    top_k: int = 1
    notes: list[str] = field(default_factory=list)
    #: Reasons the gate fails as a whole, beyond any one slice (e.g. no slice is big enough).
    problems: list[str] = field(default_factory=list)
    #: What the agreement column measures: top-1 `agreement` for classifiers, else `cosine`.
    fidelity: str = "agreement"
    #: The batch the original and the candidate ran at, and how it was chosen.
    batch: BatchChoice | None = None

    @property
    def failed(self) -> list[SliceResult]:
        """Slices that broke a threshold (or were too small under fail_on_small)."""
        return [s for s in self.slices if s.status == "fail"]

    @property
    def too_few(self) -> list[SliceResult]:
        """Slices that met their thresholds on too few samples to be evidence."""
        return [s for s in self.slices if s.status == "too few"]

    @property
    def near_chance(self) -> list[SliceResult]:
        """Corrupted slices not gated because the original scores near chance on them."""
        return [s for s in self.slices if s.status == "near chance"]

    @property
    def passed(self) -> bool:
        """True when no slice failed and the gate had evidence."""
        return not self.failed and not self.problems

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"passed": self.passed, "metric": self.metric, "output": self.output,
                "n_samples": self.n_samples, "top_k": self.top_k,
                "thresholds": self.thresholds.to_dict(), "notes": self.notes, "problems": self.problems,
                "failed": [s.name for s in self.failed], "too_few": [s.name for s in self.too_few],
                "near_chance": [s.name for s in self.near_chance], "fidelity": self.fidelity,
                "slices": [s.to_dict() for s in self.slices],
                "batch": self.batch.to_dict() if self.batch else None}

    def raise_if_failed(self) -> None:
        """Raise GateFailure (exit 3) naming the failed slices, or why the gate as a whole failed."""
        if self.failed:
            names = ", ".join(s.name for s in self.failed[:5]) + (" ..." if len(self.failed) > 5 else "")
            raise GateFailure(f"accuracy gate failed on {len(self.failed)} slice(s): {names}")
        if self.problems:
            raise GateFailure(f"accuracy gate failed: {self.problems[0]}")


def _session(model: onnx.ModelProto | ort.InferenceSession | Session, target: Target) -> Session:
    """An open runtime session for a model (on `target`), or the session given."""
    if isinstance(model, ort.InferenceSession):
        return OrtSession(model)
    return model if isinstance(model, Session) else open_session(model, target)


def _fixed_batches(sess: Session, fixed: dict) -> set[int]:
    """The fixed batch sizes the session's inputs declare (inputs fed whole excluded)."""
    if isinstance(sess, OrtSession):
        return {i.shape[0] for i in sess.sess.get_inputs()
                if i.name not in fixed and i.shape and isinstance(i.shape[0], int)}
    b = sess.input_batch()
    return {b} if b is not None else set()


def predict_outputs(model: onnx.ModelProto | ort.InferenceSession | Session, inputs: dict[str, np.ndarray],
                    names: list[str] | None = None, *, batch_size: int = 64, provider: str = "cpu",
                    threads: int | None = None, fixed: dict[str, np.ndarray] | None = None,
                    target: Target | None = None) -> dict[str, np.ndarray]:
    """Run a model (or a session) over all samples in batches; the named outputs (all by default),
    concatenated. `fixed` inputs are fed whole with every batch. A model is opened on `target`
    (default: ONNX Runtime on `provider`)."""
    sess = _session(model, as_target(target, provider=provider, threads=threads))
    outputs = sess.output_names
    names = list(names or outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise OptionError(f"--eval-output {unknown[0]!r} is not an output of the model ({', '.join(outputs)})")
    fixed = dict(fixed or {})
    fixed_batch = _fixed_batches(sess, fixed)
    if len(fixed_batch) > 1:
        raise DataError(f"inputs declare different fixed batch sizes {sorted(fixed_batch)}")
    pad = bool(fixed_batch)
    step = fixed_batch.pop() if fixed_batch else batch_size
    n = len(next(iter(inputs.values())))
    outs: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n, step):
        feed = {k: v[start:start + step] for k, v in inputs.items()}
        got = len(next(iter(feed.values())))
        if pad and got < step:
            # A fixed batch dim: pad with the last sample and drop the padding afterwards.
            feed = {k: np.concatenate([v, np.repeat(v[-1:], step - got, axis=0)]) for k, v in feed.items()}
        try:
            results = sess.run({**feed, **fixed})
        except Exception as exc:
            # ORT's own error types; other runtimes raise RuntimeError for a model they cannot run.
            if not (is_ort_error(exc) or (not isinstance(sess, OrtSession) and isinstance(exc, RuntimeError))):
                raise
            who = "ONNX Runtime" if isinstance(sess, OrtSession) else sess.label
            raise DataError(f"{who} cannot run the model on samples {start}..{start + got - 1} "
                            f"of the data: {first_line(exc)}") from exc
        for k in names:
            outs[k].append(results[k][:got])
    return {k: np.concatenate(v) for k, v in outs.items()}


def choose_batch(sess: Session, data: EvalData, batch_size: int | str) -> BatchChoice:
    """The batch to evaluate at: `batch_size` itself, or with "auto" the fastest measured on the
    first clean samples (ONNX Runtime sessions whose inputs leave the batch free; other runtimes
    recompile per shape, so they keep 64)."""
    if batch_size != "auto":
        return BatchChoice(int(batch_size))
    if _fixed_batches(sess, dict(data.fixed)):
        return BatchChoice(DEFAULT_BATCH, reason="the model's inputs fix the batch")
    if not isinstance(sess, OrtSession):
        return BatchChoice(DEFAULT_BATCH, reason=f"not measured on {sess.label}")
    return fastest_batch(sess.run, data.inputs, data.fixed, fallback=DEFAULT_BATCH)


def predict(model: onnx.ModelProto | ort.InferenceSession | Session, inputs: dict[str, np.ndarray], *,
            output: str | None = None, batch_size: int = 64, provider: str = "cpu",
            threads: int | None = None, fixed: dict[str, np.ndarray] | None = None,
            target: Target | None = None) -> np.ndarray:
    """Run a model (or an open session) over all samples in batches; one output, concatenated."""
    sess = _session(model, as_target(target, provider=provider, threads=threads))
    name = output or sess.output_names[0]
    return predict_outputs(sess, inputs, [name], batch_size=batch_size, fixed=fixed)[name]


def corrupted_variants(data: EvalData, model: onnx.ModelProto, corruptions: list[str],
                       severities: list[int], *, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs for each `corruption@severity`: image inputs corrupted, other inputs shared."""
    if not corruptions:
        return {}
    images = {s.name: image_layout(s.dims) for s in graph_inputs(model)
              if s.dtype.kind == "f" and image_layout(s.dims) and s.name in data.inputs}
    if not images:
        raise DataError("corruptions need a 4-D float image input (NCHW or NHWC); this model has none "
                        "(use --corruptions none)")
    out = {}
    for c in corruptions:
        for sev, variant in zip(severities, corruption_names([c], severities)):
            feeds = dict(data.inputs)
            for name, layout in images.items():
                x = data.inputs[name]
                feeds[name] = corrupt(x, c, sev, seed=seed, layout=layout,
                                      value_range=(float(x.min()), float(x.max())))
            out[variant] = feeds
    return out


#: Called with (done, total, what) while an Evaluator runs models over its input variants.
EvalProgress = Callable[[int, int, str], None]


class Evaluator:
    """The original model's outputs on clean and corrupted data, computed once, to compare candidates with."""

    def __init__(self, original: onnx.ModelProto, data: EvalData, *, corruptions: list[str] = (),
                 severities: list[int] = (3,), output: str | None = None, top_k: int = 1,
                 batch_size: int | str = 64, provider: str = "cpu", threads: int | None = None,
                 seed: int = 0, rare_quantile: float = 0.25, n_boot: int = 1000,
                 metric: TaskMetric | None = None, progress: EvalProgress | None = None,
                 target: Target | None = None):
        self.data = data
        self.specs = graph_inputs(original)
        #: Where the original and the candidates run (--runtime/--provider/--device).
        self.target = as_target(target, provider=provider, threads=threads)
        self.top_k = top_k
        self.seed = seed
        self.n_boot = n_boot
        self.task = metric
        #: Progress while the original runs (here) and while compare() runs a candidate.
        self.progress = progress
        self.variants = {CLEAN: data.inputs, **corrupted_variants(data, original, list(corruptions),
                                                                  list(severities), seed=seed)}
        sess = open_session(original, self.target)
        #: The batch every model of this evaluation runs at (`batch_size="auto"`: measured here).
        self.batch = choose_batch(sess, data, batch_size)
        self.run_kw = dict(batch_size=self.batch.batch, fixed=data.fixed)
        names = sess.output_names
        self.output = output or names[0]
        if self.output not in names:
            raise OptionError(f"--eval-output {self.output!r} is not an output of the model ({', '.join(names)})")
        # A task metric sees every output; the built-in metrics only the evaluated one.
        self.fetch = names if metric else [self.output]
        self.reference = self._run(sess, "original", progress)
        clean = self.reference[CLEAN][self.output]
        labels = data.labels
        # Which class slices there are: prunec.eval.slice_names.expected_slice_names foresees this
        # from the declared output (to check --slice-max-drop before the run); keep the two in step.
        if metric is not None:
            self.classifier = is_classifier(clean, None)
            self.metric = f"task:{metric.name}"
            if data.targets is None and labels is None:
                raise DataError(f"--metric {metric.spec} needs targets in the data: an array `targets` "
                                "(or `targets_<name>`) in the .npz, or a `target` column in the CSV")
            classes = labels if labels is not None and labels.ndim == 1 else None
            prefix = "class"
        else:
            if labels is None and data.targets is not None:
                raise DataError("the data holds targets (e.g. strings) but no class ids: score them with "
                                "--metric module:function (docs/task-metrics.md)")
            self.classifier = is_classifier(clean, labels)
            if labels is not None and not self.classifier:
                raise DataError(f"labels have shape {labels.shape} but output {self.output!r} has shape "
                                f"{clean.shape}; labels need one class id per sample (per position for "
                                "sequences), or score your own targets with --metric")
            if labels is not None:
                check_label_range(labels, clean.shape[-1], self.output)
            self.metric = ("top1" if labels is not None else "agreement") if self.classifier else "cosine"
            classes = None
            prefix = "class"
            if self.classifier and clean.ndim == 2:
                classes = labels if labels is not None else clean.argmax(-1)
                prefix = "class" if labels is not None else "pred"
        #: Score of a guessing model in percent (None: no such notion for this metric).
        self.chance = {"top1": 100.0 / clean.shape[-1] if clean.ndim >= 2 else None}.get(
            self.metric, metric.chance * 100 if metric is not None else None)
        self.slices = build_slices(data, self.specs, classes=classes, class_prefix=prefix,
                                   corruption_variants=[v for v in self.variants if v != CLEAN],
                                   rare_quantile=rare_quantile)
        self._ref_scores: dict[str, np.ndarray] = {}

    def _each_variant(self, sess: Session, who: str, progress: EvalProgress | None = None,
                      variants: list[str] | None = None):
        """(variant, outputs by name) for each variant in turn (all by default), with progress."""
        variants = list(self.variants) if variants is None else variants
        for k, v in enumerate(variants):
            if progress:
                progress(k, len(variants), f"{who} on {v}")
            yield v, predict_outputs(sess, self.variants[v], self.fetch, **self.run_kw)
        if progress:
            progress(len(variants), len(variants), f"{who} done")

    def _run(self, sess: Session, who: str, progress: EvalProgress | None = None,
             variants: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
        return dict(self._each_variant(sess, who, progress, variants))

    def _candidate_session(self, candidate: onnx.ModelProto) -> Session:
        self._check_interface(candidate)
        return open_session(candidate, self.target)

    def outputs(self, candidate: onnx.ModelProto, variants: list[str] | None = None,
                progress: EvalProgress | None = None) -> dict[str, dict[str, np.ndarray]]:
        """The candidate's outputs (by name) on each input variant (all by default)."""
        return self._run(self._candidate_session(candidate), "candidate", progress, variants)

    def _check_interface(self, candidate: onnx.ModelProto) -> None:
        names = {s.name for s in graph_inputs(candidate)}
        if names != {s.name for s in self.specs}:
            raise DataError(f"the candidate's inputs ({', '.join(sorted(names))}) differ from the "
                            f"original's ({', '.join(sorted(s.name for s in self.specs))})")

    def _task_scores(self, outs: dict[str, np.ndarray]) -> np.ndarray:
        targets = self.data.targets if self.data.targets is not None else self.data.labels
        return self.task(outs, targets)

    def scores(self, variant: str, cand: dict[str, np.ndarray], idx: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample metric scores (original, candidate) on `variant`, restricted to `idx`;
        `cand` is the candidate's outputs by name on that variant."""
        if self.task is not None:
            if variant not in self._ref_scores:
                self._ref_scores[variant] = self._task_scores(self.reference[variant])
            o, c = self._ref_scores[variant], self._task_scores(cand)
            return (o, c) if idx is None else (o[idx], c[idx])
        ref, got = self.reference[variant][self.output], cand[self.output]
        if idx is not None:
            ref, got = ref[idx], got[idx]
        return self._sample_scores(ref, got, self.data.labels if idx is None else self.data.labels[idx])

    def chunk_scores(self, variant: str, cand: dict[str, np.ndarray], start: int) -> np.ndarray:
        """The candidate's per-sample scores on samples `start`.. of `variant`, from its outputs on
        those samples alone (`cand`); built-in metrics only (a task metric scores whole outputs)."""
        if self.task is not None:
            raise ValueError("a task metric scores whole outputs; use scores()")
        got = cand[self.output]
        span = slice(start, start + len(got))
        labels = self.data.labels[span] if self.data.labels is not None else None
        return self._sample_scores(self.reference[variant][self.output][span], got, labels)[1]

    def _sample_scores(self, ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
        if self.metric == "top1":
            return topk_correct(ref, labels, 1).astype(float), topk_correct(got, labels, 1).astype(float)
        if self.metric == "agreement":
            return np.ones(len(ref)), agreement(ref, got).astype(float)
        return np.ones(len(ref)), cosine(ref, got)

    def metric_value(self, candidate: onnx.ModelProto, variant: str = CLEAN) -> float:
        """The candidate's metric (percent) over all samples of one variant; fast path for sweeps."""
        cand = self.outputs(candidate, [variant])[variant]
        return float(self.scores(variant, cand)[1].mean() * 100)

    def reference_value(self, variant: str = CLEAN) -> float:
        """The original model's own metric (percent) on one variant."""
        return float(self.scores(variant, self.reference[variant])[0].mean() * 100)

    def check_thresholds(self, thresholds: GateThresholds) -> None:
        """Raise OptionError when a --slice-max-drop key names no slice of this data."""
        thresholds.check_names(self.slices)

    def compare(self, candidate: onnx.ModelProto, thresholds: GateThresholds) -> GateReport:
        """Evaluate the candidate on every slice against the thresholds."""
        self.check_thresholds(thresholds)
        results: list[SliceResult | None] = [None] * len(self.slices)
        # One variant at a time: the candidate's outputs on a variant are scored on its slices and
        # dropped before the next variant runs (a recognizer's outputs are 424 MB per variant).
        for v, outs in self._each_variant(self._candidate_session(candidate), "candidate", self.progress):
            scores = self.scores(v, outs)
            for k, s in enumerate(self.slices):
                if s.variant == v:
                    results[k] = self._slice_result(s, outs, scores, thresholds, seed=self.seed + k)
            del outs, scores  # before the next variant runs
        notes, problems = [], []
        if self.metric == "agreement":
            notes.append("no labels: the metric is top-1 agreement with the original model (fidelity)")
        if self.metric == "cosine":
            notes.append(f"output {self.output!r} is not a classifier output: the metric is cosine similarity")
        absent = sorted(k for k in thresholds.slice_max_drop if k in KINDS and k not in {s.kind for s in self.slices})
        if absent:
            notes.append(f"--slice-max-drop for {', '.join(absent)}: this data has no slice of that kind")
        near = [r for r in results if r.status == "near chance"]
        if near:
            notes.append(f"{len(near)} corrupted slice(s) not gated: the original scores within "
                         f"{thresholds.chance_margin:g} points of chance ({self.chance:.3g}%) on them: "
                         + ", ".join(f"{r.name} ({r.original.value:.1f}%)" for r in near[:6])
                         + (" ..." if len(near) > 6 else "") + " (--gate-near-chance gates them)")
        if results and all(r.n < thresholds.min_samples for r in results):
            problems.append(f"no slice has --min-samples {thresholds.min_samples} samples (the largest has "
                            f"{max(r.n for r in results)}); a gate on so few samples is not evidence")
        return GateReport(self.metric, self.output, self.data.n, thresholds, results, self.top_k, notes,
                          problems, "agreement" if self.classifier else "cosine", self.batch)

    def _slice_result(self, s: Slice, cand_outs: dict[str, np.ndarray], scores: tuple[np.ndarray, np.ndarray],
                      th: GateThresholds, *, seed: int) -> SliceResult:
        ref = self.reference[s.variant][self.output][s.indices]
        cand = cand_outs[self.output][s.indices]
        o, c = scores[0][s.indices], scores[1][s.indices]
        kw = dict(n_boot=self.n_boot, seed=seed)
        orig, candi = estimate(o * 100, **kw), estimate(c * 100, **kw)
        drop = estimate((o - c) * 100, **kw)  # paired: same samples, same resamples
        agree = rel = topk = None
        if self.classifier:
            agree = estimate(agreement(ref, cand).astype(float) * 100, **kw)
        elif np.asarray(ref).dtype.kind == "f":
            agree = estimate(cosine(ref, cand) * 100, **kw)
            rel = estimate(relative_error(ref, cand), **kw)
        if self.metric == "top1" and self.top_k > 1 and ref.ndim == 2:
            labels = self.data.labels[s.indices]
            topk = (estimate(topk_correct(ref, labels, self.top_k) * 100.0, **kw),
                    estimate(topk_correct(cand, labels, self.top_k) * 100.0, **kw))
        limit = th.max_drop_for(s)
        reasons = []
        if limit is not None and drop.value > limit + 1e-9:
            reasons.append(f"drop {drop.value:.2f} > {limit:g} points")
        if th.min_agreement is not None and agree is not None and agree.value < th.min_agreement * 100 - 1e-9:
            what = "agreement" if self.classifier else "cosine"
            reasons.append(f"{what} {agree.value:.2f}% < {th.min_agreement * 100:g}%")
        small = s.n < th.min_samples
        if small and th.fail_on_small:
            reasons.append(f"only {s.n} samples (< {th.min_samples})")
        near = (s.kind == "corruption" and self.chance is not None and not th.gate_near_chance
                and orig.value < self.chance + th.chance_margin)
        if near:
            status, reasons = "near chance", []
        else:
            status = "fail" if reasons else ("too few" if small else "pass")
        return SliceResult(s.name, s.kind, s.variant, s.n, orig, candi, drop, agree, rel, limit,
                           th.min_agreement, status, reasons, topk)


def check_label_range(labels: np.ndarray, classes: int, output: str) -> None:
    """Class ids must index the output's class axis; anything else scores 0% for both models."""
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        values = np.unique(labels[bad])
        raise DataError(f"labels hold class ids outside 0..{classes - 1} of output {output!r} ({classes} "
                        f"classes) in {int(bad.sum())} sample(s): {', '.join(map(str, values[:5]))}"
                        + (" ..." if len(values) > 5 else "")
                        + "; check the label mapping or --eval-output")


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
