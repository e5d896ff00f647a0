"""SSF (scale and shift features): ``y = layer(x) · s + t`` per output channel.

Init ``s ~ N(1, 0.2)``, ``t ~ N(0, 0.2)``. In each chosen block: qkv, proj, both MLP linears and both
LayerNorms; and (option ``patch_embed``, on by default as the study describes it) the patch embedding:
SAM ViT's ``patch_embed.proj`` conv, TinyViT's last patch-embedding conv+BN. Merge (exact):
Linear/Conv ``W' = diag(s) W``, ``b' = s⊙b + t``; LayerNorm/BatchNorm ``γ' = s⊙γ``, ``β' = s⊙β + t``.
Keys: ``….layer.weight``, ``….scale``, ``….shift``.

micro-sam 1.8's SSF wrapper does not reach the patch embedding (its check never matches), so micro-sam SSF
checkpoints carry no patch-embedding scale/shift; they are imported with ``patch_embed=False``.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_export.peft.base import BlockView, Fold, MergeableModule, PeftMethod, get_submodule, set_submodule

SSF_PARTS = ("qkv", "proj", "fc1", "fc2", "norm1", "norm2")


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[0]
    if isinstance(layer, nn.Sequential) and hasattr(layer, "bn"):  # TinyViT Conv2dBN
        return layer.bn.num_features
    raise TypeError(f"SSF cannot wrap {type(layer).__name__}")


class ScaleShift(MergeableModule):
    base_attr = "layer"

    def __init__(self, layer: nn.Module):
        super().__init__()
        dim = _out_channels(layer)
        self.layer = layer
        self.scale = nn.Parameter(torch.normal(mean=1.0, std=0.2, size=(dim,)))
        self.shift = nn.Parameter(torch.normal(mean=0.0, std=0.2, size=(dim,)))
        self.channels_first = not isinstance(layer, (nn.Linear, nn.LayerNorm))

    def forward(self, x):
        y = self.layer(x)
        if self.channels_first:
            return y * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return y * self.scale + self.shift

    def delta_weight(self) -> dict[str, Fold]:
        """``W' = diag(s) W`` and ``b' = s⊙b + t`` (LayerNorm / TinyViT's BatchNorm: ``γ' = s⊙γ``, ``β' = s⊙β + t``)."""
        s, t = self.scale.float(), self.shift.float()
        prefix = "bn." if isinstance(self.layer, nn.Sequential) else ""  # TinyViT Conv2dBN: fold into its BN
        return {f"{prefix}weight": Fold(scale=s), f"{prefix}bias": Fold(scale=s, add=t)}


def patch_embed_target(family: str) -> str:
    return "patch_embed.proj" if family == "vit" else "patch_embed.seq.2"


class SSF(PeftMethod):
    name = "ssf"
    summary = "per-channel scale and shift after each layer of the chosen blocks (+ patch embedding)"

    def apply_global(self, model, family):
        if self.opts.patch_embed:
            name = patch_embed_target(family)
            enc = model.image_encoder
            set_submodule(enc, name, ScaleShift(get_submodule(enc, name)))

    def apply(self, model, blocks, family):
        for i in blocks:
            view = BlockView(model.image_encoder.blocks[i], family)
            for part in SSF_PARTS:
                view.set(part, ScaleShift(view.get(part)))
