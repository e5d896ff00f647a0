"""The parity gate: run the exported graphs with ONNX Runtime and compare them with the PyTorch model.

Sample: :func:`peft_export.data.dataset.sample_image` (the real DSB2018 validation tile when the sample data is
installed), the merge check's prompts (three boxes, two points) plus two box+point prompts (N = 3 points, so a
second point count is exercised), once without and once with a previous
mask as ``mask_input``. ``decoder.onnx`` (Meta's signature) runs a box, a point and a box+point prompt (one at a
time, with and without mask input) at two original image sizes of different aspect ratios.
The PyTorch side is computed once per model (cached by a digest of its structure and weights), so exporting one
model at several precisions in one process runs the PyTorch model once.

fp32: max |diff| of the image embedding, the low-res mask logits and IoUs of ``decoder_lowres.onnx``, and the
upscaled masks of ``decoder.onnx`` (decoders fed the PyTorch embedding, so each graph is checked on its own),
each against ``atol + rtol * max|reference|``.
Batch axis (every precision): the encoder run on the sample and its mirror image together (batch 2) gives what
each gives alone (batch 1) — fp32 within the same tolerance, fp16 / int8 within a relative error of 1e-3 (int8:
or the encoder's own relative error vs PyTorch, whichever is larger: dynamic int8 scales over the whole batch).
fp16 / int8: mask IoU (logits > 0) of the whole ONNX chain (encoder -> decoder, masks at the original size) vs
the fp32 PyTorch model, mean over prompts >= the threshold (0.99 fp16, 0.95 int8); Meta's decoder likewise.
All figures are recorded in the manifest; a failed check is an error and the export is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from peft_export.data.dataset import sample_image
from peft_export.export.options import Thresholds
from peft_export.imaging import (
    PreprocessSpec,
    normalize_and_pad,
    preprocess,
    resize_for_model,
    resized_shape,
    upscale_masks,
)
from peft_export.memo import Memo
from peft_export.metrics import mask_ious
from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.peft.merge import merge_check_prompts as merge_prompts
from peft_export.prompts import sample_prompts as spread
from peft_export.runtime.backend import select_masks
from peft_export.runtime.onnx_backend import ort_session


@dataclass
class Check:
    name: str
    value: float
    limit: float
    kind: str  # "max" (value <= limit passes) or "min" (value >= limit passes)
    note: str = ""

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value <= self.limit if self.kind == "max" else self.value >= self.limit

    def to_dict(self) -> dict:
        return {"name": self.name, "value": float(self.value), "limit": float(self.limit), "kind": self.kind,
                "passed": self.passed, "note": self.note}


@dataclass
class ParityReport:
    precision: str
    sample: str
    checks: list[Check] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"precision": self.precision, "sample": self.sample, "passed": self.passed,
                "checks": [c.to_dict() for c in self.checks], **self.figures}


# ---- sample ------------------------------------------------------------------------------------------

def baked_input(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What a baked-preprocessing encoder takes: the resized image, rounded to uint8 (H', W', 3)."""
    return np.clip(np.round(resize_for_model(image, spec)), 0, 255).astype(np.uint8)


def parity_prompt_sets(resized_hw: tuple[int, int]) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Prompt groups (coords (B, N, 2), labels (B, N)) in model-input pixels; and the prompt count: the merge
    check's boxes and points (N = 2), then two box + point prompts (N = 3)."""
    groups = [merge_prompts(resized_hw), spread(resized_hw, 3, 2, seed=2)]
    return groups, sum(len(g[0]) for g in groups)


def meta_sizes(original_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The sample's size and a second size of a different aspect ratio, for Meta's decoder."""
    h, w = original_hw
    return [(h, w), (h + h // 2 + 1, max(w // 2 + 3, 2))]


# ---- PyTorch references ------------------------------------------------------------------------------

def select_single(masks: torch.Tensor, iou: torch.Tensor, num_points: int, multimask: bool):
    """Meta's single-mask choice (mask 0 for more than one point incl. padding, else the best of 1..3);
    mask 0 always for models whose multimask outputs were not trained."""
    if not multimask:
        return masks[:, :1], iou[:, :1]
    weight = torch.tensor([[1000.0] + [0.0] * (iou.shape[1] - 1)])
    best = torch.argmax(iou + (num_points - 2.5) * weight, dim=1)
    idx = torch.arange(masks.shape[0])
    return masks[idx, best].unsqueeze(1), iou[idx, best].unsqueeze(1)


def postprocess_torch(low_res: torch.Tensor, img_size: int, original_hw: tuple[int, int]) -> torch.Tensor:
    """segment_anything's ``Sam.postprocess_masks`` (bilinear to S, crop, bilinear to the original size)."""
    rh, rw = resized_shape(original_hw[0], original_hw[1], img_size)
    up = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)[..., :rh, :rw]
    return F.interpolate(up, tuple(original_hw), mode="bilinear", align_corners=False)


# ---- metrics -----------------------------------------------------------------------------------------

def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a - b)
    return float(d.max()) if d.size else 0.0


def _pick(low_res: np.ndarray, iou: np.ndarray, multimask: bool) -> np.ndarray:
    return select_masks(low_res, iou, multimask)[0]


# ---- the PyTorch reference (cached per model) ----------------------------------------------------------

# prompts of each group that Meta's decoder is run on (one prompt at a time, as its clients do): group 0 a box
# and a point (N = 2: Meta's multimask choice), group 1 a box + point (N = 3: mask 0). The low-res decoder runs
# every prompt; the Meta graph adds only the selection and upscaling on top of it.
META_PICKS = ((0, 3), (0,))


@dataclass
class _Round:
    coords: np.ndarray
    labels: np.ndarray
    mask_in: np.ndarray
    has: np.ndarray
    low_res: np.ndarray  # (B, 4, 4h, 4w)
    iou: np.ndarray  # (B, 4)
    picked: np.ndarray  # the runtime's chosen mask per prompt, at the original size
    meta: list  # [(prompt index, (H, W), masks, iou_predictions, low_res_masks)]


@dataclass
class _Reference:
    sample: str
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    feed_image: np.ndarray
    embedding: np.ndarray
    rounds: list[_Round]
    meta_sizes: list[tuple[int, int]]


# the PyTorch reference outputs of the last model checked (its fp32/fp16/int8 exports share them)
REFERENCES = Memo("parity.references", limit=1)


def model_digest(sam) -> str:
    """sha256 of the module structure and every parameter and buffer value: equal digests compute the same."""
    import hashlib

    from peft_export.export.onnx_export import fingerprint  # lazy: pulls onnx

    h = hashlib.sha256(fingerprint(sam).encode())
    for name, t in sorted(sam.state_dict(keep_vars=False).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _model_outputs(sam, spec: PreprocessSpec, baked: bool) -> tuple:
    """The expensive part (encoder + every decoder round), cached for the last model by :func:`model_digest`."""
    image, sample = sample_image(spec.img_size)
    key = repr((model_digest(sam), sample, spec.to_dict(), baked))
    hit = REFERENCES.get(key)
    if hit is not None:
        return hit
    original_hw = tuple(int(v) for v in np.asarray(image).shape[:2])
    if baked:
        u8 = baked_input(image, spec)
        x = normalize_and_pad(u8.astype(np.float32), spec)
        resized_hw, feed_image = tuple(u8.shape[:2]), u8
    else:
        prep = preprocess(image, spec)
        x, resized_hw, feed_image = prep.tensor, tuple(prep.resized_hw), prep.tensor
    groups, _ = parity_prompt_sets(resized_hw)
    h4, w4 = (4 * v for v in sam.prompt_encoder.image_embedding_size)
    dec = PromptDecoder(sam)
    emb = sam.image_encoder(torch.from_numpy(x))
    rounds = []
    for coords, labels in groups:
        b = len(coords)
        mask_in = np.zeros((b, 1, h4, w4), np.float32)
        has = np.zeros(b, np.float32)
        for _rep in range(2):  # without, then with the previous single-mask logits as mask input
            lr, iou = dec(emb, *(torch.from_numpy(a) for a in (coords, labels, mask_in, has)))
            rounds.append((coords, labels, mask_in.copy(), has.copy(), lr, iou))
            mask_in = lr[:, :1].numpy().copy()
            has = np.ones(b, np.float32)
    out = (sample, original_hw, resized_hw, feed_image, emb.numpy(), rounds)
    REFERENCES.put(key, out)
    return out


@torch.no_grad()
def torch_reference(sam, spec: PreprocessSpec, *, baked: bool, single_mask: bool, multimask: bool) -> _Reference:
    """Every PyTorch (fp32) output the gate compares with (the model's outputs cached, see _model_outputs)."""
    sample, original_hw, resized_hw, feed_image, emb, raw = _model_outputs(sam, spec, baked)
    s = int(spec.img_size)
    sizes = meta_sizes(original_hw)
    rounds = []
    for i, (coords, labels, mask_in, has, lr, iou) in enumerate(raw):
        picks = META_PICKS[i // 2]
        picked = upscale_masks(_pick(lr.numpy(), iou.numpy(), multimask), s, resized_hw, original_hw)
        idx = torch.tensor(picks)
        lr_m, iou_m = lr[idx], iou[idx]
        if single_mask:
            lr_m, iou_m = select_single(lr_m, iou_m, coords.shape[1], multimask)
        meta = []
        for hw in sizes:
            up = postprocess_torch(lr_m, s, hw).numpy()
            meta += [(p, hw, up[j:j + 1], iou_m[j:j + 1].numpy(), lr_m[j:j + 1].numpy()) for j, p in enumerate(picks)]
        rounds.append(_Round(coords, labels, mask_in, has, lr.numpy(), iou.numpy(), picked, meta))
    return _Reference(sample, original_hw, resized_hw, feed_image, emb, rounds, sizes)


# ---- the gate ----------------------------------------------------------------------------------------

def _session(path: Path):
    return ort_session(path)


def _batch_figures(session, ref: _Reference, emb_1: np.ndarray, fig: dict) -> None:
    """The batch axis: the sample and its mirror image embedded together (batch 2) must give what each gives
    alone (batch 1). Skipped for encoders without a batch axis (baked preprocessing, exports before it)."""
    dim = session.get_inputs()[0].shape[0] if len(session.get_inputs()[0].shape) == 4 else None
    if isinstance(dim, int) or dim is None:
        fig["encoder_batch"] = {"checked": False, "reason": "the encoder input has no batch axis"}
        return
    mirror = np.ascontiguousarray(ref.feed_image[..., ::-1])
    both = session.run(None, {"image": np.concatenate([ref.feed_image, mirror])})[0]
    alone = session.run(None, {"image": mirror})[0]
    diff = max(max_abs(both[:1], emb_1), max_abs(both[1:], alone))
    rel = max(float(np.linalg.norm(both[:1] - emb_1) / max(np.linalg.norm(emb_1), 1e-12)),
              float(np.linalg.norm(both[1:] - alone) / max(np.linalg.norm(alone), 1e-12)))
    quant = float(np.linalg.norm(emb_1 - ref.embedding) / max(np.linalg.norm(ref.embedding), 1e-12))
    fig["encoder_batch"] = {"checked": True, "batch": 2, "max_abs_diff": diff, "rel_error": rel,
                            "rel_error_vs_pytorch": quant}


def batch_checks(fig: dict, tol: Thresholds, precision: str) -> list[Check]:
    """Batch 2 vs batch 1 of the exported encoder: fp32 by max |diff| (the fp32 tolerance), fp16 / int8 by the
    relative error of the embedding (their kernels may round differently per batch size): at most
    ``BATCH_REL_ERROR``, or for int8 at most the encoder's own error against PyTorch (dynamic quantization
    scales activations over the whole batch, so batching may move results by a quantization step, no more)."""
    b = fig.get("encoder_batch") or {}
    if not b.get("checked"):
        return []
    if precision == "fp32":
        return [Check("encoder batch 2 vs batch 1 max |diff|", b["max_abs_diff"],
                      tol.atol + tol.rtol * fig["embedding_scale"], "max")]
    limit = max(BATCH_REL_ERROR, b.get("rel_error_vs_pytorch", 0.0)) if precision == "int8" else BATCH_REL_ERROR
    return [Check("encoder batch 2 vs batch 1 relative error", b["rel_error"], limit, "max",
                  f"max |diff| {b['max_abs_diff']:.3g}")]


BATCH_REL_ERROR = 1e-3


def _encoder_figures(folder: Path, ref: _Reference, fig: dict, source_encoder: Path | None) -> np.ndarray:
    """Embedding figures; returns the ONNX embedding the whole-chain figures use. ``source_encoder``: for int8,
    the fp32 graph that was quantized (compared with PyTorch like an fp32 export)."""
    session = _session(folder / "encoder.onnx")
    emb_o = session.run(None, {"image": ref.feed_image})[0]
    _batch_figures(session, ref, emb_o, fig)
    checked = emb_o if source_encoder is None else _session(source_encoder).run(None, {"image": ref.feed_image})[0]
    fig["embedding_max_abs_diff"] = max_abs(checked, ref.embedding)
    fig["embedding_scale"] = float(np.abs(ref.embedding).max())
    if source_encoder is not None:
        fig["int8_embedding_rel_error"] = float(np.linalg.norm(emb_o - ref.embedding)
                                                / max(np.linalg.norm(ref.embedding), 1e-12))
    return emb_o


def _lowres_figures(folder: Path, ref: _Reference, emb_o: np.ndarray, s: int, multimask: bool, fig: dict) -> None:
    """decoder_lowres.onnx fed the PyTorch embedding (the graph on its own) and the ONNX one (the whole chain)."""
    low = _session(folder / "decoder_lowres.onnx")
    lr_diff = iou_diff = mscale = 0.0
    ious_e2e: list[np.ndarray] = []
    for r in ref.rounds:
        feed = {"image_embeddings": ref.embedding, "point_coords": r.coords, "point_labels": r.labels,
                "mask_input": r.mask_in, "has_mask_input": r.has}
        lr_o, iou_o = low.run(None, feed)
        lr_diff = max(lr_diff, max_abs(lr_o, r.low_res))
        iou_diff = max(iou_diff, max_abs(iou_o, r.iou))
        mscale = max(mscale, float(np.abs(r.low_res).max()))
        lr_e, iou_e = low.run(None, {**feed, "image_embeddings": emb_o})
        pick_o = upscale_masks(_pick(lr_e, iou_e, multimask), s, ref.resized_hw, ref.original_hw)
        ious_e2e.append(mask_ious(pick_o > 0, r.picked > 0))
    e2e = np.concatenate(ious_e2e)
    fig.update({"low_res_masks_max_abs_diff": lr_diff, "iou_predictions_max_abs_diff": iou_diff,
                "masks_scale": mscale, "mask_iou_mean": float(e2e.mean()), "mask_iou_min": float(e2e.min())})


def _meta_figures(folder: Path, ref: _Reference, emb_o: np.ndarray, chain_ious: bool, fig: dict) -> list[float]:
    """Meta's decoder, one prompt at a time (its clients' batch size), at two aspect ratios."""
    meta = _session(folder / "decoder.onnx")
    fig["meta_sizes"] = [list(v) for v in ref.meta_sizes]
    meta_diff = meta_scale = 0.0
    meta_ious = []
    for r in ref.rounds:
        for p, hw, m_t, i_t, l_t in r.meta:
            feed = {"image_embeddings": ref.embedding, "point_coords": r.coords[p:p + 1],
                    "point_labels": r.labels[p:p + 1], "mask_input": r.mask_in[p:p + 1],
                    "has_mask_input": r.has[p:p + 1], "orig_im_size": np.array(hw, np.float32)}
            m_o, i_o, l_o = meta.run(None, feed)
            meta_diff = max(meta_diff, max_abs(m_o, m_t), max_abs(i_o, i_t), max_abs(l_o, l_t))
            meta_scale = max(meta_scale, float(np.abs(m_t).max()))
            if chain_ious:
                m_e = meta.run(None, {**feed, "image_embeddings": emb_o})[0]
                meta_ious.append(float(mask_ious(m_e[0] > 0, m_t[0] > 0).mean()))
    fig["meta_masks_max_abs_diff"] = meta_diff
    fig["meta_scale"] = meta_scale
    return meta_ious


def _max_checks(fig: dict, tol: Thresholds, *, encoder: str = "image embedding") -> list[Check]:
    return [
        Check(f"{encoder} max |diff|", fig["embedding_max_abs_diff"], tol.atol + tol.rtol * fig["embedding_scale"],
              "max"),
        Check("low-res mask logits max |diff|", fig["low_res_masks_max_abs_diff"],
              tol.atol + tol.rtol * fig["masks_scale"], "max"),
        Check("IoU predictions max |diff|", fig["iou_predictions_max_abs_diff"], tol.atol + tol.rtol, "max"),
        Check("Meta decoder outputs max |diff|", fig["meta_masks_max_abs_diff"],
              tol.atol + tol.rtol * max(fig["meta_scale"], fig["masks_scale"]), "max"),
    ]


def int8_gate_checks(gate: dict) -> list[Check]:
    """The int8 gate's figures (held-out images, one box and one point per object) as checks."""
    limit = gate["threshold"]
    note = f"{gate['images']} held-out image(s), {gate['objects']} objects"
    return [Check("int8 gate: box mean mask IoU vs fp32", gate["box_mean_iou"], limit, "min",
                  f"min {gate['box_min_iou']:.4f}; {note}"),
            Check("int8 gate: point mean mask IoU vs fp32", gate["point_mean_iou"], limit, "min",
                  f"min {gate['point_min_iou']:.4f}; {note}")]


def run_parity(sam, preprocess_spec: PreprocessSpec, folder: Path, *, precision: str, baked: bool,
               single_mask: bool, multimask: bool, thresholds: Thresholds, progress=None,
               int8: dict | None = None, source_encoder: Path | None = None) -> ParityReport:
    """Compare ``folder``'s encoder.onnx, decoder_lowres.onnx and decoder.onnx with ``sam`` (fp32 PyTorch).

    int8: the float decoders and the fp32 encoder that was quantized (``source_encoder``) are held to the fp32
    tolerances; the int8 encoder to the gate figures ``int8`` of :mod:`peft_export.export.quantize`."""
    step = progress or (lambda msg: None)
    step("parity: PyTorch reference")
    ref = torch_reference(sam.eval(), preprocess_spec, baked=baked, single_mask=single_mask, multimask=multimask)
    report = ParityReport(precision, ref.sample)
    fig = report.figures
    fig.update({"reference": "PyTorch fp32", "prompts": sum(len(r.coords) for r in ref.rounds),
                "meta_decoder_runs": sum(len(r.meta) for r in ref.rounds), "baked_preprocessing": baked})
    step("parity: encoder")
    emb_o = _encoder_figures(folder, ref, fig, source_encoder)
    step("parity: decoder_lowres")
    _lowres_figures(folder, ref, emb_o, int(preprocess_spec.img_size), multimask, fig)
    step("parity: decoder (Meta signature)")
    meta_ious = _meta_figures(folder, ref, emb_o, precision == "fp16", fig)
    tol = thresholds
    fig["tolerance"] = {"atol": tol.atol, "rtol": tol.rtol}
    if precision == "fp32":
        report.checks += _max_checks(fig, tol)
    elif precision == "int8":
        report.checks += _max_checks(fig, tol, encoder="fp32 encoder (before int8) embedding")
        report.checks += int8_gate_checks(int8)
        fig["iou_threshold"] = int8["threshold"]
    else:
        limit = tol.iou_for(precision)
        report.checks += [
            Check("mask IoU vs fp32 PyTorch (mean)", fig["mask_iou_mean"], limit, "min",
                  f"min {fig['mask_iou_min']:.4f}"),
            Check("Meta decoder mask IoU (mean)", float(np.mean(meta_ious)), limit, "min",
                  f"min {float(np.min(meta_ious)):.4f}"),
        ]
        fig["meta_mask_iou_mean"] = float(np.mean(meta_ious))
        fig["iou_threshold"] = limit
    report.checks += batch_checks(fig, tol, precision)
    return report
