"""Selective methods: unfreeze existing parameters, add none (the checkpoint is already plain SAM).

- ``attention``: every parameter of the chosen blocks whose name starts with ``attn`` (qkv, proj, relative
  position tables; TinyViT: also its attention LayerNorm and per-head attention biases)
- ``bias``: every ``…bias`` in the chosen blocks
- ``layernorm``: both LayerNorms of the chosen blocks (weights and biases)
- ``late_ft``: all parameters of the chosen blocks ("classical" late finetuning)
- ``full``: the whole image encoder (placement ignored)
- ``frozen``: nothing in the encoder (only prompt encoder + mask decoder train; placement ignored)
"""

from __future__ import annotations

from peft_export.peft.base import BlockView, PeftMethod, unfreeze


class _Selective(PeftMethod):
    def apply(self, model, blocks, family):
        for i in blocks:
            view = BlockView(model.image_encoder.blocks[i], family)
            unfreeze(p for n, p in view.block.named_parameters() if self.select_name(n, view))

    def select_name(self, name: str, view: BlockView) -> bool:
        raise NotImplementedError


class AttentionTuning(_Selective):
    name = "attention"
    summary = "unfreeze the attention layers of the chosen blocks"

    def select_name(self, name, view):
        return name.startswith("attn")


class BiasTuning(_Selective):
    name = "bias"
    summary = "unfreeze the biases of the chosen blocks"

    def select_name(self, name, view):
        return name.endswith("bias")


class LayerNormTuning(_Selective):
    name = "layernorm"
    summary = "unfreeze the two LayerNorms of the chosen blocks"

    def select_name(self, name, view):
        return any(name.startswith(view.names[p] + ".") for p in ("norm1", "norm2"))


class LateFinetuning(_Selective):
    name = "late_ft"
    summary = "unfreeze all parameters of the chosen blocks"

    def select_name(self, name, view):
        return True


class FullFinetuning(_Selective):
    name = "full"
    summary = "unfreeze the whole image encoder"
    uses_placement = False

    def apply(self, model, blocks, family):
        unfreeze(model.image_encoder.parameters())


class FrozenEncoder(_Selective):
    name = "frozen"
    summary = "keep the image encoder frozen; train prompt encoder and mask decoder only"
    uses_placement = False

    def apply(self, model, blocks, family):
        pass
