"""Build a ready-to-run model from what a user names: a zoo name (+ weights) or a checkpoint file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segment_anything.modeling import Sam

from peft_export.data.samples import lite_medsam_checkpoint
from peft_export.errors import CheckpointError, DataError, UsageError
from peft_export.manifest import export_command, not_an_export
from peft_export.models.checkpoint import Checkpoint, guess_model, load_state_dict_into, read_checkpoint
from peft_export.models.devices import resolve_device
from peft_export.models.instance_decoder import decoder_from_state
from peft_export.models.registry import MODELS, ModelSpec, get_spec
from peft_export.models.torch_backend import TorchBackend
from peft_export.peft import apply_peft_config
from peft_export.peft.options import peft_config_from
from peft_export.runtime.backends import RuntimeOptions, is_export_folder, open_model
from peft_export.runtime.cpu import describe_run
from peft_export.runtime.outputs import export_record
from peft_export.runtime.package import is_package

log = logging.getLogger("peft_export")
MERGE_SOURCES = ("auto", "peft-export", "micro-sam")


@dataclass
class LoadedModel:
    model: Sam
    spec: ModelSpec
    checkpoint: Checkpoint | None = None
    peft: dict | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    instance_decoder: Any = None  # InstanceDecoder (eval) when the checkpoint holds a decoder_state


def default_weights(name: str) -> Path | None:
    """Weights that ship with the tool for a zoo entry (LiteMedSAM only)."""
    if name == "lite_medsam":
        return lite_medsam_checkpoint()
    return None


def load_model(model: str, checkpoint: str | Path | None = None, *, require_weights: bool = True,
               peft_from: dict | None = None) -> LoadedModel:
    """Resolve ``model`` (zoo name or checkpoint path) and ``checkpoint`` into a model in eval mode.

    - ``model`` a zoo name: weights from ``checkpoint`` or the bundled default (LiteMedSAM); with
      ``require_weights`` a model without weights is refused (random weights give meaningless results).
    - ``model`` a file: a peft-export checkpoint (model name and PEFT config read from it), or a plain SAM
      state dict when ``checkpoint`` is None and its architecture can be recognised.
    - ``peft_from``: PEFT settings for a micro-sam checkpoint, which does not store them.
    """
    path = None
    if model in MODELS:
        spec = get_spec(model)
        path = Path(checkpoint) if checkpoint is not None else default_weights(model)
        if path is None and require_weights:
            raise UsageError(f"no weights for {model}: pass --checkpoint PATH (SAM weights are not bundled)")
    else:
        p = Path(model)
        if not p.exists():
            raise UsageError(f"{model!r} is neither a model name ({', '.join(MODELS)}) nor an existing file")
        if checkpoint is not None:
            raise UsageError("give either a checkpoint file as MODEL or a model name with --checkpoint, not both")
        path, spec = p, None
    ckpt = read_checkpoint(path) if path is not None else None
    if spec is None:
        name = ckpt.model or _sidecar_model(path)
        if name is None:
            name = guess_model(ckpt.state_dict)
            if name is None:
                raise CheckpointError(f"{path}: cannot tell which model this is; name it, e.g. "
                                      f"vit_b --checkpoint {path}")
        spec = get_spec(name)
    elif ckpt is not None and ckpt.model is not None and ckpt.model != spec.name:
        raise CheckpointError(f"{path} holds a {ckpt.model} model, not {spec.name}")
    sam = spec.build()
    peft_cfg = None
    if ckpt is not None:
        peft_cfg = ckpt.peft if ckpt.kind == "peft-export" else _adapt_foreign_peft(peft_from, ckpt)
        if peft_cfg and not ckpt.merged:
            apply_peft_config(sam, peft_cfg, spec.name)
        load_state_dict_into(sam, ckpt.state_dict, spec.name, source=str(path))
    sam.eval()
    loaded = LoadedModel(sam, spec, ckpt, peft_cfg, str(path) if path else spec.name)
    if ckpt is not None and ckpt.decoder_state is not None:
        loaded.instance_decoder = decoder_from_state(ckpt.decoder_state, sam, spec.name, source=str(path))
    return loaded


def load_for_merge(checkpoint: str | Path, *, source: str = "auto", model: str | None = None,
                   peft: str | None = None, blocks: str | None = None, options: dict[str, Any] | None = None,
                   warn: Callable[[str], None] = log.warning) -> LoadedModel:
    """A training checkpoint with its PEFT modules, ready to merge: ours record their PEFT settings; micro-sam
    checkpoints do not, so ``peft``/``blocks``/``options`` (configuration keys, as the CLI takes them) give them.
    """
    if source not in MERGE_SOURCES:
        raise UsageError(f"--from must be one of {', '.join(MERGE_SOURCES)}")
    if not Path(checkpoint).exists():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    kind = read_checkpoint(checkpoint).kind if source == "auto" else source
    if kind == "peft-export":
        if peft is not None:
            warn("this checkpoint records its own PEFT settings; --peft and its options are ignored")
        return load_model(str(checkpoint), None)
    if model is None:
        raise UsageError("--model is required for checkpoints that do not record it (micro-sam, plain SAM), "
                         "e.g. --model vit_b")
    peft_from = None
    if peft is not None:
        peft_from = peft_config_from(peft, blocks, options or {}, warn).to_dict()
    elif kind == "micro-sam":
        warn("no --peft given: loading as a plain (non-PEFT) micro-sam checkpoint")
    return load_model(model, checkpoint, peft_from=peft_from)


def _sidecar_model(path: Path) -> str | None:
    """The model name recorded next to a merged plain state dict (``merged.pt.json``), if any."""
    import json

    side = path.with_name(path.name + ".json")
    try:
        name = json.loads(side.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in MODELS else None


def _adapt_foreign_peft(peft: dict | None, ckpt: Checkpoint) -> dict | None:
    """micro-sam's SSF never wraps the patch embedding: follow what the file holds unless told otherwise."""
    if not peft:
        return peft
    peft = {**peft, "options": dict(peft.get("options") or {})}
    if peft["method"] == "ssf" and "patch_embed" not in peft["options"]:
        peft["options"]["patch_embed"] = any(k.startswith("image_encoder.patch_embed.") and k.endswith(".scale")
                                             for k in ckpt.state_dict)
    return peft


EVALUATION_BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")


def evaluation_backend(model: str, checkpoint: str | None = None, backend: str = "auto", device: str = "auto",
                       runtime=None):
    """What ``evaluate`` runs: PyTorch for checkpoints and zoo names, a runtime backend (the runtime's opener,
    ``backend`` auto or named, the other ``runtime`` options as given) for export folders and packages. Returns
    (backend, description dict)."""
    if backend not in EVALUATION_BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(EVALUATION_BACKENDS)}")
    if is_export_folder(model) or is_package(model):
        if backend == "torch":
            raise UsageError(f"{model} is an export: evaluate it with a runtime backend (--backend auto)")
        if checkpoint is not None:
            raise UsageError("--checkpoint does not apply to an export folder")
        be = open_model(model, (runtime or RuntimeOptions()).replace(backend=backend))
        return be, {**describe_run(be.info), "export": export_record(model)}
    if Path(model).is_dir():  # a training run folder, or any folder without a manifest: say what it is
        raise DataError(not_an_export(model))
    if backend not in ("auto", "torch"):
        if Path(model).is_file():
            raise UsageError(f"{model} is a training checkpoint, not an export folder: --backend {backend} runs "
                             f"exports; make one with `{export_command(model)}`, or evaluate the checkpoint in "
                             "PyTorch (--backend torch)")
        raise UsageError(f"--backend {backend} runs export folders; export {model} first "
                         "(peft-export export / merge-and-export) or use --backend torch")
    loaded = load_model(model, checkpoint)
    be = TorchBackend(loaded.model, loaded.spec.preprocess, resolve_device(device), multimask=loaded.spec.multimask,
                      instance_decoder=loaded.instance_decoder, name=loaded.spec.name, source=loaded.source)
    return be, {**be.info.describe(), "peft": loaded.peft}
