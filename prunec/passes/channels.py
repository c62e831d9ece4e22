"""`channels`: structured channel pruning as a graph rewrite.

The dependency analysis (`prunec.graph.channels`) finds groups of channels that must leave
together; this pass ranks the classes of each group, picks which to remove (uniformly per
group, globally, or from a plan file), and deletes them from every weight at once. The pass
manager then shape-verifies and runs the result, and proves it equal to the masked original
(`prunec.graph.proof`): the model the pass started from with every removed channel zeroed
where it is read, which the pass returns as its `reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from prunec.errors import OptionError
from prunec.graph.channel_core import Mode
from prunec.graph.channels import (ChannelAnalysis, analyze_channels, apply_removal, class_importance,
                                   kept_indices, protect_early, statistics_notes)
from prunec.graph.compensation import apply_bias_deltas
from prunec.graph.fold import fold_constants
from prunec.graph.ir import export_graph
from prunec.graph.proof import masked_reference
from prunec.graph.selection import reconstruction_scores
from prunec.graph.subgraphs import subgraph_weight_layers
from prunec.passes.channel_recovery import (activation_scores, check_compensation, compensate_mode,
                                            compensation_for, gather_evidence, lost_channels)
from prunec.passes.base import Pass, PassContext, PassResult, Skip, check_regex, option, read_json_file, register
from prunec.runtime.blocks import KNOWN_TARGETS, channel_multiple, parse_target_key


@dataclass
class ChannelsOptions:
    ratio: float = option(0.5, "fraction of each group's channels to remove (floor(n*ratio), never all)")
    global_: bool = option(False, "rank channels across groups instead of a uniform ratio per group")
    importance: Literal["l1", "l2", "bn-scale", "activation", "reconstruction"] = option(
        "l1", "channel importance: weight magnitude over every slice it touches, BN |gamma|, "
              "mean |activation| on calibration data, or reconstruction: remove the channels whose "
              "loss changes their readers' outputs least on calibration data (greedy, ThiNet-style)")
    round: int | Literal["auto", "measure"] = option(
        "auto", "keep a multiple of this many channels in every group (nearest multiple). 'auto': the "
                "channel block of the target's fast kernels (ORT CPU: 16 with AVX-512, else 8; table in "
                "prunec.runtime.blocks); other counts fall back to slower kernels and can make a pruned "
                "model slower than the original. 'measure': time candidate widths of the costliest "
                "groups on the target and keep the most channels per millisecond")
    target: str = option(
        "auto", "where the model will run, for round=auto/measure: auto (the run's --runtime, "
                "--provider, --device, --precision; ORT CPU without one) or one of "
                + ", ".join(KNOWN_TARGETS))
    measure_groups: int = option(6, "round=measure: how many groups (the costliest by MACs) are timed; "
                                    "the others are rounded as with auto")
    min: int = option(1, "keep at least this many channels in every group")
    protect: str | None = option(None, "regex of producer node names whose channels are never removed")
    protect_early: float = option(
        0.0, "leave unpruned the groups produced within the first F of the model's MACs (graph order): "
             "early layers tolerate far less pruning (PP-OCRv4's recognizer at about 15.7% of MACs removed, "
             "0.12: degraded renders -4.5 points on the test words and -1.0 on others, against -5.5 and -3.5 "
             "for a uniform cut; BENCHMARKS.md)")
    plan: Path | None = option(None, "JSON plan with per-group ratios: "
                                     '{"default_ratio": 0.3, "groups": {"<group id>": 0.5}}')
    fold_constants: bool = option(True, "fold constant subgraphs first so weights behind "
                                        "Identity/Transpose nodes are seen as constants")
    compensate: Literal["auto", "mean", "none"] = option(
        "auto", "fold each removed channel's mean on calibration data times its weights into the "
                "readers' biases. auto: mean with --calib, else only channels that are provably "
                "constant (zero weights), which needs no data")
    reconstruct: bool = option(False, "after removal, re-fit the readers' weights to the original "
                                      "outputs on calibration data (the reconstruct pass, defaults)")
    hidden: bool = option(False, "also prune a transformer's hidden width (through LayerNorm, RMSNorm, "
                                 "residual adds, embeddings); lossy: normalization statistics then "
                                 "cover only the kept channels (reported)")

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise OptionError(f"channels.ratio must be in [0, 1), got {self.ratio}")
        if (self.round not in ("auto", "measure") and self.round < 1) or self.min < 1:
            raise OptionError("channels.round and channels.min must be at least 1")
        if self.target != "auto":
            parse_target_key(self.target)
        if self.measure_groups < 0:
            raise OptionError("channels.measure-groups must not be negative")
        if self.round == "measure" and self.global_:
            raise OptionError("channels.round=measure times per-group widths; it does not combine with "
                              "channels.global=true (use round=auto there)")
        check_regex("channels.protect", self.protect)
        if not 0 <= self.protect_early < 1:
            raise OptionError(f"channels.protect-early must be in [0, 1), got {self.protect_early}")


def load_plan(path: Path) -> tuple[float | None, dict[str, float], int | None]:
    """Read a plan file: (default ratio or None, {group id: ratio}, round or None).

    A plan written by the budget allocator records the `round` it was measured with, which
    then overrides the option so the plan reproduces its measured cost."""
    doc = read_json_file(path, "channels.plan")
    groups = doc.get("groups", {}) if isinstance(doc, dict) else None
    if not isinstance(groups, dict) or not all(isinstance(v, (int, float)) for v in groups.values()):
        raise OptionError(f"channels.plan {path}: needs {{\"groups\": {{\"<group id>\": ratio}}}}")
    for gid, r in groups.items():
        if not 0.0 <= r < 1.0:
            raise OptionError(f"channels.plan {path}: ratio {r} for group {gid!r} not in [0, 1)")
    default = doc.get("default_ratio")
    round_to = doc.get("round")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise OptionError(f"channels.plan {path}: round must be a positive integer, got {round_to!r}")
    return ((float(default) if default is not None else None), {k: float(v) for k, v in groups.items()},
            round_to)


def kept_count(n: int, ratio: float, *, minimum: int = 1, multiple: int = 1) -> int:
    """How many of n classes to keep at `ratio`: n - floor(n*ratio), moved to the nearest
    multiple of `multiple` (ties keep more), at least `minimum` (and 1), never more than n."""
    keep = n - math.floor(n * ratio + 1e-9)
    if multiple > 1:
        keep = max(multiple, math.floor(keep / multiple + 0.5) * multiple)
    keep = max(keep, minimum, 1)
    return min(keep, n)


def class_multiple(round_to: int, channels_per_class: int) -> int:
    """Classes to keep in multiples of. Plain channels: `round_to`. A grouped conv's class spans
    one channel per conv group, and what its kernels care about is the per-group width, which
    rounding to the CPU's channel block cannot make block-aligned for narrow groups (RegNet's
    width-8 groups could then not be pruned at all): those are not rounded."""
    return round_to if channels_per_class <= 1 else 1


@register
class ChannelPruning(Pass):
    name = "channels"
    summary = "Structured channel pruning: remove coupled channel groups from every weight at once."
    exact = False
    Options = ChannelsOptions
    preserves = frozenset({"folded"})

    def requires(self) -> frozenset[str]:
        return frozenset({"folded"}) if self.options.fold_constants else frozenset()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o: ChannelsOptions = self.options
        analysis = self.analyze(graph, ctx)
        mode = compensate_mode(o.compensate, ctx)
        evidence = gather_evidence(analysis, ctx, importance=o.importance, mean=mode == "mean")
        scores = self._scores(analysis, ctx, evidence, centered=mode == "mean")
        removed = self.select(analysis, ctx, scores=scores)
        removed_classes = set().union(*removed.values()) if removed else set()
        compensation = compensation_for(analysis, removed_classes, ctx, mode, evidence)
        kept = kept_indices(analysis, removed_classes)
        before = export_graph(graph) if mode == "mean" and compensation and compensation.deltas else None
        notes = statistics_notes(analysis, removed_classes)
        # The proof: the pruned model must equal the original with the removed channels masked
        # where they are read (copied before `apply_removal` edits the analysed graph in place).
        # Compensation adds the same bias deltas to both (below), so the proof still holds
        # exactly; a refit of kept weights (reconstruct=true) does not, and is measured instead.
        # Removing hidden width changes normalization statistics, which masking cannot
        # reproduce: no proof then either.
        reference = masked_reference(analysis, removed_classes, kept) if removed_classes and not notes else None
        stats = apply_removal(analysis, removed_classes, kept)
        if before is not None:
            compensation.check = self._check(before, graph, compensation, kept, ctx)
        if compensation is not None and compensation.deltas and (compensation.check or {}).get("kept", True):
            apply_bias_deltas(graph, compensation.deltas, kept)
            if reference is not None:
                deltas = dict(compensation.deltas)
                reference.edits.append(lambda g: apply_bias_deltas(g, deltas))
                reference.what = "masked original + compensation"
        ctx.record_kept(lost_channels(analysis, kept))
        recovery = self._recover(graph, ctx, mode, compensation, evidence)
        if o.reconstruct and reference is not None:
            reference = None
            recovery.details["proof"] = ("none: reconstruction refits kept weights on calibration data, "
                                         "so the result is measured, not proven")
        groups_out = []
        skipped = []
        for g in analysis.groups:
            n_removed = len(removed.get(g.id, ()))
            groups_out.append({"id": g.id, "size": g.size, "kept": g.size - n_removed,
                               "channels_per_class": analysis.channels_per_class(g),
                               "producers": g.producers, "layers": g.layers, "frozen": g.frozen,
                               "depth": g.depth})
            if g.frozen:
                skipped.append(Skip(f"group {g.id} ({g.size} ch)", g.frozen))
        inner = subgraph_weight_layers(graph)
        if inner:
            skipped.append(Skip(f"{len(inner)} weight layer(s) inside If/Loop/Scan bodies ({inner[0]}, ...)",
                                "prunec prunes the outer graph only; subgraphs are kept as they are"))
        total = sum(g.size for g in analysis.groups)
        n_removed = sum(len(v) for v in removed.values())
        return PassResult(
            changed=n_removed > 0,
            details={"groups": len(analysis.groups),
                     "groups_pruned": sum(1 for v in removed.values() if v),
                     "groups_frozen": sum(1 for g in analysis.groups if g.frozen),
                     "classes_total": total, "classes_removed": n_removed, "round": self._round_to, **stats,
                     "target": self._target.key, "round_reason": self._round_reason,
                     **({"measured_widths": self._measured} if getattr(self, "_measured", None) else {}),
                     **recovery.details, "group_table": groups_out},
            skipped=skipped + recovery.skipped, notes=notes,
            reference=reference,
        )

    def analyze(self, graph: gs.Graph, ctx: PassContext) -> ChannelAnalysis:
        """Fold constants (if the option says so; this edits `graph`) and analyse channels, as `run` does."""
        o: ChannelsOptions = self.options
        if o.fold_constants and "folded" not in ctx.holds:  # a PassManager folds once for every pass
            fold_constants(graph, ctx.input_shapes or None)
        analysis = analyze_channels(graph, input_shapes=ctx.input_shapes or None, protect=o.protect,
                                    mode=Mode(hidden=o.hidden))
        protect_early(analysis, o.protect_early)
        return analysis

    def select(self, analysis: ChannelAnalysis, ctx: PassContext, *, ratios: dict[str, float] | None = None,
               scores: np.ndarray | None = None) -> dict[str, set[int]]:
        """The classes `run` removes from each group, without rewriting anything.

        `ratios` ({group id: ratio} for every group) replaces the ratio/plan options, and `scores`
        (from `scores`) saves ranking again; sensitivity trials use both to pick exactly the
        channels a real run would. Rounding follows the target (the option, else `ctx.target`);
        with round=measure the costliest groups' widths are timed on it, as in `run`."""
        o: ChannelsOptions = self.options
        self._target = self._resolve_target(ctx)
        self._measured = None
        scores = self.scores(analysis, ctx) if scores is None else scores
        ratios = self._ratios(analysis) if ratios is None else ratios
        if o.round == "measure" and not hasattr(self, "_round"):
            from prunec.passes.channel_widths import measure_widths

            self._measured = measure_widths(analysis, ratios, self._target, minimum=o.min,
                                            top=o.measure_groups, input_shapes=ctx.input_shapes or None)
        if o.global_:
            return self._select_global(analysis, scores)
        return self._select_uniform(analysis, scores, ratios)

    def scores(self, analysis: ChannelAnalysis, ctx: PassContext) -> np.ndarray:
        """Importance of every class (indexed by class id), by the `importance` option (activation
        and reconstruction importance run the calibration data through the model once)."""
        o: ChannelsOptions = self.options
        evidence = gather_evidence(analysis, ctx, importance=o.importance, mean=False)
        return self._scores(analysis, ctx, evidence, centered=compensate_mode(o.compensate, ctx) == "mean")

    @staticmethod
    def _check(before, graph, compensation, kept, ctx) -> dict:
        """Keep mean compensation only where it brings the pruned outputs closer to the pass's
        input model on calibration samples (never worse than no compensation, end to end)."""
        better, e0, e1 = check_compensation(before, graph, compensation.deltas, kept, ctx.calib)
        if not better:
            compensation.skipped.append(("mean compensation", f"discarded: output error on calibration samples "
                                                              f"{e1:.3g} with it, {e0:.3g} without"))
        return {"kept": better, "output_error_without": e0, "output_error_with": e1}

    def _recover(self, graph, ctx, mode, compensation, evidence) -> PassResult:
        """Details of the compensation (and, with reconstruct=true, the reconstruction)."""
        details: dict = {"compensate": mode}
        skipped: list[Skip] = []
        if compensation is not None:
            details["compensation"] = compensation.summary()
            skipped += [Skip(what, f"not compensated: {why}") for what, why in compensation.skipped]
        if evidence is not None:
            details["calibration_passes"] = evidence.passes
        if self.options.reconstruct:
            from prunec.passes.reconstruct import ReconstructOptions, reconstruct_layers

            res = reconstruct_layers(graph, ctx, ReconstructOptions(), user="channels.reconstruct")
            details["reconstruct"] = res.details
            skipped += res.skipped
        return PassResult(True, details, skipped)

    def _scores(self, analysis: ChannelAnalysis, ctx: PassContext, evidence, *, centered: bool) -> np.ndarray:
        kind = self.options.importance
        if kind == "activation":
            return activation_scores(analysis, evidence)
        if kind == "reconstruction":
            scores, _ = reconstruction_scores(analysis, evidence.readers, evidence.patches, centered,
                                              fallback=class_importance(analysis, "l1"))
            return scores
        return class_importance(analysis, kind)

    def _ratios(self, analysis: ChannelAnalysis) -> dict[str, float]:
        o = self.options
        if o.plan is None:
            return {g.id: o.ratio for g in analysis.groups}
        default, plan, round_to = load_plan(o.plan)
        if round_to is not None:
            self._round = round_to
        known = {g.id for g in analysis.groups}
        unknown = sorted(set(plan) - known)
        if unknown:
            raise OptionError(f"channels.plan names unknown group(s): {', '.join(unknown[:5])}; "
                              "group ids are listed by `prunec run --report` (channels.group_table)")
        base = o.ratio if default is None else default
        return {g.id: plan.get(g.id, base) for g in analysis.groups}

    def _resolve_target(self, ctx: PassContext):
        """The target named by the `target` option, else the run's (--runtime ...), else ORT CPU."""
        from prunec.runtime.target import Target

        if self.options.target != "auto":
            return parse_target_key(self.options.target)
        return ctx.target if ctx.target is not None else Target()

    @property
    def _round_to(self) -> int:
        """The channel multiple of groups that are not measured."""
        if hasattr(self, "_round"):
            return self._round
        if self.options.round in ("auto", "measure"):
            return channel_multiple(getattr(self, "_target", None) or "ort-cpu")[0]
        return self.options.round

    @property
    def _round_reason(self) -> str:
        if hasattr(self, "_round"):
            return "the plan's round"
        if self.options.round in ("auto", "measure"):
            return channel_multiple(getattr(self, "_target", None) or "ort-cpu")[1]
        return "channels.round"

    def _select_uniform(self, analysis, scores, ratios) -> dict[str, set[int]]:
        o = self.options
        removed = {}
        measured = getattr(self, "_measured", None) or {}
        for g in analysis.groups:
            if g.frozen:
                continue
            keep = kept_count(g.size, ratios[g.id], minimum=o.min,
                              multiple=class_multiple(self._round_to, analysis.channels_per_class(g)))
            if g.id in measured:
                keep = measured[g.id]["chosen"]
            removed[g.id] = set(_by_score(g.classes, scores)[: g.size - keep])
        return removed

    def _select_global(self, analysis, scores) -> dict[str, set[int]]:
        """Rank classes of all groups together, each score divided by its group's mean."""
        o = self.options
        live = [g for g in analysis.groups if not g.frozen]
        cands = []
        for g in live:
            mean = float(np.mean(scores[g.classes])) or 1.0
            cands += [(scores[c] / mean, c, g.id) for c in g.classes]
        cands.sort()
        budget = math.floor(o.ratio * len(cands) + 1e-9)
        size = {g.id: g.size for g in live}
        floor_keep = {g.id: kept_count(g.size, 0.99999, minimum=o.min, multiple=1) for g in live}
        removed: dict[str, set[int]] = {g.id: set() for g in live}
        for _, c, gid in cands:
            if budget <= 0:
                break
            if size[gid] - len(removed[gid]) - 1 < floor_keep[gid]:
                continue
            removed[gid].add(c)
            budget -= 1
        if self._round_to > 1:  # keep more where needed to land on a multiple of `round`
            for g in live:
                keep = kept_count(g.size, len(removed[g.id]) / g.size, minimum=o.min,
                                  multiple=class_multiple(self._round_to, analysis.channels_per_class(g)))
                order = sorted(removed[g.id], key=lambda c: scores[c])
                removed[g.id] = set(order[: g.size - keep])
        return removed


def _by_score(classes: list[int], scores: np.ndarray) -> list[int]:
    """Classes from least to most important, ties by class id."""
    cl = np.asarray(classes, dtype=np.int64)
    sc = scores[cl]
    if np.isnan(sc).any():  # NaN compares unordered in Python; keep its order exactly
        return sorted(classes, key=lambda c: (scores[c], c))
    return cl[np.lexsort((cl, sc))].tolist()
