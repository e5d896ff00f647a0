"""The common interface of all PEFT methods, and the block view that hides ViT/TinyViT differences.

Every method is a :class:`PeftMethod` subclass in its own module (``lora.py``, ``fact.py``, ``ssf.py``,
``adaptformer.py``, ``selective.py``) that knows how to

- ``apply(model, blocks)``: modify the image encoder in place for a placement (the encoder is frozen before);
- ``mergeable``: whether its update can be folded into plain SAM weights;
- ``merge(model)``: fold itself in (fp32), leaving segment_anything's own module tree and key names.

Module names follow the reference implementation (micro-sam's ``peft_sam``) for SAM ViT blocks, so micro-sam
PEFT checkpoints load into a model prepared by this package with the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peft_export.errors import UsageError

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
        from peft_export.models.tiny_vit import qkv_index

        return qkv_index(self.block.num_heads, c)


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain nn.Linear inside a (possibly wrapped) projection."""
    while not isinstance(module, nn.Linear):
        inner = getattr(module, "qkv_proj", None) or getattr(module, "layer", None)
        if inner is None:
            raise TypeError(f"no linear layer inside {type(module).__name__}")
        module = inner
    return module


@dataclass
class PeftConfig:
    """A PEFT method with its options and its placement. Stored in every checkpoint (``to_dict``)."""

    method: str
    placement: str = "all"
    options: dict[str, Any] = field(default_factory=dict)
    blocks: list[int] | None = None  # resolved indices (filled in by apply_peft)

    def to_dict(self) -> dict:
        return {"method": self.method, "placement": self.placement, "options": dict(self.options),
                "blocks": list(self.blocks) if self.blocks is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> PeftConfig:
        if not isinstance(d, dict) or "method" not in d:
            raise UsageError("PEFT configuration must be a dict with a 'method'")
        return cls(method=d["method"], placement=d.get("placement", "all"), options=dict(d.get("options") or {}),
                   blocks=list(d["blocks"]) if d.get("blocks") is not None else None)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}({opts}) on blocks {self.placement}" if opts else f"{self.method} on {self.placement}"


class NotMergeableError(UsageError):
    pass


class PeftMethod:
    """Base class. Subclasses set ``name``/``mergeable``/``adds_parameters`` and implement apply (and merge)."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    adds_parameters: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}
    option_types: ClassVar[dict[str, type]] = {}

    def __init__(self, **options: Any):
        unknown = set(options) - set(self.defaults)
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise UsageError(f"{self.name} has no option {sorted(unknown)[0]!r} (options: {allowed})")
        self.options = {**self.defaults, **options}
        self.validate()

    def validate(self) -> None:
        """Check option values; raise UsageError with a clear line."""

    def apply(self, model: nn.Module, blocks: list[int], family: str) -> None:
        raise NotImplementedError

    def apply_global(self, model: nn.Module, family: str) -> None:
        """Changes outside the chosen blocks (e.g. SSF's patch embedding). Default: none."""

    def merge(self, model: nn.Module, family: str) -> None:
        if not self.mergeable:
            raise NotMergeableError(f"{self.name} cannot be merged into plain SAM weights ({self.summary})")
        for module_name, module in list(model.named_modules()):
            if isinstance(module, MergeableModule):
                set_submodule(model, module_name, module.merged())


class MergeableModule(nn.Module):
    """A wrapper that can return the plain module with its update folded in (fp32)."""

    def merged(self) -> nn.Module:
        raise NotImplementedError


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


def unfreeze(params) -> None:
    for p in params:
        p.requires_grad = True
