"""FacT (factor-tuning) as the study implemented it.

Per block: ``U ∈ R^{r×D}`` (``FacTu``), ``V ∈ R^{D×r}`` (``FacTv``), ``S_q, S_v ∈ R^{r×r}`` (``q_FacTs``,
``v_FacTs``), bias-free, PyTorch's default init (so the model at step 0 is *not* base SAM).
``Δq = s·V·drop(S_q·(U x))``, ``Δv = s·V·drop(S_v·(U x))`` with FacT's scale ``s`` (option ``scale``; the study
used none, i.e. 1). Merge (eval mode): ``W_q += s·V S_q U``, ``W_v += s·V S_v U``.
Keys: ``attn.qkv.{qkv_proj,FacTu,FacTv,q_FacTs,v_FacTs}.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_export.peft.base import BlockView, PeftMethod
from peft_export.peft.lora import QKVAdapter


class FacTQKV(QKVAdapter):
    def __init__(self, qkv: nn.Linear, rows: dict[str, torch.Tensor], rank: int, dropout: float,
                 scale: float = 1.0):
        super().__init__(qkv, rows)
        self.scale = scale
        self.q_FacTs = nn.Linear(rank, rank, bias=False)
        self.v_FacTs = nn.Linear(rank, rank, bias=False)
        self.dp_q = nn.Dropout(dropout)
        self.dp_v = nn.Dropout(dropout)
        self.FacTu = nn.Linear(self.dim, rank, bias=False)
        self.FacTv = nn.Linear(rank, self.dim, bias=False)

    def updates(self, x):
        u = self.FacTu(x)
        dq, dv = self.FacTv(self.dp_q(self.q_FacTs(u))), self.FacTv(self.dp_v(self.v_FacTs(u)))
        return {"q": self.scale * dq, "v": self.scale * dv}

    def target_deltas(self):
        u, v = self.FacTu.weight.float(), self.FacTv.weight.float()
        return {"q": self.scale * (v @ self.q_FacTs.weight.float() @ u),
                "v": self.scale * (v @ self.v_FacTs.weight.float() @ u)}


class FacT(PeftMethod):
    name = "fact"
    summary = "factorised update V·S·U of q and v with a shared U, V per block"

    def apply(self, model, blocks, family):
        for i in blocks:
            view = BlockView(model.image_encoder.blocks[i], family)
            o = self.opts
            view.set("qkv", FacTQKV(view.get("qkv"), view.qkv_rows(), o.rank, o.dropout, o.scale))
