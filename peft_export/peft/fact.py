"""FacT (factor-tuning) as the study implemented it.

Per block: ``U ∈ R^{r×D}`` (``FacTu``), ``V ∈ R^{D×r}`` (``FacTv``), ``S_q, S_v ∈ R^{r×r}`` (``q_FacTs``,
``v_FacTs``), bias-free, PyTorch's default init (so the model at step 0 is *not* base SAM).
``Δq = V·drop(S_q·(U x))``, ``Δv = V·drop(S_v·(U x))``; no scale. Merge (eval mode): ``W_q += V S_q U``,
``W_v += V S_v U``. Keys: ``attn.qkv.{qkv_proj,FacTu,FacTv,q_FacTs,v_FacTs}.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_export.errors import UsageError
from peft_export.peft.base import BlockView, MergeableModule, PeftMethod
from peft_export.peft.lora import QKV_TARGETS, scatter_index


class FacTQKV(MergeableModule):
    def __init__(self, qkv: nn.Linear, rows: dict[str, torch.Tensor], rank: int, dropout: float):
        super().__init__()
        self.qkv_proj = qkv
        self.dim = qkv.in_features
        self.q_FacTs = nn.Linear(rank, rank, bias=False)
        self.v_FacTs = nn.Linear(rank, rank, bias=False)
        self.dropout = dropout
        self.dp_q = nn.Dropout(dropout)
        self.dp_v = nn.Dropout(dropout)
        self.FacTu = nn.Linear(self.dim, rank, bias=False)
        self.FacTv = nn.Linear(rank, self.dim, bias=False)
        for t in QKV_TARGETS:
            self.register_buffer(f"rows_{t}", rows[t].clone(), persistent=False)
        inv = scatter_index(rows, qkv.out_features)
        self.register_buffer("scatter", inv if inv is not None else torch.empty(0, dtype=torch.long),
                             persistent=False)

    def forward(self, x):
        out = self.qkv_proj(x)
        u = self.FacTu(x)
        dq = self.FacTv(self.dp_q(self.q_FacTs(u)))
        dv = self.FacTv(self.dp_v(self.v_FacTs(u)))
        delta = torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)
        if self.scatter.numel():
            delta = delta[..., self.scatter]
        return out + delta

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        lin = self.qkv_proj
        u, v = self.FacTu.weight.float(), self.FacTv.weight.float()
        w = lin.weight.data.float().clone()
        w[self.rows_q] += v @ self.q_FacTs.weight.float() @ u
        w[self.rows_v] += v @ self.v_FacTs.weight.float() @ u
        lin.weight.data.copy_(w.to(lin.weight.dtype))
        return lin


class FacT(PeftMethod):
    name = "fact"
    summary = "factorised update V·S·U of q and v with a shared U, V per block"
    defaults = {"rank": 16, "dropout": 0.1}

    def validate(self) -> None:
        o = self.options
        o["rank"] = int(o["rank"])
        o["dropout"] = float(o["dropout"] or 0.0)
        if o["rank"] < 1:
            raise UsageError("fact needs a rank >= 1")
        if not 0.0 <= o["dropout"] < 1.0:
            raise UsageError("fact dropout must be in [0, 1)")

    def apply(self, model, blocks, family):
        for i in blocks:
            view = BlockView(model.image_encoder.blocks[i], family)
            view.set("qkv", FacTQKV(view.get("qkv"), view.qkv_rows(), self.options["rank"], self.options["dropout"]))
