"""Merge with proof: fold the adapters in, then compare the merged model with the unmerged one.

Every merge is verified on a sample input (the real DSB2018 validation tile when the sample data is installed,
otherwise a fixed random image): the image embedding and the low-res mask logits for a few box and point
prompts. The largest differences are reported; above tolerance the merge is an error.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam

from peft_export.data.dataset import sample_image
from peft_export.data.io import atomic_write
from peft_export.data.samples import sha256_file
from peft_export.errors import VerificationError
from peft_export.files import clean_stale, together
from peft_export.imaging import PreprocessSpec, preprocess
from peft_export.models.checkpoint import save_checkpoint, save_torch, versions
from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.paths import refuse_inputs
from peft_export.peft.base import NotMergeableError
from peft_export.peft.core import is_mergeable, merge_peft, peft_state
from peft_export.prompts import pad_points
from peft_export.prompts import sample_prompts as spread

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


@dataclass
class MergeReport:
    embedding_max_abs_diff: float
    masks_max_abs_diff: float
    embedding_scale: float
    masks_scale: float
    tolerance: float
    passed: bool
    sample: str
    method: str | None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def sample_input(spec: PreprocessSpec) -> tuple[np.ndarray, str, tuple[int, int]]:
    """The preprocessed sample image (:func:`peft_export.data.dataset.sample_image`), its name and resized size."""
    image, name = sample_image(spec.img_size)
    prepared = preprocess(image, spec)
    return prepared.tensor, name, prepared.resized_hw


def merge_check_prompts(resized_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Three boxes and two single points (with padding) spread over the image, in model-input pixels."""
    boxes = spread(resized_hw, 2, 3, seed=0)
    points = pad_points(*spread(resized_hw, 1, 2, seed=1))
    return np.concatenate([boxes[0], points[0]]), np.concatenate([boxes[1], points[1]])


@torch.no_grad()
def compare_models(a: Sam, b: Sam, spec: PreprocessSpec) -> dict:
    """Max |diff| of image embedding and all-mask logits between two models on the sample input."""
    x, name, resized = sample_input(spec)
    xt = torch.from_numpy(x)
    ea, eb = a.image_encoder(xt), b.image_encoder(xt)
    coords, labels = (torch.from_numpy(v) for v in merge_check_prompts(resized))
    h, w = a.prompt_encoder.image_embedding_size
    mask_in = torch.zeros(len(coords), 1, 4 * h, 4 * w)
    has = torch.zeros(len(coords))
    ma, _ = PromptDecoder(a)(ea, coords, labels, mask_in, has)
    mb, _ = PromptDecoder(b)(eb, coords, labels, mask_in, has)
    return {
        "embedding_max_abs_diff": float((ea - eb).abs().max()),
        "masks_max_abs_diff": float((ma - mb).abs().max()),
        "embedding_scale": float(ea.abs().max()),
        "masks_scale": float(ma.abs().max()),
        "sample": name,
    }


def merge_and_verify(model: Sam, spec: PreprocessSpec, *, atol: float = DEFAULT_ATOL,
                     rtol: float = DEFAULT_RTOL) -> tuple[Sam, MergeReport]:
    """Fold the PEFT method of ``model`` in (on a copy) and verify it. Returns (merged model, report)."""
    state = peft_state(model)
    method = state.config.method if state else None
    if not is_mergeable(model):
        raise NotMergeableError(f"{method} cannot be folded into plain SAM weights (a nonlinear adapter branch); "
                                "export keeps the adapter modules instead")
    model = model.eval().float()
    merged = merge_peft(copy.deepcopy(model)).eval()
    figures = compare_models(model, merged, spec)
    tol_e = atol + rtol * figures["embedding_scale"]
    tol_m = atol + rtol * figures["masks_scale"]
    passed = figures["embedding_max_abs_diff"] <= tol_e and figures["masks_max_abs_diff"] <= tol_m
    report = MergeReport(
        figures["embedding_max_abs_diff"], figures["masks_max_abs_diff"], figures["embedding_scale"],
        figures["masks_scale"], max(tol_e, tol_m), passed, figures["sample"], method,
        {"atol": atol, "rtol": rtol, "peft": state.config.to_dict() if state else None},
    )
    if not passed:
        raise VerificationError(
            f"merged model differs from the unmerged one: embedding max |diff| "
            f"{report.embedding_max_abs_diff:.2e} (tolerance {tol_e:.1e}), masks {report.masks_max_abs_diff:.2e} "
            f"(tolerance {tol_m:.1e}); nothing written"
        )
    return merged, report


def save_merged(path: str | Path, merged: Sam, *, model_name: str, report: MergeReport, source: dict) -> Path:
    """Write the merged weights as a plain SAM state dict (loadable by segment_anything) + ``<path>.json``."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    sidecar = {"format": "peft-export-merged", "model": model_name, "source": source,
               "verification": report.to_dict(), "versions": versions()}
    save_torch(path, sd)
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
    return path


def merge_to_file(loaded, output: str | Path, checkpoint: str | Path, *, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL) -> tuple[dict, MergeReport | None]:
    """Merge a loaded training checkpoint (:func:`peft_export.loading.load_for_merge`) into ``output``:
    verified plain SAM weights + sidecar, and ``<stem>.decoder.pt`` (``{"decoder_state": ...}``, micro-sam's key)
    when the checkpoint holds an instance decoder. A method that cannot be folded (AdaptFormer) is written as a
    peft-export checkpoint that keeps its adapter modules instead (report None). Returns (result record, report)."""
    check_merge_output(output, checkpoint)
    clean_stale(Path(output).parent)
    state = peft_state(loaded.model)
    src = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": sha256_file(checkpoint),
           "kind": loaded.checkpoint.kind, "peft": state.config.to_dict() if state else None}
    decoder = loaded.checkpoint.decoder_state
    if not is_mergeable(loaded.model):
        extra = {"source": src, **({"decoder_state": decoder} if decoder is not None else {})}
        save_checkpoint(output, model_name=loaded.spec.name, state_dict=loaded.model.state_dict(),
                        peft=state.config.to_dict(), merged=False, extra=extra)
        reason = (f"{state.config.method} cannot be folded into plain SAM weights (nonlinear adapter branch); "
                  f"wrote {output} as a peft-export checkpoint that keeps the adapter modules")
        return {"output": str(output), "merged": False, "reason": reason, "model": loaded.spec.name}, None
    merged, report = merge_and_verify(loaded.model, loaded.spec.preprocess, atol=atol, rtol=rtol)
    if decoder is None:
        decoder_path(output).unlink(missing_ok=True)  # (--force) a stale one would pair with the wrong weights
    with together():  # weights, decoder and sidecar land together: a crash never pairs them across two merges
        if decoder is not None:  # beside the plain state dict, which must stay loadable by segment_anything as is
            src["instance_decoder"] = str(decoder_path(output))
            save_torch(decoder_path(output), {"decoder_state": decoder})
        save_merged(output, merged, model_name=loaded.spec.name, report=report, source=src)
    how = state.config.describe() if state else "no PEFT method (weights copied)"
    return {"output": str(output), "sidecar": str(sidecar_path(output)), "merged": True, "model": loaded.spec.name,
            "how": how, "verification": report.to_dict(), "instance_decoder": src.get("instance_decoder")}, report


def check_merge_output(output: str | Path, checkpoint: str | Path) -> None:
    """The merged weights, their sidecar and decoder file must not be (links to) the checkpoint read: refused even
    with --force (:func:`peft_export.paths.refuse_inputs`)."""
    refuse_inputs([output, sidecar_path(output), decoder_path(output)], [checkpoint, sidecar_path(checkpoint)])


def decoder_path(path: str | Path) -> Path:
    """Where a merge writes the instance decoder's weights: ``merged.pt`` -> ``merged.decoder.pt``."""
    path = Path(path)
    return path.with_name(path.stem + ".decoder.pt")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")
