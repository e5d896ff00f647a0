"""The common interface of all PEFT methods, and the block view that hides ViT/TinyViT differences.

Every method is a :class:`PeftMethod` subclass in its own module (``lora.py``, ``fact.py``, ``ssf.py``,
``adaptformer.py``, ``selective.py``) that knows how to

- ``apply(model, blocks)``: modify the image encoder in place for a placement (the encoder is frozen before);
- ``mergeable``: whether its update can be folded into plain SAM weights;
- ``merge(model)``: fold itself in, leaving segment_anything's own module tree and key names. One verb for
  every method, as in Hugging Face peft: each adapter layer (:class:`MergeableModule`) wraps its
  ``base_layer`` and says by ``delta_weight()`` how its update folds into that layer's parameters; the fold
  itself (in fp32) is written once, here.

Options are declared in :mod:`peft_export.peft.options` (one typed class per method).

Module names follow the reference implementation (micro-sam's ``peft_sam``) for SAM ViT blocks, so micro-sam
PEFT checkpoints load into a model prepared by this package with the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peft_export.errors import UsageError, VerificationError
from peft_export.peft.options import parse_options

VIT_NAMES = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.lin1", "fc2": "mlp.lin2",
             "norm1": "norm1", "norm2": "norm2", "mlp": "mlp"}
TINYVIT_NAMES = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                 "norm1": "attn.norm", "norm2": "mlp.norm", "mlp": "mlp"}


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    *parents, last = dotted.split(".")
    parent = root
    for part in parents:
        parent = getattr(parent, part)
    setattr(parent, last, new)


@dataclass
class BlockView:
    """One encoder block with family-independent names for its parts."""

    block: nn.Module
    family: str  # "vit" or "tinyvit"

    @property
    def names(self) -> dict[str, str]:
        return VIT_NAMES if self.family == "vit" else TINYVIT_NAMES

    def get(self, part: str) -> nn.Module:
        return get_submodule(self.block, self.names[part])

    def set(self, part: str, module: nn.Module) -> None:
        set_submodule(self.block, self.names[part], module)

    @property
    def dim(self) -> int:
        return base_linear(self.get("qkv")).in_features

    def qkv_rows(self) -> dict[str, torch.Tensor]:
        """Output rows of the fused qkv projection that belong to q, k and v."""
        c = self.dim
        if self.family == "vit":  # [q | k | v]
            return {t: torch.arange(i * c, (i + 1) * c, device="cpu") for i, t in enumerate("qkv")}
        from peft_export.models.tiny_vit import qkv_index  # lazy: pulls PIL, segment_anything, torchvision

        return qkv_index(self.block.num_heads, c)


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain nn.Linear inside a (possibly wrapped) projection."""
    while isinstance(module, PeftLayer):
        module = module.base_layer
    if not isinstance(module, nn.Linear):
        raise TypeError(f"no linear layer inside {type(module).__name__}")
    return module


class NotMergeableError(UsageError):
    pass


class PeftMethod:
    """Base class. Subclasses set ``name``/``summary``/``mergeable`` and implement ``apply``.

    Options come from the method's options class (:mod:`peft_export.peft.options`): ``self.opts`` is the
    validated instance, ``self.options`` the plain dict stored in checkpoints.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    uses_placement: ClassVar[bool] = True

    def __init__(self, **options: Any):
        self.opts = parse_options(self.name, options)

    @property
    def options(self) -> dict[str, Any]:
        return self.opts.model_dump()

    def apply(self, model: nn.Module, blocks: list[int], family: str) -> None:
        raise NotImplementedError

    def apply_global(self, model: nn.Module, family: str) -> None:
        """Changes outside the chosen blocks (e.g. SSF's patch embedding). Default: none."""

    def merge(self, model: nn.Module, family: str) -> None:
        """Fold every adapter layer into its base layer; nothing changes when one holds a NaN."""
        if not self.mergeable:
            raise NotMergeableError(f"{self.name} cannot be merged into plain SAM weights ({self.summary})")
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MergeableModule)]
        for layer_name, layer in layers:
            for param_name, p in layer.named_parameters():
                if not torch.isfinite(p).all():
                    raise VerificationError(
                        f"cannot merge: {layer_name}.{param_name} holds NaN or infinite values (the training "
                        "diverged or the checkpoint is damaged); nothing was merged")
        for layer_name, layer in layers:
            set_submodule(model, layer_name, layer.merged())


class PeftLayer(nn.Module):
    """A module that wraps one base layer, kept under micro-sam's attribute name ``base_attr`` (``qkv_proj``,
    ``mlp_layer``, ``layer``, ``mlp_proj``), so that state-dict keys stay micro-sam's."""

    base_attr: ClassVar[str]

    @property
    def base_layer(self) -> nn.Module:
        return getattr(self, self.base_attr)


@dataclass
class Fold:
    """How one parameter ``p`` of a base layer takes an update: ``p' = scale ⊙ p + add``.

    ``scale`` is per output channel (dimension 0); ``add`` has the parameter's shape. Additive methods (LoRA,
    FacT) give ``add``; SSF gives ``scale`` (and its shift as ``add`` for biases) — the multiplicative fold
    that IA3 does in Hugging Face peft.
    """

    add: torch.Tensor | None = None
    scale: torch.Tensor | None = None


class MergeableModule(PeftLayer):
    """An adapter layer whose update folds exactly into its base layer; ``delta_weight`` says how."""

    def delta_weight(self) -> dict[str, Fold]:
        """Parameter name inside ``base_layer`` (``weight``, ``lin1.weight``, ``bn.bias``) -> its fold (fp32)."""
        raise NotImplementedError

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with the update folded in: computed in fp32, stored in the layer's own dtype."""
        base = self.base_layer
        for name, fold in self.delta_weight().items():
            _fold_into(base, name, fold)
        return base


def _fold_into(base: nn.Module, name: str, fold: Fold) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = base.get_submodule(owner_name) if owner_name else base
    param = getattr(owner, attr)
    if param is None:  # a layer without a bias gets one (SSF's shift)
        param = nn.Parameter(torch.zeros(fold.add.shape, dtype=owner.weight.dtype, device=owner.weight.device),
                             requires_grad=False)
        setattr(owner, attr, param)
    w = param.detach().float()
    if fold.scale is not None:
        w = w * fold.scale.float().view(-1, *([1] * (w.ndim - 1)))
    if fold.add is not None:
        w = w + fold.add.float()
    param.data.copy_(w.to(param.dtype))


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


def unfreeze(params) -> None:
    for p in params:
        p.requires_grad = True
