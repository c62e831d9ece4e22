"""`heads`: remove whole attention heads, as a graph rewrite.

The channel analysis in heads mode (`prunec.graph.channel_core.Mode`) finds them without a
pattern matcher: where a projection's channel axis is split into `[heads, head_dim]`, each row
(a head) is coupled instead of each column, so one class holds a head's rows in Q, K and V and
their biases, the out-projection's input rows that read it, and every shape constant that
counts heads; Q·Kᵀ marks the classes that are heads. A grouped-query layer's class is a KV
group with its query heads. Removal is the channel removal: weight slices, then fix-ups of
Reshape/Expand shape vectors and of fused attention ops' `num_heads`. The out-projection stays
an ordinary MatMul/Gemm reader, so a later refit (reconstruct) can re-fit it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs

from prunec.errors import BreakingChange, OptionError
from prunec.graph.channel_core import INTERFACE, Mode
from prunec.graph.channels import analyze_channels, apply_removal, head_groups, interface_changes, kept_indices
from prunec.graph.fold import fold_constants
from prunec.graph.proof import masked_reference
from prunec.passes.base import Pass, PassContext, PassResult, Skip, check_regex, option, register
from prunec.passes.channel_recovery import lost_channels
from prunec.passes.channels import kept_count
from prunec.passes.head_importance import choose


@dataclass
class HeadsOptions:
    ratio: float = option(0.25, "fraction of each attention layer's heads to remove (floor(n*ratio), "
                                "never all); grouped-query attention removes KV groups with their "
                                "query heads")
    min_heads: int = option(1, "keep at least this many heads (KV groups) in every layer")
    importance: Literal["l1", "activation", "output", "reconstruction"] = option(
        "l1", "head importance: L1 of its Q/K/V rows, biases and out-projection inputs; or on calibration "
              "data (--data), at the out-projection: mean |head output| (activation), the output energy "
              "the head contributes (output), or what removing it loses once the out-projection is "
              "re-fitted by least squares as `reconstruct` does (reconstruction; chosen greedily)")
    protect: str | None = option(None, "regex of Q/K/V producer node names whose heads are never removed")
    fold_constants: bool = option(True, "fold constant subgraphs first so shape arithmetic on static "
                                        "dims becomes readable shape constants")

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise OptionError(f"heads.ratio must be in [0, 1), got {self.ratio}")
        if self.min_heads < 1:
            raise OptionError("heads.min-heads must be at least 1")
        check_regex("heads.protect", self.protect)


@register
class HeadPruning(Pass):
    name = "heads"
    summary = "Remove whole attention heads (KV groups for grouped-query attention) from every weight at once."
    exact = False
    Options = HeadsOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o: HeadsOptions = self.options
        if o.fold_constants:
            fold_constants(graph, ctx.input_shapes or None)
        mode = Mode(heads=True, interface=ctx.allow_interface_change)
        analysis = analyze_channels(graph, input_shapes=ctx.input_shapes or None, protect=o.protect,
                                    mode=mode)
        groups = head_groups(analysis)
        blocked = [g for g in groups if g.frozen and INTERFACE in g.frozen]
        if blocked and o.ratio > 0:
            raise BreakingChange(
                f"heads: removing heads would change the model's interface ({blocked[0].frozen.split(':')[0]}"
                f"{' and more' if len(blocked) > 1 else ''}): a KV cache or output carries the head "
                "count. Pass --allow-interface-change to prune them anyway (the diff flags it BREAKING)")
        live = [g for g in groups if not g.frozen]
        counts = {g.id: g.size - kept_count(g.size, o.ratio, minimum=o.min_heads) for g in live}
        calib = ctx.require_calib(f"heads.importance={o.importance}") \
            if o.importance != "l1" and any(counts.values()) else None
        removed = choose(analysis, [g for g in live if counts[g.id]], counts, o.importance, calib) \
            if any(counts.values()) else {}
        classes = set().union(*removed.values()) if removed else set()
        interface = interface_changes(analysis, classes)
        # The proof: the model before the pass with the removed heads masked where they are read
        # (the out-projection's rows, Q·Kᵀ) must compute what the pruned model computes.
        reference = masked_reference(analysis, classes) if classes else None
        kept = kept_indices(analysis, classes)
        stats = apply_removal(analysis, classes)
        # What survived, relative to the run's baseline: `reconstruct` re-fits the layers that read
        # a tensor which lost channels (the output projections), and finds them by this.
        ctx.record_kept(lost_channels(analysis, kept))
        table, skipped = [], []
        for g in groups:
            n = len(removed.get(g.id, ()))
            table.append({"id": g.id, "size": g.size, "kept": g.size - n,
                          "channels_per_class": analysis.channels_per_class(g),
                          "producers": g.producers, "layers": g.layers, "frozen": g.frozen})
            if g.frozen:
                skipped.append(Skip(f"attention {g.id} ({g.size} heads)", g.frozen))
        notes = [f"interface changed (BREAKING): {name} axis {ax} keeps {len(idx)}"
                 for name, axes in interface.items() for ax, idx in axes.items()]
        if not groups:
            notes.append("no attention heads found (no Q·Kᵀ product over a head axis)")
        return PassResult(
            changed=bool(classes),
            details={"layers": len(groups), "layers_pruned": sum(1 for v in removed.values() if v),
                     "layers_frozen": sum(1 for g in groups if g.frozen),
                     "heads_total": sum(g.size for g in groups), "heads_removed": len(classes),
                     "importance": o.importance, **stats, "group_table": table},
            skipped=skipped, interface=interface, notes=notes, reference=reference)
