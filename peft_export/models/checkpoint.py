"""Reading and writing checkpoints, with one clear line for every way a file can be wrong.

Accepted inputs:
- a plain SAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), also under a
  ``model``/``state_dict`` key; MobileSAM's unused classifier keys are dropped;
- a micro-sam / torch-em training checkpoint: ``model_state`` with keys prefixed ``sam.``;
- this project's own checkpoints (``format == "peft-export"``), which record the model name, the PEFT
  configuration and the package versions.

Either kind may hold an instance decoder's weights under ``decoder_state`` (micro-sam's key: torch-em UNETR names
without the ``encoder.`` part), see :mod:`peft_export.models.instance_decoder`.

Everything is loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_export.data.io import atomic_write
from peft_export.errors import CheckpointError, first_line

FORMAT = "peft-export"
FORMAT_VERSION = 1
_SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_DROP_PREFIXES = ("image_encoder.norm_head.", "image_encoder.head.")  # MobileSAM's classifier


@dataclass
class Checkpoint:
    """What a checkpoint file holds, normalised."""

    path: Path | None
    kind: str  # "sam" | "micro-sam" | "peft-export"
    state_dict: dict[str, torch.Tensor]
    model: str | None = None
    peft: dict | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def merged(self) -> bool:
        return bool(self.meta.get("merged", False))

    @property
    def decoder_state(self) -> dict[str, torch.Tensor] | None:
        """The instance decoder's weights (micro-sam's and our ``decoder_state``), or None."""
        state = self.raw.get("decoder_state")
        if state is None or (isinstance(state, dict) and not state):
            return None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: decoder_state is not a state dict of tensors")
        return dict(state)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    import peft_export

    out = {"peft_export": peft_export.__version__, "torch": str(torch.__version__)}
    for dist in ("segment-anything", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _torch_load(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"{path} holds Python objects that cannot be loaded safely (weights_only=True); "
                "not a plain weights checkpoint"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt file?)") from None
    except Exception as exc:  # torch.load raises many types for garbage input (KeyError, EOFError, ...)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt file?): {first_line(exc)}"
        ) from None


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _is_sam_state(sd: Any) -> bool:
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith(_SAM_PREFIXES) for k in sd)


def normalize_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the SAM weights in a loaded object (plain, nested, prefixed) and return them with SAM key names."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict: not a SAM checkpoint")
    candidates = [obj] + [obj[k] for k in ("model_state", "state_dict", "model", "sam") if isinstance(obj.get(k), dict)]
    for cand in candidates:
        for prefix in ("", "sam.", "model.", "module.", "module.sam.", "model.sam."):
            sd = _strip(cand, prefix) if prefix else cand
            if _is_sam_state(sd):
                sd = {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}
                bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
                if bad:
                    raise CheckpointError(f"{source}: entry {bad[0]!r} is not a tensor")
                return sd
    keys = ", ".join(list(map(str, obj))[:6])
    raise CheckpointError(f"{source} holds no SAM weights (no image_encoder/prompt_encoder/mask_decoder keys; "
                          f"top-level keys: {keys or 'none'})")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and classify a checkpoint file (see module docstring)."""
    path = Path(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if int(obj.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer peft-export (format {obj['format_version']}); "
                                  "upgrade peft-export")
        sd = obj.get("state_dict")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: peft-export checkpoint without a state_dict")
        meta = {k: v for k, v in obj.items() if k not in ("state_dict",)}
        return Checkpoint(path, "peft-export", sd, obj.get("model"), obj.get("peft"), meta, obj)
    kind = "micro-sam" if isinstance(obj, dict) and isinstance(obj.get("model_state"), dict) else "sam"
    sd = normalize_state_dict(obj, source=str(path))
    meta = {}
    if isinstance(obj, dict):
        meta = {k: v for k, v in obj.items() if isinstance(v, (int, float, str)) and k != "model_state"}
    return Checkpoint(path, kind, sd, None, None, meta, obj if isinstance(obj, dict) else {})


def guess_model(sd: dict[str, torch.Tensor]) -> str | None:
    """Best guess of the zoo name from a SAM state dict's shapes (for error messages)."""
    w = sd.get("image_encoder.patch_embed.proj.weight")
    if w is not None:
        return {768: "vit_b", 1024: "vit_l", 1280: "vit_h", 96: "vit_tiny"}.get(w.shape[0])
    w = sd.get("image_encoder.patch_embed.seq.0.c.weight")
    if w is not None:
        if w.shape[0] == 8:
            return "tinyvit_tiny"
        return "lite_medsam" if w.shape[-1] == 1 else "vit_t"
    return None


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], model_name: str,
                     *, source: str = "checkpoint") -> None:
    """Raise one clear line when ``sd`` does not fit ``model`` exactly (keys and shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    guess = guess_model(sd)
    if guess and guess != model_name and (shapes or missing):
        raise CheckpointError(f"{source} holds a {guess} model, not {model_name}: load it with --model {guess}")
    parts = []
    if shapes:
        k, a, b = shapes[0]
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: file {a} vs model {b}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        hint = ""
        if any(".w_a_linear_" in k or "FacT" in k or ".qkv_proj." in k or ".scale" in k for k in unexpected):
            hint = " (PEFT keys: load micro-sam checkpoints with --from micro-sam and the PEFT settings)"
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}{hint}")
    raise CheckpointError(f"{source} does not fit {model_name}: " + "; ".join(parts))


def load_state_dict_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], model_name: str,
                         *, strict: bool = True, source: str = "checkpoint") -> None:
    if strict:
        check_state_dict(model, sd, model_name, source=source)
        model.load_state_dict(sd, strict=True)
    else:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}, strict=False)


def save_checkpoint(path: str | os.PathLike, *, model_name: str, state_dict: dict[str, torch.Tensor],
                    peft: dict | None, merged: bool = False, extra: dict | None = None) -> Path:
    """Write this project's checkpoint format atomically (temporary file, then rename)."""
    from datetime import datetime, timezone

    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "peft": peft,
        "merged": merged,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
    }
    if extra:
        obj.update(extra)
    return save_torch(path, obj)


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`. PyTorch's zip writer reports a failed write
    (a full disk) as a RuntimeError ('unexpected pos ...'), which would end a command with 'internal error': it
    becomes the OSError that atomic_write turns into one line naming the path and the free space."""

    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            text = str(exc)
            if "inline_container" not in text and "write" not in text.lower():
                raise
            try:
                full = shutil.disk_usage(Path(tmp).parent).free < 2**20
            except OSError:
                full = False
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
            raise OSError(errno.EIO, f"the write failed ({first_line(exc)})", str(tmp)) from None

    return atomic_write(path, write)
