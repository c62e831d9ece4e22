"""Train and export the bundled demo model: a small residual CNN on scikit-learn's digits.

Writes, next to this script:
  demo_cnn.onnx            the model (opset 17, BatchNormalization kept, dynamic batch axis)
  demo_digits_test.npz     held-out split: `image` [N,1,8,8] float32 and `labels` [N] int64
  demo_digits_train.npz    training split, same layout (for calibration and fine-tuning)

The network has what prunec's passes must handle: a stem Conv+BN, residual blocks with BN
(one with a 1x1 projection shortcut where the channel count changes), a concat branch,
global average pooling and a Gemm classifier. Seeded; about 3 minutes on 2 CPU cores.
Needs torch and scikit-learn only here (`pip install -e '.[demo]'`), not at run time.

    python models/make_demo.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SEED = 0
INPUT = "image"
OUTPUT = "logits"
OPSET = 17
TEST_FRACTION = 0.3


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits data as [N,1,8,8] float32 in [0,1], split 70/30 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y,
                                              random_state=SEED)
    return x_tr, x_te, y_tr, y_te


def build_model():
    """Stem, two residual blocks (identity and projection), a concat branch, a third block, GAP, Gemm."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))

    class Block(nn.Module):
        """Basic residual block; a 1x1 Conv+BN projection when shape changes."""

        def __init__(self, cin: int, cout: int, stride: int = 1):
            super().__init__()
            self.a = conv_bn(cin, cout, 3, stride)
            self.b = conv_bn(cout, cout, 3)
            self.proj = conv_bn(cin, cout, 1, stride) if (cin != cout or stride != 1) else None

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.relu(y + (self.proj(x) if self.proj is not None else x))

    class Mixed(nn.Module):
        """Two branches (3x3 and 1x1) concatenated on channels."""

        def __init__(self, cin: int, c3: int, c1: int):
            super().__init__()
            self.b3 = conv_bn(cin, c3, 3)
            self.b1 = conv_bn(cin, c1, 1)

        def forward(self, x):
            return torch.cat([torch.relu(self.b3(x)), torch.relu(self.b1(x))], dim=1)

    class DemoCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(1, 16, 3)
            self.block1 = Block(16, 16)
            self.block2 = Block(16, 32, stride=2)
            self.mixed = Mixed(32, 32, 16)
            self.block3 = Block(48, 64)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = self.block3(self.mixed(self.block2(self.block1(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    return DemoCNN()


def train(model, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int = SEED) -> None:
    """Adam with a cosine schedule and small random shifts as augmentation."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(xt) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            xb = xt[idx]
            # Shift by up to one pixel: cheap augmentation that helps on 8x8 digits.
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(axis=1) == labels).mean())


def export(model, path: Path, example) -> None:
    """Legacy TorchScript exporter, BatchNormalization kept as nodes, dynamic batch."""
    import warnings

    import torch

    with warnings.catch_warnings():
        # The legacy exporter is deprecated but is the one that keeps BatchNormalization nodes.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False, opset_version=OPSET, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
        )


def main() -> None:
    """Train, export, check the export against torch, write the data splits, print accuracy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import torch

    t0 = time.time()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    x_tr, x_te, y_tr, y_te = load_split()
    model = build_model()
    train(model, x_tr, y_tr, epochs=args.epochs)

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_te)).numpy()
    acc = accuracy(torch_logits, y_te)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "demo_cnn.onnx"
    export(model, onnx_path, torch.from_numpy(x_te[:2]))
    m = onnx.load(str(onnx_path))
    onnx.checker.check_model(m, full_check=True)
    ops = sorted({n.op_type for n in m.graph.node})
    assert "BatchNormalization" in ops and "Concat" in ops and "Gemm" in ops, ops

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run([OUTPUT], {INPUT: x_te})[0]
    err = float(np.max(np.abs(ort_logits - torch_logits)) / np.max(np.abs(torch_logits)))
    if err > 1e-5:
        raise SystemExit(f"exported model differs from torch: relative error {err:.3g}")
    ort_acc = accuracy(ort_logits, y_te)

    np.savez_compressed(args.out_dir / "demo_digits_test.npz", **{INPUT: x_te, "labels": y_te})
    np.savez_compressed(args.out_dir / "demo_digits_train.npz", **{INPUT: x_tr, "labels": y_tr})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo_cnn.onnx: {onnx_path.stat().st_size} bytes, {len(m.graph.node)} nodes, "
          f"{n_params} params, ops {', '.join(ops)}")
    print(f"train {len(y_tr)} / test {len(y_te)} samples; onnxruntime vs torch rel err {err:.2g}")
    print(f"test accuracy: torch {acc:.4f}, onnxruntime {ort_acc:.4f} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
