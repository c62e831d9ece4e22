"""A zoo of small torch CNNs with hand-built zero-channel oracles, for testing channel pruning.

Every model declares, next to its `forward`, how channels flow through it (`chan(tr, t)`), using
a tiny channel tracker written here from the torch modules alone (never from prunec's analysis).
The tracker unites coupled channels (atoms) into removable channels and those into groups (the
channels of the producers that share them); `make_oracle` then picks a random half of every
prunable group, zeroes every weight slice that produces or reads those channels in the WIDE
model (so removing them cannot change any output), and builds the NARROW model that keeps only
the other channels, its weights sliced from the wide one.
"""
from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Channel tracker
# --------------------------------------------------------------------------------------------

WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.InstanceNorm2d, nn.PReLU)
PER_CHANNEL = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.PReLU)

#: The channels of a tensor: one atom id per channel. Coupled atoms are united (union-find);
#: a class of united atoms is one removable channel.
Layout = np.ndarray


@dataclass
class Touch:
    """Channel k of `atoms` is channel mod_off+k of `module` in `role`."""
    role: str        # "out" (rows, bias, BN params), "in" (consumer columns), "dw" (both)
    module: nn.Module
    mod_off: int
    atoms: np.ndarray
    block: int = 1   # Linear after Flatten: one channel is `block` contiguous features


class Tracker:
    """Records which channels are coupled and which weight slices touch them."""

    def __init__(self):
        self.parent: list[int] = []
        self.touches: list[Touch] = []
        self.frozen: dict[int, list[str]] = {}
        self.pieces: list[np.ndarray] = []        # atom sets that must each lose exactly half
        self.producers: list[tuple[nn.Module | None, np.ndarray]] = []  # None: graph input

    # -- atoms --------------------------------------------------------------------------------
    def new(self, n: int) -> Layout:
        """n fresh channels."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def input(self, n: int) -> Layout:
        """Channels of a graph input: never removable."""
        t = self.new(n)
        self.freeze(t, "graph input")
        self.producers.append((None, t))
        return t

    def freeze(self, t: Layout, why: str) -> None:
        """These channels (and every channel of their producers) are not removable."""
        for a in t:
            self.frozen.setdefault(int(a), []).append(why)

    # -- tensor ops ---------------------------------------------------------------------------
    def join(self, a: Layout, b: Layout) -> Layout:
        """Element-wise op of two tensors with the same channels (Add, Mul, SE excitation)."""
        assert len(a) == len(b), "join of tensors with different channel counts"
        for x, y in zip(a, b):
            self.union(x, y)
        return a

    @staticmethod
    def cat(*ts: Layout) -> Layout:
        """Concat on the channel axis."""
        return np.concatenate(ts)

    def split(self, t: Layout, sizes: list[int]) -> list[Layout]:
        """Split/chunk on the channel axis; the oracle removes half of each part."""
        parts = np.split(t, np.cumsum(sizes)[:-1])
        self.pieces.extend(parts)
        return parts

    def shuffle(self, t: Layout, groups: int) -> Layout:
        """Channel shuffle (Reshape [g, C/g] -> Transpose -> Reshape). It only permutes
        channels, but the Reshape needs every one of the g parts to keep the same channels:
        position i is one removable channel across the parts."""
        parts = t.reshape(groups, -1)
        for k in range(1, groups):
            self.join(parts[0], parts[k])
        self.pieces.extend(parts)
        return parts.T.reshape(-1)

    # -- weight slices ------------------------------------------------------------------------
    def out(self, mod: nn.Module) -> Layout:
        """A producer (Conv/ConvTranspose/Linear): its output channels are new."""
        n = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        t = self.new(n)
        self.touches.append(Touch("out", mod, 0, t))
        self.producers.append((mod, t))
        return t

    def norm(self, t: Layout, mod: nn.Module) -> Layout:
        """A per-channel parameter module (BatchNorm, InstanceNorm, PReLU) on t."""
        self.touches.append(Touch("out", mod, 0, t))
        return t

    def consume(self, t: Layout, mod: nn.Module, block: int = 1) -> None:
        """A consumer reads t on its input channels (Conv columns, Linear features in blocks)."""
        self.touches.append(Touch("in", mod, 0, t, block))

    def conv(self, t: Layout, mod: nn.Module) -> Layout:
        """A Conv/ConvTranspose/Linear reading t. A depthwise conv keeps t's channels; a grouped
        conv must keep the same count in every conv group: like prunec, the oracle couples
        position j of every conv group (a pruner that only equalizes counts finds it too)."""
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            if mod.groups == mod.in_channels == mod.out_channels:
                self.touches.append(Touch("dw", mod, 0, t))
                return t
            self.shuffle(t, mod.groups)   # couples position j across conv groups
            self.consume(t, mod)
            o = self.out(mod)
            self.shuffle(o, mod.groups)
            return o
        self.consume(t, mod)
        return self.out(mod)


# --------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------

@dataclass
class Oracle:
    """The zeroed wide model, the narrow model, and what the oracle decided per group."""
    wide: nn.Module
    narrow: nn.Module
    original: nn.Module   # the wide model before zeroing (a control: zeroing must matter)
    groups: list[dict] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(g["removed"] for g in self.groups)


def n_params(m: nn.Module) -> int:
    """Parameter count of a torch module."""
    return sum(p.numel() for p in m.parameters())


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, BN with non-trivial running statistics (no two tensors equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / np.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)):
                n = m.weight.shape
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.1 + 0.3 * torch.rand(m.weight.shape, generator=g))
    return model.eval()


def make_oracle(model: nn.Module, in_channels: int, seed: int) -> Oracle:
    """Zero a random half of every prunable group of `model` and build the narrow model."""
    original = copy.deepcopy(model)
    tr = Tracker()
    model.chan(tr, tr.input(in_channels))
    names = {id(m): n for n, m in model.named_modules()}
    rng = np.random.default_rng(seed)

    # A group: the classes (removable channels) of the producers that share them.
    cls = np.array([tr.find(a) for a in range(len(tr.parent))])
    owner = {c: c for c in set(cls.tolist())}

    def root(c: int) -> int:
        while owner[c] != c:
            c = owner[c]
        return c
    for _, atoms in tr.producers:
        cs = sorted({int(cls[a]) for a in atoms})
        for c in cs[1:]:
            ra, rb = root(cs[0]), root(c)
            if ra != rb:
                owner[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for c in sorted(owner):
        groups.setdefault(root(c), []).append(c)
    gname = {}
    for mod, atoms in reversed(tr.producers):
        gname[root(int(cls[atoms[0]]))] = names[id(mod)] if mod is not None else "input"
    frozen: dict[int, list[str]] = {}
    for a, why in tr.frozen.items():
        frozen.setdefault(root(int(cls[a])), []).extend(why)

    # Zero half of every cell: classes of a group that lie in the same split parts, so every
    # Split/shuffle part loses exactly half (the pruner removes floor(n/2) per group).
    pieces = [{int(c) for c in cls[p]} for p in tr.pieces]
    zero: set[int] = set()
    info = []
    for g, members in groups.items():
        z: list[int] = []
        if g not in frozen:
            cells: dict[tuple, list[int]] = {}
            for c in members:
                cells.setdefault(tuple(i for i, p in enumerate(pieces) if c in p), []).append(c)
            for cell in cells.values():
                z += [int(c) for c in rng.choice(cell, len(cell) // 2, replace=False)]
            assert len(z) == len(members) // 2, f"group {gname.get(g)}: odd cells"
        zero |= set(z)
        info.append({"name": gname.get(g, "input"), "n": len(members), "removed": len(z),
                     "frozen": sorted(set(frozen.get(g, [])))})

    # Per (module, axis): channel index -> zeroed?  Every channel must be covered exactly once.
    cover: dict[tuple[int, str], dict[int, bool]] = {}
    blocks: dict[int, int] = {}
    for tc in tr.touches:
        axes = ("out", "in") if tc.role == "dw" else (tc.role,)
        for ax in axes:
            d = cover.setdefault((id(tc.module), ax), {})
            for k, a in enumerate(tc.atoms):
                idx = tc.mod_off + k
                assert idx not in d, f"{names[id(tc.module)]} {ax} channel {idx} touched twice"
                d[idx] = int(cls[a]) in zero
        if tc.role == "in":
            blocks[id(tc.module)] = tc.block

    wide = model
    narrow = copy.deepcopy(model)
    nmods = dict(narrow.named_modules())
    with torch.no_grad():
        for name, m in wide.named_modules():
            if not isinstance(m, WEIGHTED):
                continue
            if isinstance(m, nn.PReLU):
                n_out, n_in = m.num_parameters, None
            elif isinstance(m, PER_CHANNEL):
                n_out, n_in = m.num_features, None
            elif isinstance(m, nn.Linear):
                n_out, n_in = m.out_features, m.in_features // blocks.get(id(m), 1)
            else:
                n_out, n_in = m.out_channels, m.in_channels
            zo = cover.get((id(m), "out"), {})
            assert sorted(zo) == list(range(n_out)), f"{name}: output channels not all tracked"
            zi = None
            if n_in is not None:
                zi = cover.get((id(m), "in"), {})
                assert sorted(zi) == list(range(n_in)), f"{name}: input channels not all tracked"
            _zero_and_slice(m, nmods[name], zo, zi, blocks.get(id(m), 1))
    return Oracle(wide.eval(), narrow.eval(), original.eval(), info)


def _zero_and_slice(m: nn.Module, nm: nn.Module, zo: dict[int, bool], zi: dict[int, bool] | None,
                    block: int) -> None:
    """Zero the oracle channels of wide module m in place; slice the kept ones into nm."""
    ko = torch.tensor([i for i in sorted(zo) if not zo[i]])
    zo_idx = torch.tensor([i for i in sorted(zo) if zo[i]], dtype=torch.long)
    if isinstance(m, nn.PReLU):
        m.weight[zo_idx] = 0           # PReLU(0) = 0 whatever the slope; zero it for L1
        nm.weight = nn.Parameter(m.weight[ko].clone())
        nm.num_parameters = len(ko)
        return
    if isinstance(m, PER_CHANNEL):     # gamma = beta = 0: the normalized channel is exactly 0
        m.weight[zo_idx] = 0
        m.bias[zo_idx] = 0
        for a in ("weight", "bias"):
            setattr(nm, a, nn.Parameter(getattr(m, a)[ko].clone()))
        for a in ("running_mean", "running_var"):
            if getattr(m, a, None) is not None:
                setattr(nm, a, getattr(m, a)[ko].clone())
        nm.num_features = len(ko)
        return
    ki = torch.tensor([i for i in sorted(zi) if not zi[i]])
    zi_idx = torch.tensor([i for i in sorted(zi) if zi[i]], dtype=torch.long)
    w = m.weight
    if m.bias is not None:
        m.bias[zo_idx] = 0
        nm.bias = nn.Parameter(m.bias[ko].clone())
    if isinstance(m, nn.Linear):
        fi = (zi_idx[:, None] * block + torch.arange(block)).reshape(-1)
        fk = (ki[:, None] * block + torch.arange(block)).reshape(-1)
        w[zo_idx] = 0
        w[:, fi] = 0
        nm.weight = nn.Parameter(w[ko][:, fk].clone())
        nm.in_features, nm.out_features = len(fk), len(ko)
        return
    if isinstance(m, nn.ConvTranspose2d):
        assert m.groups == 1
        w[zi_idx] = 0
        w[:, zo_idx] = 0
        nm.weight = nn.Parameter(w[ki][:, ko].clone())
        nm.in_channels, nm.out_channels = len(ki), len(ko)
        return
    g = m.groups
    if g == 1:
        w[zo_idx] = 0
        w[:, zi_idx] = 0
        nm.weight = nn.Parameter(w[ko][:, ki].clone())
    elif g == m.in_channels == m.out_channels:       # depthwise: in and out are one channel
        assert torch.equal(ko, ki)
        w[zo_idx] = 0
        nm.weight = nn.Parameter(w[ko].clone())
        nm.groups = len(ko)
    else:                                           # grouped: equal counts kept per conv group
        ipg, opg = m.in_channels // g, m.out_channels // g
        w[zo_idx] = 0
        for j in zi_idx.tolist():
            w[(j // ipg) * opg:(j // ipg + 1) * opg, j % ipg] = 0
        kin = [[j % ipg for j in ki.tolist() if j // ipg == gi] for gi in range(g)]
        kout = [[r for r in ko.tolist() if r // opg == gi] for gi in range(g)]
        assert len({len(k) for k in kin}) == 1 and len({len(k) for k in kout}) == 1, \
            "grouped conv: unequal kept counts per conv group"
        rows = [w[r][kin[r // opg]] for r in ko.tolist()]
        nm.weight = nn.Parameter(torch.stack(rows).clone())
    nm.in_channels, nm.out_channels = len(ki), len(ko)


def coupled_slices(model: nn.Module, in_channels: int = 3
                   ) -> tuple[Tracker, dict[int, set[tuple[str, str, int]]], set[int]]:
    """For each removable channel (class): the (module name, "out"|"in", index) slices it
    touches, Linear inputs expanded to features; plus the frozen classes. For cross-checks."""
    tr = Tracker()
    model.chan(tr, tr.input(in_channels))
    names = {id(m): n for n, m in model.named_modules()}
    by_class: dict[int, set[tuple[str, str, int]]] = {}
    for tc in tr.touches:
        ax = "in" if tc.role == "in" else "out"
        for k, a in enumerate(tc.atoms):
            idx = tc.mod_off + k
            s = by_class.setdefault(tr.find(int(a)), set())
            s.update((names[id(tc.module)], ax, idx * tc.block + j)
                     for j in range(tc.block if ax == "in" else 1))
    return tr, by_class, {tr.find(a) for a in tr.frozen}


# --------------------------------------------------------------------------------------------
# Building blocks (each with forward and chan)
# --------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    """Conv (bias-free) + BN + activation, the unit of most CNNs."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1,
                 act: Callable[[], nn.Module] | None = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def chan(self, tr: Tracker, t: Layout) -> Layout:
        return tr.norm(tr.conv(t, self.conv), self.bn)


class Seq(nn.Sequential):
    """nn.Sequential whose children all have `chan`."""

    def chan(self, tr: Tracker, t: Layout) -> Layout:
        for m in self:
            t = m.chan(tr, t) if hasattr(m, "chan") else t  # others pass channels through
        return t


class ClassifierHead(nn.Module):
    """Global average pool -> Flatten -> Linear; the logits are a graph output."""

    def __init__(self, c: int, classes: int = 10, hidden: int = 0, act=nn.ReLU):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden) if hidden else None
        self.act = act() if hidden else None
        self.fc = nn.Linear(hidden or c, classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.fc1 is not None:
            x = self.act(self.fc1(x))
        return self.fc(x)

    def chan(self, tr, t):
        if self.fc1 is not None:
            t = tr.conv(t, self.fc1)
        t = tr.conv(t, self.fc)
        tr.freeze(t, "graph output")
        return t


class ConvHead(nn.Module):
    """A 1x1 conv whose output is a graph output (dense prediction)."""

    def __init__(self, c: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(c, k, 1)

    def forward(self, x):
        return self.conv(x)

    def chan(self, tr, t):
        t = tr.conv(t, self.conv)
        tr.freeze(t, "graph output")
        return t


class BasicBlock(nn.Module):
    """ResNet basic block; projection shortcut when shape changes."""

    def __init__(self, cin: int, cout: int, s: int = 1):
        super().__init__()
        self.c1 = ConvBN(cin, cout, 3, s)
        self.c2 = ConvBN(cout, cout, 3, 1, act=None)
        self.proj = ConvBN(cin, cout, 1, s, act=None) if (s != 1 or cin != cout) else None

    def forward(self, x):
        sc = self.proj(x) if self.proj is not None else x
        return F.relu(self.c2(self.c1(x)) + sc)

    def chan(self, tr, t):
        sc = self.proj.chan(tr, t) if self.proj is not None else t
        return tr.join(self.c2.chan(tr, self.c1.chan(tr, t)), sc)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1-3x3-1x1); `groups` > 1 makes it a ResNeXt block."""

    def __init__(self, cin: int, mid: int, cout: int, s: int = 1, groups: int = 1):
        super().__init__()
        self.c1 = ConvBN(cin, mid, 1)
        self.c2 = ConvBN(mid, mid, 3, s, groups=groups)
        self.c3 = ConvBN(mid, cout, 1, act=None)
        self.proj = ConvBN(cin, cout, 1, s, act=None) if (s != 1 or cin != cout) else None

    def forward(self, x):
        sc = self.proj(x) if self.proj is not None else x
        return F.relu(self.c3(self.c2(self.c1(x))) + sc)

    def chan(self, tr, t):
        sc = self.proj.chan(tr, t) if self.proj is not None else t
        y = self.c2.chan(tr, self.c1.chan(tr, t))
        return tr.join(self.c3.chan(tr, y), sc)


class SE(nn.Module):
    """Squeeze-and-excitation: GAP -> 1x1 conv -> act -> 1x1 conv -> gate -> Mul."""

    def __init__(self, c: int, squeeze: int, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))

    def chan(self, tr, t):
        h = tr.conv(t, self.fc1)
        e = tr.conv(h, self.fc2)
        return tr.join(t, e)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 and EfficientNet MBConv: expand 1x1, depthwise kxk, optional SE, project."""

    def __init__(self, cin: int, cout: int, expand: int, s: int = 1, k: int = 3, act=nn.ReLU6,
                 se: int = 0, se_act=nn.ReLU, se_gate=nn.Hardsigmoid):
        super().__init__()
        hid = cin * expand
        self.expand = ConvBN(cin, hid, 1, act=act) if expand != 1 else None
        self.dw = ConvBN(hid, hid, k, s, groups=hid, act=act)
        self.se = SE(hid, se, se_act, se_gate) if se else None
        self.project = ConvBN(hid, cout, 1, act=None)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y

    def chan(self, tr, t):
        y = self.expand.chan(tr, t) if self.expand is not None else t
        y = self.dw.chan(tr, y)
        if self.se is not None:
            y = self.se.chan(tr, y)
        y = self.project.chan(tr, y)
        return tr.join(t, y) if self.residual else y


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, pre-activation on the Concat."""

    def __init__(self, cin: int, growth: int, bottleneck: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bottleneck, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(y)))

    def chan(self, tr, t):
        y = tr.conv(tr.norm(t, self.bn1), self.conv1)
        return tr.conv(tr.norm(y, self.bn2), self.conv2)


class DenseBlock(nn.Module):
    """A dense block: every layer reads the Concat of all earlier outputs."""

    def __init__(self, cin: int, growth: int, layers: int, bottleneck: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bottleneck)
                                    for i in range(layers))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)

    def chan(self, tr, t):
        feats = [t]
        for layer in self.layers:
            feats.append(layer.chan(tr, tr.cat(*feats)))
        return tr.cat(*feats)


class Transition(nn.Module):
    """DenseNet transition: BN-ReLU-1x1 conv-AvgPool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)

    def chan(self, tr, t):
        return tr.conv(tr.norm(t, self.bn), self.conv)


class BNReLU(nn.Module):
    """Final BN-ReLU of DenseNet."""

    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(x))

    def chan(self, tr, t):
        return tr.norm(t, self.bn)


class Inception(nn.Module):
    """Inception module: 1x1 / 1x1-3x3 / 1x1-5x5 / maxpool-1x1 branches, Concat."""

    def __init__(self, cin: int, b1: int, b2: tuple[int, int], b3: tuple[int, int], b4: int):
        super().__init__()
        self.b1 = ConvBN(cin, b1, 1)
        self.b2 = Seq(ConvBN(cin, b2[0], 1), ConvBN(b2[0], b2[1], 3))
        self.b3 = Seq(ConvBN(cin, b3[0], 1), ConvBN(b3[0], b3[1], 5))
        self.b4 = Seq(nn.MaxPool2d(3, 1, 1), ConvBN(cin, b4, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)

    def chan(self, tr, t):
        return tr.cat(self.b1.chan(tr, t), self.b2.chan(tr, t), self.b3.chan(tr, t),
                      self.b4.chan(tr, t))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's Reshape -> Transpose -> Reshape."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 2 (two branches) or stride 1 (channel split), then shuffle."""

    def __init__(self, cin: int, cout: int, s: int):
        super().__init__()
        half = cout // 2
        self.s = s
        if s == 2:
            self.branch1 = Seq(ConvBN(cin, cin, 3, 2, groups=cin, act=None), ConvBN(cin, half, 1))
            bin_ = cin
        else:
            self.branch1 = None
            bin_ = cin // 2
        self.branch2 = Seq(ConvBN(bin_, half, 1), ConvBN(half, half, 3, s, groups=half, act=None),
                           ConvBN(half, half, 1))

    def forward(self, x):
        if self.s == 1:
            x1, x2 = x.chunk(2, dim=1)   # exports as Slices with Shape-computed bounds
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)

    def chan(self, tr, t):
        if self.s == 1:
            x1, x2 = tr.split(t, [len(t) // 2] * 2)
            out = tr.cat(x1, self.branch2.chan(tr, x2))
        else:
            out = tr.cat(self.branch1.chan(tr, t), self.branch2.chan(tr, t))
        return tr.shuffle(out, 2)


class C2f(nn.Module):
    """YOLOv8 C2f: 1x1 conv, Split in two, bottlenecks on the second half, Concat all, 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBN(cin, 2 * self.c, 1, act=nn.SiLU)
        self.m = nn.ModuleList(Seq(ConvBN(self.c, self.c, 3, act=nn.SiLU),
                                   ConvBN(self.c, self.c, 3, act=nn.SiLU)) for _ in range(n))
        self.cv2 = ConvBN((2 + n) * self.c, cout, 1, act=nn.SiLU)

    def forward(self, x):
        # Sizes from the module (python ints), so the export has a Split with constant sizes
        # and the narrow model splits its own width; chunk() would export Shape-computed Slices.
        h = self.cv1.conv.out_channels // 2
        y = list(self.cv1(x).split([h, h], 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))

    def chan(self, tr, t):
        a = self.cv1.chan(tr, t)
        y = tr.split(a, [len(a) // 2] * 2)
        for m in self.m:
            y.append(tr.join(y[-1], m.chan(tr, y[-1])))
        return self.cv2.chan(tr, tr.cat(*y))


class SPPF(nn.Module):
    """YOLO SPPF: 1x1 conv, three chained 5x5 MaxPools, Concat of all four, 1x1 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1 = ConvBN(cin, cin // 2, 1, act=nn.SiLU)
        self.cv2 = ConvBN(cin // 2 * 4, cout, 1, act=nn.SiLU)

    def forward(self, x):
        x = self.cv1(x)
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        y3 = F.max_pool2d(y2, 5, 1, 2)
        return self.cv2(torch.cat([x, y1, y2, y3], 1))

    def chan(self, tr, t):
        x = self.cv1.chan(tr, t)
        return self.cv2.chan(tr, tr.cat(x, x, x, x))


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------

class Net(nn.Module):
    """stem -> body -> head, all with `chan`."""

    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = Seq(*parts)

    def forward(self, x):
        return self.parts(x)

    def chan(self, tr, t):
        return self.parts.chan(tr, t)


def resnet_basic() -> nn.Module:
    """ResNet basic blocks: identity and stride-2 projection shortcuts, GAP-Linear head."""
    return Net(ConvBN(3, 16), BasicBlock(16, 16), BasicBlock(16, 32, 2), ClassifierHead(32))


def resnet_bottleneck() -> nn.Module:
    """ResNet bottlenecks with a projection shortcut and an identity one, conv head."""
    return Net(ConvBN(3, 16), Bottleneck(16, 8, 32, 2), Bottleneck(32, 8, 32), ConvHead(32, 4))


def mobilenet_v2() -> nn.Module:
    """MobileNetV2: t=1 block (depthwise on the stem), inverted residuals with and without skip."""
    return Net(ConvBN(3, 16, 3, 2, act=nn.ReLU6),
               InvertedResidual(16, 8, 1),
               InvertedResidual(8, 16, 4, 2),
               InvertedResidual(16, 16, 2),
               ConvBN(16, 32, 1, act=nn.ReLU6),
               ClassifierHead(32))


def mobilenet_v3() -> nn.Module:
    """MobileNetV3: hardswish, SE with hardsigmoid gate, residual; hidden Linear with hardswish."""
    return Net(ConvBN(3, 16, 3, 2, act=nn.Hardswish),
               InvertedResidual(16, 16, 2, 1, 3, nn.Hardswish, se=8),
               InvertedResidual(16, 24, 2, 2, 5, nn.ReLU, se=8),
               ConvBN(24, 32, 1, act=nn.Hardswish),
               ClassifierHead(32, 10, hidden=16, act=nn.Hardswish))


def efficientnet() -> nn.Module:
    """EfficientNet MBConv: SiLU, SE with sigmoid gate, t=1 and t=4 blocks with residual."""
    mb = dict(act=nn.SiLU, se_act=nn.SiLU, se_gate=nn.Sigmoid)
    return Net(ConvBN(3, 16, 3, 2, act=nn.SiLU),
               InvertedResidual(16, 8, 1, se=4, **mb),
               InvertedResidual(8, 8, 4, 1, 5, se=4, **mb),
               InvertedResidual(8, 16, 4, 2, 3, se=4, **mb),
               ConvBN(16, 32, 1, act=nn.SiLU),
               ClassifierHead(32))


def densenet() -> nn.Module:
    """DenseNet-BC dense block (Concat chain, pre-activation BN on the Concat), transition."""
    return Net(ConvBN(3, 16), DenseBlock(16, 8, 3, 16), Transition(40, 16), BNReLU(16),
               ClassifierHead(16))


def inception() -> nn.Module:
    """Two Inception modules: multi-branch Concat feeding another multi-branch module."""
    return Net(ConvBN(3, 16), Inception(16, 8, (8, 8), (4, 8), 8),
               Inception(32, 8, (8, 16), (4, 8), 8), ConvBN(40, 16, 1), ClassifierHead(16))


def resnext() -> nn.Module:
    """ResNeXt bottlenecks with a 4-group 3x3 conv."""
    return Net(ConvBN(3, 16), Bottleneck(16, 16, 32, 1, groups=4),
               Bottleneck(32, 16, 32, 2, groups=4), ClassifierHead(32))


def shufflenet_v2() -> nn.Module:
    """ShuffleNetV2: stride-2 unit, stride-1 unit with channel split, channel shuffles."""
    return Net(ConvBN(3, 16), ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1),
                       ConvBN(32, 32, 1), ClassifierHead(32))


class UNet(nn.Module):
    """U-Net/FPN decoder: ConvTranspose + Concat skip, bilinear Resize + lateral Add + Concat."""

    def __init__(self):
        super().__init__()
        self.s = ConvBN(3, 8)
        self.e1 = ConvBN(8, 16, 3, 2)
        self.e2 = ConvBN(16, 32, 3, 2)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, 2, bias=False)
        self.up1_bn = nn.BatchNorm2d(16)
        self.d1 = ConvBN(32, 16)
        self.lat = nn.Conv2d(8, 16, 1)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d2 = ConvBN(24, 8)
        self.head = ConvHead(8, 2)

    def forward(self, x):
        s = self.s(x)
        e1 = self.e1(s)
        e2 = self.e2(e1)
        u1 = F.relu(self.up1_bn(self.up1(e2)))
        d1 = self.d1(torch.cat([u1, e1], 1))
        u2 = self.up2(d1) + self.lat(s)
        d2 = self.d2(torch.cat([u2, s], 1))
        return self.head(d2)

    def chan(self, tr, t):
        s = self.s.chan(tr, t)
        e1 = self.e1.chan(tr, s)
        e2 = self.e2.chan(tr, e1)
        u1 = tr.norm(tr.conv(e2, self.up1), self.up1_bn)
        d1 = self.d1.chan(tr, tr.cat(u1, e1))
        u2 = tr.join(d1, tr.conv(s, self.lat))
        d2 = self.d2.chan(tr, tr.cat(u2, s))
        return self.head.chan(tr, d2)


class YoloHead(nn.Module):
    """YOLO-style: stride-2 stem, C2f (Split/Concat), SPPF (MaxPools/Concat), box+cls Concat."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16, 3, 2, act=nn.SiLU)
        self.c2f = C2f(16, 16, 1)
        self.down = ConvBN(16, 32, 3, 2, act=nn.SiLU)
        self.c2f2 = C2f(32, 32, 2)
        self.sppf = SPPF(32, 16)
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = self.sppf(self.c2f2(self.down(self.c2f(self.stem(x)))))
        return torch.cat([self.box(y), self.cls(y).sigmoid()], 1)

    def chan(self, tr, t):
        y = self.stem.chan(tr, t)
        y = self.sppf.chan(tr, self.c2f2.chan(tr, self.down.chan(tr, self.c2f.chan(tr, y))))
        out = tr.cat(tr.conv(y, self.box), tr.conv(y, self.cls))
        tr.freeze(out, "graph output")
        return out


class VGG(nn.Module):
    """VGG-style: conv-BN-ReLU stacks, MaxPools, Flatten -> Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self):
        super().__init__()
        self.features = Seq(ConvBN(3, 8), ConvBN(8, 8), nn.MaxPool2d(2), ConvBN(8, 16),
                            nn.MaxPool2d(2))
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))

    def chan(self, tr, t):
        t = self.features.chan(tr, t)
        tr.consume(t, self.fc1, block=16)   # channel c -> features c*16 .. c*16+15
        h = tr.out(self.fc1)
        out = tr.conv(h, self.fc2)
        tr.freeze(out, "graph output")
        return out


class Traps(nn.Module):
    """Ops that mix channels without weights (LRN, Softmax over C, CumSum over C): the groups
    they touch must be frozen, and the groups between them still pruned."""

    def __init__(self):
        super().__init__()
        self.c1 = ConvBN(3, 16)
        self.c2 = ConvBN(16, 16)
        self.c3 = ConvBN(16, 16)
        self.c4 = ConvBN(16, 16)
        self.c5 = ConvBN(16, 16)
        self.head = ClassifierHead(16)

    def forward(self, x):
        y = self.c1(x)
        y = self.c3(self.c2(F.local_response_norm(y, 3)))   # c2 -> c3 is free to prune
        y = self.c4(torch.softmax(y, dim=1) * 4)
        y = self.c5(torch.cumsum(y, dim=1) * 0.125)
        return self.head(y)

    def chan(self, tr, t):
        y = self.c1.chan(tr, t)
        tr.freeze(y, "LRN mixes channels")
        y = self.c3.chan(tr, self.c2.chan(tr, y))
        tr.freeze(y, "Softmax over channels")
        y = self.c4.chan(tr, y)
        tr.freeze(y, "CumSum over channels")
        return self.head.chan(tr, self.c5.chan(tr, y))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7, channels-last LayerNorm, Linear-GELU-Linear (MatMul on
    NHWC), layer scale, residual. LayerNorm mixes the residual stream's channels (frozen); the
    MLP's hidden channels are prunable through the Transposes."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, hidden)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(hidden, c)
        self.gamma = nn.Parameter(0.5 + torch.rand(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.ln(y))))
        return x + y.permute(0, 3, 1, 2)

    def chan(self, tr, t):
        y = tr.conv(t, self.dw)
        tr.freeze(y, "LayerNorm over channels")
        return tr.join(t, tr.conv(tr.conv(y, self.pw1), self.pw2))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over C of an NCHW tensor (ConvNeXt's stem/downsampling norm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem + LayerNorm, two ConvNeXt blocks, GAP-LayerNorm-Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.norm = LayerNorm2d(16)
        self.blocks = nn.Sequential(ConvNeXtBlock(16, 32), ConvNeXtBlock(16, 32))
        self.head_norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.blocks(self.norm(self.stem(x)))
        return self.fc(self.head_norm(y.mean((2, 3))))

    def chan(self, tr, t):
        y = tr.conv(t, self.stem)
        tr.freeze(y, "LayerNorm over channels")
        for b in self.blocks:
            y = b.chan(tr, y)
        out = tr.conv(y, self.fc)
        tr.freeze(out, "graph output")
        return out


class MiscOps(nn.Module):
    """Rules beyond the classics: dilated conv, PReLU, strided conv, InstanceNorm, LeakyRelu,
    Tanh, Sub and Max joins, Pad, Elu, ReduceMean -> Gemm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=2, dilation=2)
        self.pa = nn.PReLU(16)
        self.b = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.c = nn.Conv2d(16, 16, 1)
        self.d = nn.Conv2d(16, 16, 1)
        self.e = nn.Conv2d(16, 24, 3)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = self.pa(self.a(x))
        z = F.leaky_relu(self.inorm(self.b(y)), 0.1)
        u = torch.tanh(self.c(z)) - z
        v = torch.maximum(self.d(z), u)
        w = F.elu(self.e(F.pad(v, (1, 1, 1, 1))))
        return self.fc(w.mean((2, 3)))

    def chan(self, tr, t):
        y = tr.norm(tr.conv(t, self.a), self.pa)
        z = tr.norm(tr.conv(y, self.b), self.inorm)
        u = tr.join(tr.conv(z, self.c), z)
        v = tr.join(tr.conv(z, self.d), u)
        out = tr.conv(tr.conv(v, self.e), self.fc)
        tr.freeze(out, "graph output")
        return out


def odd_widths() -> nn.Module:
    """Odd channel counts everywhere: floor(n/2) of 13, 11, 7, 39 (expanded) is removed."""
    return Net(ConvBN(3, 13), BasicBlock(13, 13), InvertedResidual(13, 11, 3, se=5),
               ClassifierHead(11, hidden=7))


class TwoOutputs(nn.Module):
    """Two graph outputs: a feature map reached from a residual Add through ReLU and MaxPool
    only (so that whole residual group must be kept), and logits from a head on top of it."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16)
        self.block = BasicBlock(16, 16)
        self.neck = ConvBN(16, 32, 3, 2)
        self.head = ClassifierHead(32)

    def forward(self, x):
        feat = F.max_pool2d(self.block(self.stem(x)), 2)
        return feat, self.head(self.neck(feat))

    def chan(self, tr, t):
        feat = self.block.chan(tr, self.stem.chan(tr, t))
        tr.freeze(feat, "graph output")
        return self.head.chan(tr, self.neck.chan(tr, feat))


@dataclass(frozen=True)
class Arch:
    """A zoo entry: how to build it and its input size."""
    name: str
    build: Callable[[], nn.Module]
    hw: int = 16


ZOO: dict[str, Arch] = {a.name: a for a in [
    Arch("resnet_basic", resnet_basic),
    Arch("resnet_bottleneck", resnet_bottleneck),
    Arch("mobilenet_v2", mobilenet_v2),
    Arch("mobilenet_v3", mobilenet_v3),
    Arch("efficientnet", efficientnet),
    Arch("densenet", densenet),
    Arch("inception", inception),
    Arch("resnext", resnext),
    Arch("shufflenet_v2", shufflenet_v2),
    Arch("unet", UNet, 32),
    Arch("yolo", YoloHead, 32),
    Arch("vgg", VGG),
    Arch("convnext", ConvNeXt, 32),
    Arch("misc_ops", MiscOps),
    Arch("two_outputs", TwoOutputs),
    Arch("odd_widths", odd_widths),
    Arch("traps", Traps),
]}


def build(arch: Arch | str, seed: int = 0) -> Oracle:
    """Wide random model with the oracle channels zeroed, and its narrow twin."""
    a = ZOO[arch] if isinstance(arch, str) else arch
    torch.manual_seed(seed)
    model = randomize(a.build(), seed)
    return make_oracle(model, 3, seed)


# --------------------------------------------------------------------------------------------
# Export and comparison
# --------------------------------------------------------------------------------------------

def export(model: nn.Module, hw: int, *, keep_bn: bool, dynamic: bool = True,
           batch: int = 2) -> onnx.ModelProto:
    """Legacy torch export, with a dynamic batch axis unless dynamic=False (then shapes such as
    a shuffle's Reshape targets are baked in as constants); keep_bn=False is the default
    (BN-folding) eval export, keep_bn=True keeps BatchNormalization nodes."""
    x = torch.randn(batch, 3, hw, hw)
    kw = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False) if keep_bn \
        else {}
    with torch.no_grad():
        n_out = len(model.eval()(x)) if isinstance(model(x), tuple) else 1
    outs = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), f, dynamo=False, input_names=["x"],
                          output_names=outs, **kw,
                          dynamic_axes={k: {0: "N"} for k in ["x", *outs]} if dynamic else None)
    return onnx.load_from_string(f.getvalue())


def torch_outputs(model: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Run a torch model on a numpy batch; its outputs as a list."""
    with torch.no_grad():
        y = model.eval()(torch.from_numpy(x))
    return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]


def rel_err(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Worst over outputs of max |ref - got| / max |ref|: one number for 'equal up to float
    noise'."""
    assert [r.shape for r in ref] == [g.shape for g in got], \
        f"output shapes {[g.shape for g in got]} != {[r.shape for r in ref]}"
    return max(float(np.max(np.abs(r - g)) / max(float(np.max(np.abs(r))), 1e-12))
               for r, g in zip(ref, got))


# --------------------------------------------------------------------------------------------
# Random compositions (for property tests)
# --------------------------------------------------------------------------------------------

class ConcatBranch(nn.Module):
    """Two conv branches (one through a depthwise conv) concatenated, then fused by a 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.a = ConvBN(c, c // 2, 1)
        self.b = Seq(ConvBN(c, c, 3, groups=c), ConvBN(c, c // 2, 1))
        self.fuse = ConvBN(c, c, 1)

    def forward(self, x):
        return self.fuse(torch.cat([self.a(x), self.b(x)], 1))

    def chan(self, tr, t):
        return self.fuse.chan(tr, tr.cat(self.a.chan(tr, t), self.b.chan(tr, t)))


class DepthwiseSep(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 (MobileNetV1)."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = ConvBN(c, c, 3, groups=c)
        self.pw = ConvBN(c, c, 1)

    def forward(self, x):
        return self.pw(self.dw(x))

    def chan(self, tr, t):
        return self.pw.chan(tr, self.dw.chan(tr, t))


BLOCKS: dict[str, Callable[[int], nn.Module]] = {
    "basic": lambda c: BasicBlock(c, c),
    "inverted": lambda c: InvertedResidual(c, c, 2),
    "inverted_se": lambda c: InvertedResidual(c, c, 2, act=nn.Hardswish, se=c // 2),
    "concat": ConcatBranch,
    "depthwise": DepthwiseSep,
    "bottleneck_grouped": lambda c: Bottleneck(c, c, c, groups=2),
    "split_concat": lambda c: C2f(c, c, 1),
}


def composed(blocks: list[str], c: int = 8) -> nn.Module:
    """stem -> the named blocks at width c -> GAP-Linear head."""
    return Net(ConvBN(3, c), *[BLOCKS[b](c) for b in blocks], ClassifierHead(c))
