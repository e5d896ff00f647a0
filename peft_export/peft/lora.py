"""LoRA as the study implemented it: ``Δ = α · B A`` per target, α = 1 by default (no α/r scaling).

Targets ``q``, ``k``, ``v`` add to the matching rows of the fused qkv projection; ``mlp`` adds
``B1 A1`` to the first MLP linear and ``B2 A2`` to the second. ``A`` is kaiming-uniform (a=√5), ``B`` zeros.
Merge: ``W_qkv[rows_t] += α B_t A_t``, ``W_1 += α B1 A1``, ``W_2 += α B2 A2``; biases unchanged.

State-dict keys (as micro-sam): ``attn.qkv.qkv_proj.{weight,bias}``, ``attn.qkv.w_a_linear_q.weight``,
``attn.qkv.w_b_linear_q.weight`` (…_k, …_v); ``mlp.mlp_layer.*``, ``mlp.w_{a,b}_linear_{1,2}.weight``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_export.errors import UsageError
from peft_export.peft.base import BlockView, MergeableModule, PeftMethod

QKV_TARGETS = ("q", "k", "v")


def _lora_pair(d_in: int, d_out: int, rank: int) -> tuple[nn.Linear, nn.Linear]:
    a = nn.Linear(d_in, rank, bias=False)
    b = nn.Linear(rank, d_out, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


def scatter_index(rows: dict[str, torch.Tensor], width: int) -> torch.Tensor | None:
    """Index that maps ``cat([Δq, Δk, Δv])`` onto the native qkv output layout (None when already [q|k|v])."""
    order = [int(i) for t in QKV_TARGETS for i in rows[t].tolist()]
    if order == list(range(width)):
        return None
    inverse = [0] * width
    for j, i in enumerate(order):
        inverse[i] = j
    return torch.tensor(inverse, dtype=torch.long, device="cpu")


class LoRAQKV(MergeableModule):
    def __init__(self, qkv: nn.Linear, rows: dict[str, torch.Tensor], targets: list[str], rank: int,
                 alpha: float):
        super().__init__()
        self.qkv_proj = qkv
        self.dim = qkv.in_features
        self.rank = rank
        self.alpha = alpha
        self.targets = [t for t in QKV_TARGETS if t in targets]
        for t in self.targets:
            a, b = _lora_pair(self.dim, len(rows[t]), rank)
            setattr(self, f"w_a_linear_{t}", a)
            setattr(self, f"w_b_linear_{t}", b)
        for t in QKV_TARGETS:
            self.register_buffer(f"rows_{t}", rows[t].clone(), persistent=False)
        inv = scatter_index(rows, qkv.out_features)
        self.register_buffer("scatter", inv if inv is not None else torch.empty(0, dtype=torch.long),
                             persistent=False)

    def delta_weight(self, t: str) -> torch.Tensor:
        a = getattr(self, f"w_a_linear_{t}").weight
        b = getattr(self, f"w_b_linear_{t}").weight
        return self.alpha * (b.float() @ a.float())

    def forward(self, x):
        out = self.qkv_proj(x)
        parts = []
        for t in QKV_TARGETS:
            if t in self.targets:
                a, b = getattr(self, f"w_a_linear_{t}"), getattr(self, f"w_b_linear_{t}")
                parts.append(self.alpha * b(a(x)))
            else:
                parts.append(out.new_zeros((*out.shape[:-1], self.dim)))
        delta = torch.cat(parts, dim=-1)
        if self.scatter.numel():
            delta = delta[..., self.scatter]
        return out + delta

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        lin = self.qkv_proj
        w = lin.weight.data.float().clone()
        for t in self.targets:
            w[getattr(self, f"rows_{t}")] += self.delta_weight(t)
        lin.weight.data.copy_(w.to(lin.weight.dtype))
        return lin


class LoRAMLP(MergeableModule):
    """LoRA on both MLP linears. ViT: lin1 -> GELU -> lin2. TinyViT: norm -> fc1 -> GELU -> fc2."""

    def __init__(self, mlp: nn.Module, family: str, rank: int, alpha: float):
        super().__init__()
        self.mlp_layer = mlp
        self.family = family
        self.alpha = alpha
        self._fc = ("lin1", "lin2") if family == "vit" else ("fc1", "fc2")
        fc1, fc2 = (getattr(mlp, n) for n in self._fc)
        self.w_a_linear_1, self.w_b_linear_1 = _lora_pair(fc1.in_features, fc1.out_features, rank)
        self.w_a_linear_2, self.w_b_linear_2 = _lora_pair(fc2.in_features, fc2.out_features, rank)

    def forward(self, x):
        m = self.mlp_layer
        fc1, fc2 = (getattr(m, n) for n in self._fc)
        if self.family == "tinyvit":
            x = m.norm(x)
        h = fc1(x) + self.alpha * self.w_b_linear_1(self.w_a_linear_1(x))
        h = m.act(h)
        return fc2(h) + self.alpha * self.w_b_linear_2(self.w_a_linear_2(h))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        for i, name in enumerate(self._fc, start=1):
            lin = getattr(self.mlp_layer, name)
            a, b = getattr(self, f"w_a_linear_{i}").weight, getattr(self, f"w_b_linear_{i}").weight
            lin.weight.data.copy_((lin.weight.data.float() + self.alpha * (b.float() @ a.float())).to(lin.weight.dtype))
        return self.mlp_layer


class LoRA(PeftMethod):
    name = "lora"
    summary = "low-rank update B·A of q/k/v (and optionally the MLP)"
    defaults = {"rank": 32, "alpha": 1.0, "targets": ["q", "v"]}

    def validate(self) -> None:
        o = self.options
        if isinstance(o["targets"], str):
            o["targets"] = [t.strip() for t in o["targets"].split(",") if t.strip()]
        o["targets"] = list(o["targets"])
        bad = set(o["targets"]) - {"q", "k", "v", "mlp"}
        if bad or not o["targets"]:
            raise UsageError(f"lora targets must be a non-empty subset of q,k,v,mlp (got {o['targets']})")
        if int(o["rank"]) < 1:
            raise UsageError("lora needs a rank >= 1")
        o["rank"] = int(o["rank"])
        o["alpha"] = float(o["alpha"])

    def apply(self, model, blocks, family):
        o = self.options
        enc = model.image_encoder
        for i in blocks:
            view = BlockView(enc.blocks[i], family)
            qkv_targets = [t for t in o["targets"] if t in QKV_TARGETS]
            if qkv_targets:
                view.set("qkv", LoRAQKV(view.get("qkv"), view.qkv_rows(), qkv_targets, o["rank"], o["alpha"]))
            if "mlp" in o["targets"]:
                view.set("mlp", LoRAMLP(view.get("mlp"), family, o["rank"], o["alpha"]))
