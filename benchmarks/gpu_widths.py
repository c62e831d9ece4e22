"""Write benchmarks/gpu_widths.json: the widths prunec keeps on gpu_sparse.py's models.

Runs on a CPU machine with prunec and torch (no torchvision): exports gpu_sparse.py's ResNet-50
and BERT-base-size encoder to ONNX, prunes each with `channels` at ratio 0.3 and 0.5 for target
tensorrt-fp16 (round=auto: multiples of 8), verifies the run like `prunec run` does, and records
every conv's / linear's output width in execution order, which is how gpu_sparse.py builds the
pruned models on the GPU machine without ONNX or prunec.

    PYTHONPATH=. python benchmarks/gpu_widths.py          # about 1 minute on 2 cores
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_sparse import Encoder, ResNet50, bert_widths, resnet50_widths  # noqa: E402

from prunec.passes import PassContext, PassManager, build_passes  # noqa: E402
from prunec.runtime.target import Target  # noqa: E402


def export(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    f = io.BytesIO()
    torch.onnx.export(model.eval(), (example,), f, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    return onnx.load_from_string(f.getvalue())


def out_widths(model: onnx.ModelProto, order: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Output width of every Conv and constant-weight MatMul/Gemm, in graph order (or in the
    node-name `order` of the exported model: a rewrite may sort nodes differently), and the names."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    widths = {}
    for n in model.graph.node:
        if n.op_type == "Conv":
            widths[n.name] = int(inits[n.input[1]].shape[0])
        elif n.op_type == "MatMul" and n.input[1] in inits:
            widths[n.name] = int(inits[n.input[1]].shape[1])
        elif n.op_type == "Gemm" and n.input[1] in inits:
            w = inits[n.input[1]]
            widths[n.name] = int(w.shape[0] if any(a.name == "transB" and a.i for a in n.attribute) else w.shape[1])
    names = order or list(widths)
    return [widths[k] for k in names], names


def main() -> None:
    torch.manual_seed(0)
    target = Target("tensorrt", precision="fp16")
    cases = {"resnet50": (ResNet50(), torch.randn(1, 3, 224, 224), resnet50_widths() + [1000]),
             "bert": (Encoder(), torch.randn(1, 128, 768), bert_widths())}
    doc = {"source": f"prunec channels, importance l1, round=auto for target {target.key}, random weights "
                     f"(seed 0), {time.strftime('%Y-%m-%d')}"}
    for name, (model, x, expected) in cases.items():
        base = export(model, x)
        got, order = out_widths(base)
        if got != expected:
            raise SystemExit(f"{name}: exported widths {got[:8]}... do not follow gpu_sparse.py's order")
        doc[name] = {}
        for ratio in ("0.3", "0.5"):
            passes = build_passes(["channels"], {"channels": {"ratio": ratio}})
            pruned, report = PassManager(passes, ctx=PassContext(target=target)).run(base)
            d = report.passes[0].result.details
            widths = out_widths(pruned, order)[0][: len(expected) - (1 if name == "resnet50" else 0)]
            doc[name][ratio] = widths
            frozen = sorted({g["frozen"] for g in d["group_table"] if g["frozen"]})
            print(f"{name} {ratio}: round {d['round']} ({d['target']}), groups {d['groups']} "
                  f"({d['groups_frozen']} frozen: {frozen[:3]}), MACs {report.before.macs:,} -> {report.after.macs:,}")
    (HERE / "gpu_widths.json").write_text(json.dumps(doc, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {HERE / 'gpu_widths.json'}")


if __name__ == "__main__":
    main()
