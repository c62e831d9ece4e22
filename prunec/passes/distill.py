"""`distill`: train the pruned model's weights to reproduce the original's outputs, without labels.

The teacher is the run's baseline (the model before the first lossy pass, `ctx.baseline`) under
ONNX Runtime, run once over the calibration samples (`ctx.calib`) with its outputs cached on disk
(prunec/passes/teacher.py). The student is the graph this pass receives, run in torch by
prunec/graph/to_torch.py with every float constant of more than one element as a parameter named
after its initializer. After training, the trained values are written back into the same
initializers: names, opset, nodes and interface stay exactly what the earlier passes verified,
and the manager verifies the result like any lossy pass (the accuracy gate then applies).

Loss per output (`loss=auto`): rows that are already probabilities (in [0, 1], summing to 1 over
the last axis) get KL(teacher || student); any other 2-D [N, classes] output is treated as logits,
KL at temperature `temperature`; everything else gets MSE divided by the teacher's mean square,
counted only at real tokens when the model has an integer [N, L] input named like a padding mask
(`attention_mask`) and the output is [N, L, ...].
Optional feature matching adds the same normalized MSE at intermediate tensors that both models
share by name and shape (residual joins, concats, layer norms).

A held-out part of the calibration samples (`holdout`) scores the weights during training; the
best-scoring weights are kept, and if none beats the starting point nothing is changed.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import OptionError, UnsupportedOpError
from prunec.passes.base import Pass, PassContext, PassResult, Skip, option, register

#: Block boundaries whose tensors are worth matching: joins of two computed tensors, concats, norms.
FEATURE_OPS = ("Add", "Concat", "LayerNormalization")
#: The converted student must reproduce ONNX Runtime (basic graph optimizations) this closely
#: before training. A conversion bug is off by far more; a pruned, not yet recovered model can
#: amplify float rounding to ~2e-4 (the PP-OCRv4 recognizer at 36% of MACs removed).
PARITY_RTOL = 1e-3


@register
class Distill(Pass):
    name = "distill"
    summary = ("Knowledge distillation on --calib data (no labels) against the model before the first "
               "lossy pass; trained weights are written back into the same initializers. Needs torch: "
               "pip install 'prunec[distill]'.")
    exact = False

    @dataclass
    class Options:
        seconds: float = option(60.0, "Training budget in seconds of wall clock (a time budget is not "
                                      "bit-reproducible; use steps for that).")
        steps: int = option(0, "Training budget in optimizer steps; when > 0 it replaces `seconds` and "
                               "the result is reproducible with --seed.")
        lr: float = option(1e-3, "Peak learning rate of AdamW (cosine decay to 0 over the budget).")
        weight_decay: float = option(0.0, "AdamW weight decay.")
        batch: int = option(32, "Samples per step (1 when the model's batch size is fixed at 1).")
        loss: Literal["auto", "kl", "mse"] = option("auto", "auto: KL for probabilities and 2-D logits, "
                                                            "MSE otherwise; kl or mse forces one.")
        temperature: float = option(2.0, "Softmax temperature of KL on logits.")
        features: str = option("", "Also match intermediate tensors both models share by name and "
                                   "shape: 'auto' (up to 8 block boundaries), or a comma list of names.")
        feature_weight: float = option(1.0, "Weight of the feature-matching loss against the output loss.")
        holdout: float = option(0.1, "Fraction of the calibration samples kept out of training to pick "
                                     "the best weights (at least 1 sample).")
        threads: int = option(0, "torch intra-op threads on CPU (0: torch's default, one per core; 1 is "
                                 "often faster for small models or on a busy machine).")
        device: Literal["cpu", "auto", "cuda"] = option("cpu", "cpu; auto: a CUDA GPU when torch sees "
                                                               "one; cuda: a GPU or an error.")

        def validate(self) -> None:
            if self.steps < 0 or self.seconds < 0 or (self.steps == 0 and self.seconds == 0):
                raise OptionError("distill needs a budget: distill.seconds > 0 or distill.steps > 0")
            if self.threads < 0:
                raise OptionError(f"distill.threads must be >= 0, got {self.threads}")
            if self.lr <= 0 or self.batch < 1 or self.temperature <= 0:
                raise OptionError("distill.lr, distill.batch and distill.temperature must be positive")
            if not 0 <= self.holdout < 1:
                raise OptionError(f"distill.holdout must be in [0, 1), got {self.holdout}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from prunec.graph.to_torch import convert, require_torch
        from prunec.passes.teacher import TeacherCache, fixed_batch

        torch = require_torch("the distill pass")
        o = self.options
        calib = ctx.require_calib("distill")
        if ctx.baseline is None:
            raise OptionError("distill needs the run's baseline model (run it through the PassManager)")
        device = _device(torch, o.device)
        student = gs.export_onnx(graph.copy(), do_type_check=False)
        for imp in ctx.baseline.opset_import:  # exported graph may list fewer opsets than it uses
            if imp.domain in ("", "ai.onnx") and not any(i.domain in ("", "ai.onnx") for i in student.opset_import):
                student.opset_import.append(imp)
        net = convert(student)
        inputs = {k: np.asarray(calib.inputs[k]) for k in net.input_names if k in calib.inputs}
        missing = [k for k in net.input_names if k not in inputs]
        if missing:
            raise OptionError(f"distill: calibration data has no array for input(s) {', '.join(missing)}")
        n = len(next(iter(inputs.values())))
        rng = np.random.default_rng(ctx.seed)
        order = rng.permutation(n)
        n_hold = max(1, round(n * o.holdout)) if n > 1 and o.holdout > 0 else 0
        hold, train = np.sort(order[:n_hold]), order[n_hold:]
        batch = 1 if fixed_batch(student) == 1 else min(o.batch, len(train))

        mask_name = _mask_input(student)
        features = _feature_names(o.features, student, ctx.baseline)
        teacher = TeacherCache(ctx.baseline, inputs, list(net.output_names) + features, batch=max(batch, 32))
        try:
            _check_parity(net, student, inputs, torch, batch)
            features = _same_shape(features, net, inputs, teacher, torch)
            kinds = {name: _loss_kind(o.loss, teacher.arrays[name]) for name in net.output_names}
            state = _train(net, inputs, teacher, train, hold, kinds, features, o, torch, device,
                           batch, ctx.seed, mask_name)
        finally:
            teacher.close()

        details = {"device": str(device), "samples": {"train": len(train), "holdout": int(n_hold)},
                   "calibration": calib.source, "loss": kinds, "features": features, "mask": mask_name,
                   "teacher_cache_mb": round(teacher.bytes / 2**20, 2), **state["report"]}
        if not state["improved"]:
            return PassResult(False, details, [Skip("distill", "training did not lower the held-out "
                                                               "loss; weights left as they were")])
        written = _write_back(graph, net.param_names, state["best"])
        details["tensors_updated"] = written
        return PassResult(True, details)


def _device(torch, choice: str):
    if choice == "cuda" and not torch.cuda.is_available():
        raise OptionError("distill.device=cuda: torch sees no CUDA device")
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _mask_input(model: onnx.ModelProto) -> str | None:
    """An integer [N, L] input named like a padding mask (`attention_mask`), if the model has one:
    sequence positions it marks 0 are padding and do not count in the loss."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        t = i.type.tensor_type
        if (i.name not in inits and "mask" in i.name.lower() and len(t.shape.dim) == 2
                and t.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)):
            return i.name
    return None


def _feature_names(spec: str, student: onnx.ModelProto, baseline: onnx.ModelProto) -> list[str]:
    """Candidate tensors for feature matching: named, or picked at block boundaries."""
    spec = spec.strip()
    if not spec:
        return []
    teacher_tensors = {o for n in baseline.graph.node for o in n.output}
    student_tensors = {o for n in student.graph.node for o in n.output}
    outputs = {o.name for o in student.graph.output}
    if spec != "auto":
        names = [s.strip() for s in spec.split(",") if s.strip()]
        bad = [s for s in names if s not in teacher_tensors or s not in student_tensors]
        if bad:
            raise OptionError(f"distill.features: not a tensor of both models: {', '.join(bad)}")
        return names
    consts = {t.name for t in student.graph.initializer} | {
        o for n in student.graph.node if n.op_type == "Constant" for o in n.output}
    picked = [n.output[0] for n in student.graph.node
              if n.op_type in FEATURE_OPS and n.output[0] in teacher_tensors and n.output[0] not in outputs
              and not (n.op_type == "Add" and any(i in consts for i in n.input))]
    if len(picked) > 8:
        picked = [picked[round(i * (len(picked) - 1) / 7)] for i in range(8)]
    return list(dict.fromkeys(picked))


def _feeds(inputs: dict[str, np.ndarray], idx: np.ndarray, torch, device) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(device) for k, v in inputs.items()}


def _check_parity(net, student: onnx.ModelProto, inputs, torch, batch: int) -> None:
    """The converted module must reproduce ONNX Runtime on real samples before any training."""
    from prunec.graph.verify import deviation
    from prunec.runtime.session import make_session, run_session

    idx = np.arange(min(batch, len(next(iter(inputs.values())))))
    ref = run_session(make_session(student, optimization="basic"), {k: v[idx] for k, v in inputs.items()})
    with torch.no_grad():
        got = net(_feeds(inputs, idx, torch, "cpu"))
    for name, value in ref.items():
        d = deviation(value, got[name].numpy())
        if not d.rel <= PARITY_RTOL:
            raise UnsupportedOpError(f"distill: the torch conversion does not reproduce output {name!r} "
                                     f"(relative error {d.rel:.3g}); cannot train this graph safely")


def _same_shape(names: list[str], net, inputs, teacher, torch) -> list[str]:
    """Keep the feature tensors whose student shape equals the teacher's (pruned ones differ)."""
    if not names:
        return []
    idx = np.arange(1)
    with torch.no_grad():
        got = net(_feeds(inputs, idx, torch, "cpu"), extra=tuple(names))
    return [n for n in names if tuple(got[n].shape[1:]) == tuple(teacher.arrays[n].shape[1:])]


def _loss_kind(choice: str, teacher_out: np.ndarray) -> str:
    """'prob', 'logits' or 'mse' for one output, from the option and the teacher's values."""
    sample = np.asarray(teacher_out[: min(64, len(teacher_out))], dtype=np.float64)
    is_prob = (sample.ndim >= 2 and sample.shape[-1] > 1 and sample.min() >= 0 and sample.max() <= 1
               and np.allclose(sample.sum(-1), 1.0, atol=1e-3))
    if choice == "mse" or sample.dtype.kind != "f":
        return "mse"
    if is_prob:
        return "prob"
    if choice == "kl" or (sample.ndim == 2 and sample.shape[1] > 1):
        return "logits"
    return "mse"


def _mse(s, t, mask):
    """Mean squared error over the teacher's mean square; with `mask` [N, L] (1 = real token),
    only the positions it marks count, when the tensor is [N, L, ...]."""
    if mask is not None and s.dim() >= 2 and tuple(s.shape[:2]) == tuple(mask.shape):
        m = mask.reshape(*mask.shape, *([1] * (s.dim() - 2))).to(s.dtype)
        n = m.sum().clamp_min(1) * (s[0, 0].numel())
        return (m * (s - t) ** 2).sum() / n / ((m * t ** 2).sum() / n).clamp_min(1e-12)
    return ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)


def _loss(kinds, features, net_out, target, o, torch, mask=None):
    F = torch.nn.functional
    total = 0.0
    for name, kind in kinds.items():
        s, t = net_out[name], target[name]
        if kind == "prob":
            log_s = torch.log(s.clamp_min(1e-8))
            total = total + (t * (torch.log(t.clamp_min(1e-8)) - log_s)).sum(-1).mean()
        elif kind == "logits":
            T = o.temperature
            total = total + F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                                     log_target=True, reduction="batchmean") * T * T
        else:
            total = total + _mse(s, t, mask)
    for name in features:
        total = total + o.feature_weight / len(features) * _mse(net_out[name], target[name], mask)
    return total


class _Progress:
    """A rich progress bar on a terminal, a plain line every few seconds otherwise (logs, CI)."""

    def __init__(self, total: float, unit: str):
        self.total, self.unit, self.last = total, unit, 0.0
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("distill"), BarColumn(), TextColumn("{task.description}"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def update(self, done: float, step: int, loss: float, held: float | None) -> None:
        text = f"step {step} loss {loss:.4g}" + (f" held-out {held:.4g}" if held is not None else "")
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=text)
        elif time.monotonic() - self.last >= 5.0:
            self.last = time.monotonic()
            print(f"distill: {done:.0f}/{self.total:.0f} {self.unit}, {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _train(net, inputs, teacher, train, hold, kinds, features, o, torch, device, batch, seed,
           mask_name=None) -> dict:
    """AdamW with cosine decay over the budget; returns the best held-out weights and a report."""
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(o.threads)
    torch.manual_seed(seed)
    if device.type == "cuda":  # CPU kernels are deterministic at a fixed thread count already
        torch.use_deterministic_algorithms(True, warn_only=True)
    net.to(device)
    params = [p for p in net.parameters()]
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    extra = tuple(features)
    rng = np.random.default_rng(seed + 1)  # data order: one seeded generator, one thread

    def held_out() -> float | None:
        if len(hold) == 0:
            return None
        net.eval()
        total = 0.0
        with torch.no_grad():
            for s in range(0, len(hold), batch):
                idx = hold[s:s + batch]
                feeds = _feeds(inputs, idx, torch, device)
                out = net(feeds, extra=extra)
                tgt = {k: torch.from_numpy(v).to(device) for k, v in teacher.take(idx).items()}
                total += float(_loss(kinds, features, out, tgt, o, torch, feeds.get(mask_name))) * len(idx)
        return total / len(hold)

    def snapshot():
        return {k: v.detach().clone() for k, v in net.params.items()}

    by_steps = o.steps > 0
    budget = float(o.steps if by_steps else o.seconds)
    start_loss = held_out()
    best, best_loss, best_step = snapshot(), start_loss, 0
    history = [(0, start_loss)]
    progress = _Progress(budget, "steps" if by_steps else "s")
    t0 = time.perf_counter()
    step, perm, pos, loss_value = 0, rng.permutation(train), 0, float("nan")
    next_eval = budget / 10
    try:
        while True:
            done = step if by_steps else time.perf_counter() - t0
            if done >= budget:
                break
            frac = min(done / budget, 1.0)
            for g in opt.param_groups:
                g["lr"] = o.lr * 0.5 * (1 + math.cos(math.pi * frac))
            if pos + batch > len(perm):
                perm, pos = rng.permutation(train), 0
            idx = np.sort(perm[pos:pos + batch])
            pos += batch
            net.train()
            feeds = _feeds(inputs, idx, torch, device)
            out = net(feeds, extra=extra)
            tgt = {k: torch.from_numpy(v).to(device) for k, v in teacher.take(idx).items()}
            loss = _loss(kinds, features, out, tgt, o, torch, feeds.get(mask_name))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_value = float(loss.detach())
            done = step if by_steps else time.perf_counter() - t0
            held = None
            if done >= next_eval or done >= budget:
                next_eval += budget / 10
                held = held_out()
                history.append((step, held))
                if held is not None and (best_loss is None or held < best_loss):
                    best, best_loss, best_step = snapshot(), held, step
            progress.update(min(done, budget), step, loss_value, held)
    finally:
        progress.close()
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
    if len(hold) == 0:  # nothing to choose with: keep the last weights
        best, best_step = snapshot(), step
    improved = best_step > 0 and (start_loss is None or best_loss < start_loss)
    report = {"steps": step, "seconds": round(time.perf_counter() - t0, 2), "batch": batch, "lr": o.lr,
              "held_out_loss": {"start": start_loss, "best": best_loss, "best_step": best_step},
              "history": [{"step": s, "held_out": h} for s, h in history]}
    return {"best": {k: v.cpu() for k, v in best.items()}, "improved": improved, "report": report}


def _write_back(graph: gs.Graph, param_names: dict[str, str], best: dict) -> int:
    """Write the chosen weights (`best`, by parameter key) into the graph's constants by ONNX
    name (`param_names`: ONNX name -> key); returns how many tensors were written."""
    tensors = graph.tensors()
    for name, key in param_names.items():
        value = best[key].numpy()
        t = tensors[name]
        if isinstance(t, gs.Constant):
            t.values = value.astype(t.dtype, copy=False)
        else:  # produced by a Constant node
            node = t.inputs[0]
            old = node.attrs["value"]
            node.attrs["value"] = gs.Constant(old.name, value.astype(old.dtype, copy=False))
    return len(param_names)
