"""Small torch transformers with zero-head oracles, for testing the `heads` and `channels` passes.

Every model is built from the same blocks (attention with optional grouped KV heads, rotary
embeddings and a KV cache; an MLP with GELU, tanh-GELU, SiLU or SwiGLU; LayerNorm or RMSNorm),
so the oracle knows the structure from the torch modules alone, never from prunec's analysis:
`make_oracle` zeroes, in every attention module, the Q/K/V rows and out-projection columns of a
random half of its heads (of its KV groups, with their query heads, under grouped-query
attention) and of a random half of its head_dim indices (the same indices in every head), and
the rows of a random half of every MLP's neurons with the down-projection columns that read
them. Removing exactly those cannot change any output. The NARROW twin keeps only the other
heads, head_dim indices and neurons, with weights sliced from the wide model, so a correct
pruning of the wide export has the narrow export's parameter count.
"""
from __future__ import annotations

import copy
import io
import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Cfg:
    """Sizes and choices of one model; `narrow()` is the oracle twin's."""
    d: int = 32
    heads: int = 4
    kv_heads: int = 4
    qk_dim: int = 8
    v_dim: int = 8
    ffn: int = 48
    layers: int = 2
    act: str = "gelu"          # gelu | gelu_tanh | silu | swiglu
    norm: str = "ln"           # ln | rms | ln_decomposed
    pre_norm: bool = True
    rope: bool = False
    vocab: int = 40
    max_pos: int = 320         # verification runs at sequence 128 with a past of 128
    #: head_dim stays: a KV cache carries it in the interface, a fused attention op would
    #: change its softmax scale; the channels pass keeps it there, so the oracle does.
    keep_head_dim: bool = False
    sdpa: bool = False         # F.scaled_dot_product_attention (the dynamo exporter's Attention op)

    def narrow(self) -> Cfg:
        return replace(self, heads=self.heads // 2, kv_heads=self.kv_heads // 2, ffn=self.ffn // 2,
                       v_dim=self.v_dim if self.keep_head_dim else self.v_dim // 2,
                       qk_dim=self.qk_dim if self.rope or self.keep_head_dim else self.qk_dim // 2)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, written out (exports as Pow/ReduceMean/Sqrt/Div/Mul)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DecomposedLayerNorm(nn.Module):
    """LayerNorm written out (exports as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        u = x - x.mean(-1, keepdim=True)
        return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


def norm(cfg: Cfg) -> nn.Module:
    return {"ln": nn.LayerNorm, "rms": RMSNorm, "ln_decomposed": DecomposedLayerNorm}[cfg.norm](cfg.d)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Multi-head attention written as exporters see it: view into heads, Q·Kᵀ, softmax, ·V."""

    def __init__(self, cfg: Cfg, scale: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.d, cfg.heads * cfg.qk_dim)
        self.k = nn.Linear(cfg.d, cfg.kv_heads * cfg.qk_dim)
        self.v = nn.Linear(cfg.d, cfg.kv_heads * cfg.v_dim)
        self.o = nn.Linear(cfg.heads * cfg.v_dim, cfg.d)
        # Fixed at the wide model's head_dim, so the narrow twin computes the same scores.
        self.scale = scale if scale is not None else 1.0 / math.sqrt(cfg.qk_dim)

    def forward(self, x, bias=None, past=None, start: int | torch.Tensor = 0):
        c = self.cfg
        b, t, _ = x.shape
        q = self.q(x).view(b, t, c.heads, c.qk_dim).transpose(1, 2)
        k = self.k(x).view(b, t, c.kv_heads, c.qk_dim).transpose(1, 2)
        v = self.v(x).view(b, t, c.kv_heads, c.v_dim).transpose(1, 2)
        if c.rope:
            pos = torch.arange(t, dtype=torch.float32) + start
            inv = 1.0 / (10000 ** (torch.arange(0, c.qk_dim, 2, dtype=torch.float32) / c.qk_dim))
            f = pos[:, None] * inv[None]
            emb = torch.cat((f, f), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if c.kv_heads != c.heads:  # grouped-query attention: repeat each KV head (HF's repeat_kv)
            rep = c.heads // c.kv_heads
            n = k.shape[2]
            k = k[:, :, None].expand(b, c.kv_heads, rep, n, c.qk_dim).reshape(b, c.heads, n, c.qk_dim)
            v = v[:, :, None].expand(b, c.kv_heads, rep, n, c.v_dim).reshape(b, c.heads, n, c.v_dim)
        if c.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            s = q @ k.transpose(-2, -1) / (1.0 / self.scale)  # a Div, as in HF BERT (ORT fuses that)
            if bias is not None:
                s = s + bias
            y = torch.softmax(s, dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, t, c.heads * c.v_dim)
        return self.o(y), present


class MLP(nn.Module):
    def __init__(self, cfg: Cfg):
        super().__init__()
        self.act = cfg.act
        self.up = nn.Linear(cfg.d, cfg.ffn)
        self.gate = nn.Linear(cfg.d, cfg.ffn) if cfg.act == "swiglu" else None
        self.down = nn.Linear(cfg.ffn, cfg.d)

    def forward(self, x):
        h = self.up(x)
        if self.act == "gelu":
            h = F.gelu(h)
        elif self.act == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.act == "silu":
            h = F.silu(h)
        else:
            h = F.silu(self.gate(x)) * h
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: Cfg, scale: float | None = None):
        super().__init__()
        self.pre = cfg.pre_norm
        self.attn, self.mlp = Attention(cfg, scale), MLP(cfg)
        self.n1, self.n2 = norm(cfg), norm(cfg)

    def forward(self, x, bias=None, past=None, start=0):
        if self.pre:
            a, present = self.attn(self.n1(x), bias, past, start)
            x = x + a
            return x + self.mlp(self.n2(x)), present
        a, present = self.attn(x, bias, past, start)
        x = self.n1(x + a)
        return self.n2(x + self.mlp(x)), present


class Encoder(nn.Module):
    """BERT-style: token + position embeddings, LayerNorm, post-norm blocks, an attention-mask
    input (1 = attend) turned into an additive bias; returns the hidden states."""

    def __init__(self, cfg: Cfg, scales=None):
        super().__init__()
        self.tok, self.pos = nn.Embedding(cfg.vocab, cfg.d), nn.Embedding(cfg.max_pos, cfg.d)
        self.ln = nn.LayerNorm(cfg.d)
        self.blocks = nn.ModuleList(Block(cfg, s) for s in (scales or [None] * cfg.layers))

    def forward(self, ids, mask):
        pos = torch.arange(ids.shape[1])[None]
        x = self.ln(self.tok(ids) + self.pos(pos))
        bias = (1.0 - mask.unsqueeze(1).unsqueeze(2).float()) * -10000.0  # the mask path ORT fuses
        for blk in self.blocks:
            x, _ = blk(x, bias)
        return x


class ViT(nn.Module):
    """Patch Conv, class token, position embedding, pre-norm blocks, head on the class token."""

    def __init__(self, cfg: Cfg, scales=None, img: int = 16, patch: int = 4, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d))
        self.pos = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, cfg.d))
        self.blocks = nn.ModuleList(Block(cfg, s) for s in (scales or [None] * cfg.layers))
        self.ln = norm(cfg)
        self.head = nn.Linear(cfg.d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x, _ = blk(x)
        return self.head(self.ln(x)[:, 0])


class Decoder(nn.Module):
    """GPT-style causal decoder; with `cache`, past keys/values per layer are inputs and the
    presents are outputs (the head count is part of the interface)."""

    def __init__(self, cfg: Cfg, scales=None, cache: bool = False):
        super().__init__()
        self.cfg, self.cache = cfg, cache
        self.tok, self.pos = nn.Embedding(cfg.vocab, cfg.d), nn.Embedding(cfg.max_pos, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg, s) for s in (scales or [None] * cfg.layers))
        self.ln = norm(cfg)
        self.lm = nn.Linear(cfg.d, cfg.vocab)

    def forward(self, ids, *past):
        t = ids.shape[1]
        p = past[0].shape[2] if past else 0
        pos = torch.arange(t)[None] + p
        x = self.tok(ids) + self.pos(pos)
        i = torch.arange(t)[:, None] + p
        j = torch.arange(t + p)[None]
        bias = torch.where(j <= i, 0.0, -10000.0)[None, None]
        presents = []
        for n, blk in enumerate(self.blocks):
            x, pr = blk(x, bias, (past[2 * n], past[2 * n + 1]) if past else None, p)
            presents += list(pr)
        logits = self.lm(self.ln(x))
        return (logits, *presents) if self.cache else logits


class GQABlock(nn.Module):
    """A Llama-style block on hidden states: RMSNorm, grouped-query attention with rotary
    embeddings and a causal mask, SwiGLU MLP."""

    def __init__(self, cfg: Cfg, scales=None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, s) for s in (scales or [None] * cfg.layers))

    def forward(self, x):
        t = x.shape[1]
        bias = torch.triu(torch.full((t, t), -10000.0), 1)[None, None]
        for blk in self.blocks:
            x, _ = blk(x, bias)
        return x


# --------------------------------------------------------------------------------------------
# Models, inputs, oracle
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    name: str
    cfg: Cfg
    kind: str               # encoder | vit | decoder | decoder_cache | gqa

    def build(self, cfg: Cfg | None = None, scales=None) -> nn.Module:
        cfg = cfg or self.cfg
        return {"encoder": lambda: Encoder(cfg, scales), "vit": lambda: ViT(cfg, scales),
                "decoder": lambda: Decoder(cfg, scales), "gqa": lambda: GQABlock(cfg, scales),
                "decoder_cache": lambda: Decoder(cfg, scales, cache=True)}[self.kind]()


ARCHS = {a.name: a for a in [
    Arch("bert", Cfg(act="gelu", pre_norm=False), "encoder"),
    Arch("vit", Cfg(act="gelu_tanh"), "vit"),
    Arch("gpt", Cfg(act="silu"), "decoder"),
    Arch("gpt_cache", Cfg(act="gelu", layers=1, keep_head_dim=True), "decoder_cache"),
    # For ONNX Runtime's transformer optimizer, which fuses the legacy export's attention.
    Arch("bert_fused", Cfg(act="gelu", pre_norm=False, keep_head_dim=True), "encoder"),
    # Exported by the dynamo exporter at opset 23: one ONNX Attention op per layer.
    Arch("gpt_sdpa", Cfg(act="silu", sdpa=True, keep_head_dim=True), "decoder"),
    Arch("gqa", Cfg(heads=4, kv_heads=2, act="swiglu", norm="rms", rope=True, qk_dim=8), "gqa"),
]}


def inputs(arch: Arch, batch: int, seq: int, past: int = 3, seed: int = 0, cfg: Cfg | None = None
           ) -> dict[str, np.ndarray]:
    """Feeds by input name (the same names both exporters use); `cfg` sizes the KV cache."""
    rng = np.random.default_rng(seed)
    c = cfg or arch.cfg
    if arch.kind == "encoder":
        mask = np.ones((batch, seq), np.int64)
        mask[0, seq // 2:] = 0  # padding on one sequence
        return {"ids": rng.integers(0, c.vocab, (batch, seq)).astype(np.int64), "mask": mask}
    if arch.kind == "vit":
        return {"image": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
    if arch.kind == "gqa":
        return {"x": rng.standard_normal((batch, seq, c.d)).astype(np.float32)}
    feeds = {"ids": rng.integers(0, c.vocab, (batch, seq)).astype(np.int64)}
    if arch.kind == "decoder_cache":
        for n in range(c.layers):
            for kind, dim in (("key", c.qk_dim), ("value", c.v_dim)):
                feeds[f"past_{kind}_{n}"] = rng.standard_normal((batch, c.kv_heads, past, dim)).astype(np.float32)
    return feeds


def output_names(arch: Arch) -> list[str]:
    if arch.kind == "decoder_cache":
        return ["logits"] + [f"present_{k}_{n}" for n in range(arch.cfg.layers) for k in ("key", "value")]
    return ["y"]


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (norm scales away from 1, non-zero biases and embeddings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm, DecomposedLayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


@dataclass
class Oracle:
    arch: Arch
    wide: nn.Module
    narrow: nn.Module
    original: nn.Module
    #: Per attention module (graph order): (kept KV heads, kept qk head_dim, kept v head_dim).
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]]

    def narrow_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds for the narrow twin: KV-cache inputs keep only the kept heads and head_dim."""
        return {k: self.narrow_cache(k, v) for k, v in feeds.items()}

    def narrow_cache(self, name: str, value: np.ndarray) -> np.ndarray:
        """A past/present KV tensor of the wide model, as the narrow model has it."""
        if not name.startswith(("past_", "present_")):
            return value
        n = int(name.rsplit("_", 1)[1])
        kv, dqk, dv = self.kept[n]
        return value[:, kv][..., dqk if "_key_" in name else dv]


def make_oracle(arch: Arch, seed: int = 0, hidden: bool = False) -> Oracle:
    """Zero a random half of every attention module's heads (KV groups) and head_dim indices
    and of every MLP's neurons in a random wide model; build the narrow twin from the rest.

    With `hidden` (decoders), also a random half of the hidden width: embedding columns, norm
    scales and biases, out- and down-projection rows, reader columns. Removing those is not
    exact (norm statistics then cover the kept channels only), but the narrow twin, whose norms
    are over the kept channels, is what a correct pruning computes."""
    torch.manual_seed(seed)
    wide = randomize(arch.build(), seed)
    original = copy.deepcopy(wide)
    c = arch.cfg
    rng = np.random.default_rng(seed + 1)
    attns = [m for m in wide.modules() if isinstance(m, Attention)]
    ncfg = replace(c.narrow(), d=c.d // 2) if hidden else c.narrow()
    narrow = arch.build(ncfg, scales=[a.scale for a in attns])
    narrow_mods = dict(narrow.named_modules())

    def half(n: int) -> np.ndarray:
        return np.sort(rng.choice(n, n // 2, replace=False))

    def keep(n: int, gone: np.ndarray) -> torch.Tensor:
        return torch.tensor(sorted(set(range(n)) - set(gone.tolist())), dtype=torch.long)

    gone_h = half(c.d) if hidden else np.array([], np.int64)
    hk = keep(c.d, gone_h)
    hg = torch.tensor(gone_h, dtype=torch.long)
    kept_all = []
    with torch.no_grad():
        for name, m in wide.named_modules():
            nm = narrow_mods.get(name)
            if isinstance(m, Attention):
                rep = c.heads // c.kv_heads
                gone_kv = half(c.kv_heads)
                gone_q = np.array([g * rep + r for g in gone_kv for r in range(rep)], dtype=np.int64)
                # Rotary embeddings pair head_dim i with i + d/2 (see Cfg.keep_head_dim too).
                gone_dqk = np.array([], np.int64) if c.rope or c.keep_head_dim else half(c.qk_dim)
                gone_dv = np.array([], np.int64) if c.keep_head_dim else half(c.v_dim)
                kq, kkv = keep(c.heads, gone_q), keep(c.kv_heads, gone_kv)
                kdqk, kdv = keep(c.qk_dim, gone_dqk), keep(c.v_dim, gone_dv)
                kept_all.append((kkv.numpy(), kdqk.numpy(), kdv.numpy()))

                def rows(heads_n, dim, gone_h, gone_d):
                    r = [h * dim + j for h in range(heads_n) for j in range(dim)
                         if h in set(gone_h.tolist()) or j in set(gone_d.tolist())]
                    return torch.tensor(r, dtype=torch.long)

                def kept_rows(kh, kd, dim):
                    return (kh[:, None] * dim + kd[None]).reshape(-1)

                for lin, hn, dim, gh, gd, kh, kd in ((m.q, c.heads, c.qk_dim, gone_q, gone_dqk, kq, kdqk),
                                                     (m.k, c.kv_heads, c.qk_dim, gone_kv, gone_dqk, kkv, kdqk),
                                                     (m.v, c.kv_heads, c.v_dim, gone_kv, gone_dv, kkv, kdv)):
                    z = rows(hn, dim, gh, gd)
                    lin.weight[z] = 0
                    lin.bias[z] = 0
                    kr = kept_rows(kh, kd, dim)
                    nl = getattr(nm, {id(m.q): "q", id(m.k): "k", id(m.v): "v"}[id(lin)])
                    lin.weight[:, hg] = 0
                    nl.weight.copy_(lin.weight[kr][:, hk])
                    nl.bias.copy_(lin.bias[kr])
                zo = rows(c.heads, c.v_dim, gone_q, gone_dv)
                m.o.weight[:, zo] = 0
                m.o.weight[hg] = 0
                m.o.bias[hg] = 0
                nm.o.weight.copy_(m.o.weight[hk][:, kept_rows(kq, kdv, c.v_dim)])
                nm.o.bias.copy_(m.o.bias[hk])
            elif isinstance(m, MLP):
                gone = torch.tensor(half(c.ffn), dtype=torch.long)
                kept = keep(c.ffn, gone.numpy())
                for lin in (m.up, m.gate):
                    if lin is not None:
                        lin.weight[gone] = 0
                        lin.bias[gone] = 0
                        lin.weight[:, hg] = 0
                m.down.weight[:, gone] = 0
                m.down.weight[hg] = 0
                m.down.bias[hg] = 0
                nm.up.weight.copy_(m.up.weight[kept][:, hk])
                nm.up.bias.copy_(m.up.bias[kept])
                if m.gate is not None:
                    nm.gate.weight.copy_(m.gate.weight[kept][:, hk])
                    nm.gate.bias.copy_(m.gate.bias[kept])
                nm.down.weight.copy_(m.down.weight[hk][:, kept])
                nm.down.bias.copy_(m.down.bias[hk])
        # Everything else (embeddings, norms, patch conv, heads) is shared as it is, or (hidden)
        # sliced along its hidden-width axis: the only axis of size d in a decoder's others.
        sliced = {f"{n}.{p}" for n, m in wide.named_modules() if isinstance(m, (Attention, MLP))
                  for p, _ in m.named_parameters()}
        nparams = dict(narrow.named_parameters())
        for n, p in wide.named_parameters():
            if n in sliced:
                continue
            if hidden:
                for ax in [a for a, size in enumerate(p.shape) if size == c.d]:
                    p.index_fill_(ax, hg, 0.0)
                    p = p.index_select(ax, hk)
            nparams[n].copy_(p)
    return Oracle(arch, wide.eval(), narrow.eval(), original.eval(), kept_all)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def export(model: nn.Module, arch: Arch, exporter: str, opset: int = 17, cfg: Cfg | None = None
           ) -> onnx.ModelProto:
    """Export with torch's legacy (TorchScript) exporter or its dynamo exporter, batch and
    sequence (and past length) symbolic; `cfg` is the model's (the narrow twin's for it)."""
    ex = {k: torch.from_numpy(v) for k, v in inputs(arch, 2, 5, past=3, cfg=cfg).items()}
    names, outs = list(ex), output_names(arch)
    seq_axes = {"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}, "x": {0: "batch", 1: "seq"},
                "image": {0: "batch"}}
    axes = {k: seq_axes.get(k, {0: "batch", 2: "past"}) for k in names}
    for o in outs:
        axes[o] = {0: "batch"} if arch.kind == "vit" else (
            {0: "batch", 1: "seq"} if not o.startswith("present") else {0: "batch", 2: "past + seq"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            f = io.BytesIO()
            torch.onnx.export(model, tuple(ex.values()), f, dynamo=False, input_names=names,
                              output_names=outs, dynamic_axes=axes, opset_version=opset)
            return onnx.load_from_string(f.getvalue())
        dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq", max=256),
                "past": torch.export.Dim("past", max=256)}
        shapes = tuple({ax: dims[nm] for ax, nm in axes[k].items()} for k in names)
        if arch.kind == "decoder_cache":  # forward(ids, *past): the past is one (tuple) argument
            shapes = (shapes[0], shapes[1:])
        prog = torch.onnx.export(model, tuple(ex.values()), dynamo=True, input_names=names,
                                 output_names=outs, dynamic_shapes=shapes, opset_version=max(opset, 18),
                                 verbose=False)
        return prog.model_proto


def torch_outputs(model: nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        y = model(*[torch.from_numpy(v) for v in feeds.values()])
    return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]


def rel_err(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Worst over outputs of max |ref - got| / max |ref|."""
    assert [r.shape for r in ref] == [g.shape for g in got], \
        f"output shapes {[g.shape for g in got]} != {[r.shape for r in ref]}"
    return max(float(np.max(np.abs(r - g)) / max(float(np.max(np.abs(r))), 1e-12))
               for r, g in zip(ref, got))
