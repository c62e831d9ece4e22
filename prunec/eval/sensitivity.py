"""Per-group pruning sensitivity: prune one channel group at a time and measure the metric drop.

The `channels` pass is driven only through its public API (its analysis and selection, or
build_passes + PassManager with a plan file), so the groups and channels measured here are
exactly those the pass prunes later. A trial is simulated by masking the channels it removes
(`prunec.eval.trials`), on a local process pool or a Ray cluster if asked (`prunec.eval.executor`).
Results are added to a JSON cache as each trial finishes, so an interrupted run resumes where
it stopped, whichever workers computed them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from prunec.errors import OptionError, OutputFileError
from prunec.eval.executor import ExecutorSettings, run_tasks
from prunec.eval.gate import Evaluator
from prunec.eval.slices import CLEAN
from prunec.eval.trials import RunnerSpec, TrialGraph, TrialTask, build_runner
from prunec.graph.costs import analyze_costs
from prunec.graph.io import atomic_write
from prunec.passes import PassContext, PassManager, RunReport, build_passes

#: Bump when the cached numbers would mean something different.
CACHE_VERSION = 2  # 2: a trial's drop is the worst gated variant's (clean and corruptions)


@dataclass
class GroupInfo:
    """A channel group as the `channels` pass reports it."""

    id: str
    size: int
    depth: int
    frozen: str | None = None
    layers: list[str] = field(default_factory=list)


@dataclass
class Trial:
    """One group pruned alone at one ratio: the metric, its drop, and what it saved."""

    ratio: float
    metric: float
    drop: float
    macs: int
    params: int
    #: Drop on every gated input variant (clean, each corruption); `drop` is the worst of them.
    drops: dict[str, float] | None = None
    worst: str = "clean"


@dataclass
class GroupSensitivity:
    """A group's trials at every ratio (empty for frozen groups)."""

    group: GroupInfo
    trials: list[Trial] = field(default_factory=list)

    def drop_at(self, ratio: float) -> float | None:
        """Measured drop (points) at `ratio`, or None if not measured."""
        return next((t.drop for t in self.trials if abs(t.ratio - ratio) < 1e-9), None)


@dataclass
class SensitivityReport:
    """Baseline metric and costs, and one GroupSensitivity per channel group (frozen included)."""

    metric: str
    baseline: float
    macs: int
    params: int
    ratios: list[float]
    groups: list[GroupSensitivity]
    cached_trials: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"metric": self.metric, "baseline": self.baseline, "macs": self.macs, "params": self.params,
                "ratios": self.ratios, "cached_trials": self.cached_trials,
                "groups": [{**asdict(g.group), "trials": [asdict(t) for t in g.trials]} for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityReport":
        """Inverse of to_dict (for `--budget` from a saved JSON)."""
        groups = [GroupSensitivity(GroupInfo(g["id"], g["size"], g["depth"], g.get("frozen"), g.get("layers", [])),
                                   [Trial(**t) for t in g["trials"]]) for g in d["groups"]]
        return cls(d["metric"], d["baseline"], d["macs"], d["params"], d["ratios"], groups,
                   d.get("cached_trials", 0))


def parse_ratios(text: str) -> list[float]:
    """`0.1,0.2,0.4` -> sorted unique ratios, each in (0, 1)."""
    try:
        ratios = sorted({round(float(t), 6) for t in text.split(",") if t.strip()})
    except ValueError:
        raise OptionError(f"--ratios {text!r}: expected numbers, e.g. 0.1,0.2,0.4") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise OptionError(f"--ratios {text!r}: each ratio must be in (0, 1)")
    return ratios


def prune(model: onnx.ModelProto, plan: dict[str, Any], *, ctx: PassContext | None = None,
          options: dict[str, Any] | None = None, verify: bool = False) -> tuple[onnx.ModelProto, RunReport]:
    """Run the `channels` pass with `plan` ({"default_ratio": r, "groups": {id: r}}) through the PassManager."""
    with tempfile.TemporaryDirectory(prefix="prunec-plan-") as d:
        path = Path(d) / "plan.json"
        path.write_text(json.dumps(plan))
        passes = build_passes(["channels"], {"channels": {**(options or {}), "plan": str(path)}})
        return PassManager(passes, ctx=ctx or PassContext(), verify=verify).run(model)


def prune_uniform(model: onnx.ModelProto, ratio: float, *, ctx: PassContext | None = None,
                  options: dict[str, Any] | None = None, verify: bool = False
                  ) -> tuple[onnx.ModelProto, RunReport]:
    """Run the `channels` pass at one ratio for every group."""
    passes = build_passes(["channels"], {"channels": {**(options or {}), "ratio": ratio}})
    return PassManager(passes, ctx=ctx or PassContext(), verify=verify).run(model)


def channel_groups(model: onnx.ModelProto, *, ctx: PassContext | None = None,
                   options: dict[str, Any] | None = None) -> list[GroupInfo]:
    """The groups the `channels` pass sees (its group_table at ratio 0, which removes nothing)."""
    _, report = prune(model, {"default_ratio": 0.0, "groups": {}}, ctx=ctx, options=options)
    table = report.passes[0].result.details.get("group_table", [])
    return [GroupInfo(g["id"], int(g["size"]), int(g.get("depth", 0)), g.get("frozen"),
                      list(g.get("layers", []))) for g in table]


def _write_atomic(path: Path, text: str) -> None:
    # graph.io's atomic write: no temp file left on errors or signals, OS errors in one line.
    with atomic_write(path, f"--cache {path.parent}", OutputFileError) as tmp:
        tmp.write_text(text)


def _digest(model: onnx.ModelProto, evaluator: Evaluator, options: dict[str, Any],
            calib: dict[str, np.ndarray] | None = None) -> str:
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    for name in sorted(calib or {}):  # passes that calibrate give other results on other samples
        h.update(b"calib:" + name.encode())
        h.update(np.ascontiguousarray(calib[name]).tobytes())
    for name in sorted(evaluator.data.inputs):
        h.update(name.encode())
        h.update(evaluator.data.inputs[name].tobytes())
    if evaluator.data.labels is not None:
        h.update(evaluator.data.labels.tobytes())
    targets = evaluator.data.targets
    for name, t in (sorted(targets.items()) if isinstance(targets, dict) else [("", targets)]):
        if t is not None:
            h.update(name.encode() + np.ascontiguousarray(t).tobytes())
    for name, v in sorted(evaluator.data.fixed.items()):
        h.update(name.encode() + np.ascontiguousarray(v).tobytes())
    task = evaluator.task.digest if evaluator.task is not None else None
    h.update(json.dumps({"metric": evaluator.metric, "task": task, "output": evaluator.output,
                         "options": options, "v": CACHE_VERSION}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    """$PRUNEC_CACHE, else $XDG_CACHE_HOME/prunec, else ~/.cache/prunec."""
    if os.environ.get("PRUNEC_CACHE"):
        return Path(os.environ["PRUNEC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prunec"


def sensitivity(model: onnx.ModelProto, evaluator: Evaluator, ratios: list[float], *,
                ctx: PassContext | None = None, options: dict[str, Any] | None = None,
                cache: Path | None = None, progress: Callable[[int, int, str], None] | None = None,
                executor: ExecutorSettings | None = None, method: str = "masked") -> SensitivityReport:
    """Prune each unfrozen group alone at each ratio and measure the metric drop: the worst over
    the evaluator's gated variants (clean, and each corruption where the original is not near
    chance), so a plan's --max-drop bounds the worst gated slice, not only the clean one.

    `cache` is a folder; results for this model, data and options are stored in one JSON file
    there as each trial finishes. `progress(done, total, label)` is called after each trial.
    Trials are masked on the original (`prunec.eval.trials`) and spread by `executor` (default:
    in this process); `method="rewrite"` prunes, verifies and evaluates each trial for real instead
    (slower; the reference the masked trials are tested against).
    """
    if method not in ("masked", "rewrite"):
        raise OptionError(f"sensitivity method {method!r}: masked or rewrite")
    options = dict(options or {})
    ctx = ctx or PassContext()
    tg = TrialGraph(model, input_shapes=ctx.input_shapes, options=options) if method == "masked" else None
    groups = ([GroupInfo(g.id, g.size, g.depth, g.frozen, list(g.layers)) for g in tg.groups] if tg
              else channel_groups(model, ctx=ctx, options=options))
    calib = ctx.calib.inputs if ctx.calib is not None else None
    keyed = {**options, "variants": list(evaluator.variants)}  # other slices, other drops
    cache_file = (cache / f"sensitivity-{_digest(model, evaluator, keyed, calib)}.json") if cache else None
    done: dict[str, dict] = {}
    if cache_file and cache_file.exists():
        try:
            done = json.loads(cache_file.read_text()).get("trials", {})
        except (json.JSONDecodeError, OSError):
            done = {}  # a damaged cache is only a lost speed-up
    from prunec.eval.robust import gated_variants, variant_drops

    baseline = evaluator.reference_value()
    variants = gated_variants(evaluator)
    base_of = {v: evaluator.reference_value(v) for v in variants}
    base_costs = analyze_costs(model, ctx.input_shapes or None)
    live = [(g, r, f"{g.id}@{r:g}") for g in groups if not g.frozen for r in ratios]
    n_cached = sum(1 for _, _, key in live if key in done)
    k = 0

    def record(key: str, trial: Trial) -> None:
        nonlocal k
        done[key] = asdict(trial)
        if cache_file:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(cache_file, json.dumps({"version": CACHE_VERSION, "trials": done}))
        k += 1
        if progress:
            progress(k, len(live), key)

    for _, _, key in live:
        if key in done:
            k += 1
            if progress:
                progress(k, len(live), key)
    todo = [(g, r, key) for g, r, key in live if key not in done]
    if tg is None:
        for g, r, key in todo:
            pruned, rep = prune(model, {"default_ratio": 0.0, "groups": {g.id: r}}, ctx=ctx, options=options)
            values, drops = variant_drops(evaluator, pruned, variants, base_of)
            worst = max(drops, key=drops.get)
            record(key, Trial(r, values[CLEAN], drops[worst], base_costs.macs - rep.after.macs,
                              base_costs.params - rep.after.params, drops, worst))
    else:
        planned = {}
        for g, r, key in todo:
            removed = tg.select({g.id: r}, ctx)
            params, macs = tg.costs(removed)
            planned[key] = (r, removed, base_costs.macs - macs, base_costs.params - params)

        def finish(key: str, values: dict[str, float]) -> None:
            r, _, macs, params = planned[key]
            drops = {v: base_of[v] - values[v] for v in variants}
            worst = max(drops, key=drops.get)
            record(key, Trial(r, values[CLEAN], drops[worst], macs, params, drops, worst))

        run_trials(tg, model, evaluator, {key: p[1] for key, p in planned.items()}, finish,
                   plans={key: {"default_ratio": 0.0, "groups": {key.rsplit("@", 1)[0]: p[0]}}
                          for key, p in planned.items()},
                   ctx=ctx, options=options, variants=variants, executor=executor)
    results = []
    for g in groups:
        gs_ = GroupSensitivity(g)
        results.append(gs_)
        if not g.frozen:
            gs_.trials = [Trial(**done[f"{g.id}@{r:g}"]) for r in ratios]
    return SensitivityReport(evaluator.metric, baseline, base_costs.macs, base_costs.params, list(ratios),
                             results, n_cached)


def run_trials(tg: TrialGraph, model: onnx.ModelProto, evaluator: Evaluator, trials: dict[str, frozenset[int]],
               on_trial: Callable[[str, dict[str, float]], None], *, plans: dict[str, dict],
               ctx: PassContext | None = None, options: dict[str, Any] | None = None,
               variants: list[str] | None = None, executor: ExecutorSettings | None = None) -> None:
    """Score `trials` ({key: removed classes}) by masking, one task per cut in cut order, on
    `executor`; `on_trial(key, {variant: metric})` is called in this process as each one finishes.
    A removal masking cannot simulate (`TrialGraph.maskable`: hidden width, mean compensation,
    reconstruction) is pruned for real from its plan (`plans[key]`, a channels plan), here."""
    executor = executor or ExecutorSettings()
    ctx = ctx or PassContext()
    variants = list(variants or [CLEAN])
    direct = [key for key, removed in trials.items() if not tg.maskable(removed, ctx)]
    for key in direct:
        pruned, _ = prune(model, plans[key], ctx=ctx, options=options)
        outs = evaluator.outputs(pruned, variants)
        on_trial(key, {v: float(evaluator.scores(v, outs[v])[1].mean() * 100) for v in variants})
    trials = {key: removed for key, removed in trials.items() if key not in direct}
    if not trials:
        return
    by_cut: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for key, removed in trials.items():
        by_cut.setdefault(tg.cut_for(tg.masks(removed)), []).append((key, tuple(sorted(removed))))
    tasks = [TrialTask(j, by_cut[j], variants) for j in sorted(by_cut)]
    in_process = executor.kind == "local" and min(executor.workers(), len(tasks)) <= 1
    if not in_process and getattr(evaluator, "progress", None) is not None:
        evaluator = copy.copy(evaluator)  # a progress bar stays here; workers get the rest
        evaluator.progress = None
    spec = RunnerSpec(model, evaluator, dict(ctx.input_shapes or {}), dict(options or {}), tg.fingerprint(),
                      local=tg if in_process else None)

    def on_result(_: int, result: dict[str, dict[str, float]]) -> None:
        for key, values in result.items():
            on_trial(key, values)

    run_tasks(build_runner, spec, tasks, executor, on_result)
