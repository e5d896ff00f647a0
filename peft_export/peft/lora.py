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

from peft_export.peft.base import BlockView, Fold, MergeableModule, PeftMethod

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


class QKVAdapter(MergeableModule):
    """An additive update of the fused qkv projection's q/k/v outputs (LoRA, FacT), in any row layout."""

    base_attr = "qkv_proj"

    def __init__(self, qkv: nn.Linear, rows: dict[str, torch.Tensor]):
        super().__init__()
        self.qkv_proj = qkv
        self.dim = qkv.in_features
        for t in QKV_TARGETS:
            self.register_buffer(f"rows_{t}", rows[t].clone(), persistent=False)
        inv = scatter_index(rows, qkv.out_features)
        self.register_buffer("scatter", inv if inv is not None else torch.empty(0, dtype=torch.long),
                             persistent=False)

    def updates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Target -> what it adds to that target's output for input ``x``."""
        raise NotImplementedError

    def target_deltas(self) -> dict[str, torch.Tensor]:
        """Target -> the same update as a weight matrix (fp32)."""
        raise NotImplementedError

    def forward(self, x):
        out = self.qkv_proj(x)
        upd = self.updates(x)
        delta = torch.cat([upd[t] if t in upd else out.new_zeros((*out.shape[:-1], self.dim))
                           for t in QKV_TARGETS], dim=-1)
        if self.scatter.numel():
            delta = delta[..., self.scatter]
        return out + delta

    def delta_weight(self) -> dict[str, Fold]:
        w = self.qkv_proj.weight
        delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for t, d in self.target_deltas().items():
            delta[self.get_buffer(f"rows_{t}")] = d
        return {"weight": Fold(add=delta)}


class LoRAQKV(QKVAdapter):
    def __init__(self, qkv: nn.Linear, rows: dict[str, torch.Tensor], targets: list[str], rank: int,
                 alpha: float):
        super().__init__(qkv, rows)
        self.alpha = alpha
        self.targets = [t for t in QKV_TARGETS if t in targets]
        for t in self.targets:
            a, b = _lora_pair(self.dim, len(rows[t]), rank)
            setattr(self, f"w_a_linear_{t}", a)
            setattr(self, f"w_b_linear_{t}", b)

    def _pair(self, t: str) -> tuple[nn.Linear, nn.Linear]:
        return getattr(self, f"w_a_linear_{t}"), getattr(self, f"w_b_linear_{t}")

    def updates(self, x):
        out = {}
        for t in self.targets:
            a, b = self._pair(t)
            out[t] = self.alpha * b(a(x))
        return out

    def target_deltas(self):
        out = {}
        for t in self.targets:
            a, b = self._pair(t)
            out[t] = self.alpha * (b.weight.float() @ a.weight.float())
        return out


class LoRAMLP(MergeableModule):
    """LoRA on both MLP linears. ViT: lin1 -> GELU -> lin2. TinyViT: norm -> fc1 -> GELU -> fc2."""

    base_attr = "mlp_layer"

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

    def delta_weight(self) -> dict[str, Fold]:
        out = {}
        for i, name in enumerate(self._fc, start=1):
            a, b = getattr(self, f"w_a_linear_{i}").weight, getattr(self, f"w_b_linear_{i}").weight
            out[f"{name}.weight"] = Fold(add=self.alpha * (b.float() @ a.float()))
        return out


class LoRA(PeftMethod):
    name = "lora"
    summary = "low-rank update B·A of q/k/v (and optionally the MLP)"

    def apply(self, model, blocks, family):
        o = self.opts
        enc = model.image_encoder
        qkv_targets = [t for t in o.targets if t in QKV_TARGETS]
        for i in blocks:
            view = BlockView(enc.blocks[i], family)
            if qkv_targets:
                view.set("qkv", LoRAQKV(view.get("qkv"), view.qkv_rows(), qkv_targets, o.rank, o.alpha))
            if "mlp" in o.targets:
                view.set("mlp", LoRAMLP(view.get("mlp"), family, o.rank, o.alpha))
