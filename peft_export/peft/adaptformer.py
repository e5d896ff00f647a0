"""AdaptFormer: a bottleneck adapter parallel to each chosen block's MLP (not mergeable: nonlinear branch).

``mlp(u)`` with ``u = norm2(x)`` becomes ``MLP(u) + [u] + α·Up(ReLU(Down(u)))``. Down: Linear(D, 64)
kaiming-uniform, Up: Linear(64, D) zeros, biases zero; α a learnable scalar (init 1) or a fixed number.

Two named variants: ``study`` keeps the extra ``+ u`` residual term of the version the study used (and that
micro-sam 1.8 still has); ``plain`` drops it (the later refactor). Recorded in every checkpoint.
Keys: ``mlp.mlp_proj.*``, ``mlp.down_proj.{weight,bias}``, ``mlp.up_proj.{weight,bias}``, ``mlp.alpha``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_export.peft.base import BlockView, PeftLayer, PeftMethod


class AdaptFormerMLP(PeftLayer):
    base_attr = "mlp_proj"

    def __init__(self, mlp: nn.Module, dim: int, family: str, bottleneck: int, alpha, dropout: float,
                 variant: str):
        super().__init__()
        self.mlp_proj = mlp
        self.family = family
        self.residual = variant == "study"
        if alpha == "learnable":
            self.alpha = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("alpha", torch.tensor([float(alpha)]))
        self.down_proj = nn.Linear(dim, bottleneck)
        self.non_linear_func = nn.ReLU()
        self.up_proj = nn.Linear(bottleneck, dim)
        self.dropout_layer = nn.Dropout(dropout) if dropout else nn.Identity()
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x):
        u = self.mlp_proj.norm(x) if self.family == "tinyvit" else x  # TinyViT's MLP normalises inside
        out = self.mlp_proj(x)
        up = self.up_proj(self.dropout_layer(self.non_linear_func(self.down_proj(u)))) * self.alpha
        return out + up + u if self.residual else out + up


class AdaptFormer(PeftMethod):
    name = "adaptformer"
    summary = "bottleneck adapter beside the MLP; a nonlinear branch, so export keeps the adapter modules"
    mergeable = False

    def apply(self, model, blocks, family):
        o = self.opts
        for i in blocks:
            view = BlockView(model.image_encoder.blocks[i], family)
            view.set("mlp", AdaptFormerMLP(view.get("mlp"), view.dim, family, o.bottleneck, o.alpha, o.dropout,
                                           o.variant))
