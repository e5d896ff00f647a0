"""The package's README.md (its ``documentation``): what the graph computes, how to run it, the post-processing
(the watershed's parameters, or how to prompt the embedding), where the model came from, how it was validated."""

from __future__ import annotations

from pathlib import Path

from peft_export.package.docs import ReadmeFacts, peft_summary, pretty_model, training_record


def _what(f: ReadmeFacts) -> str:
    if f.kind == "instance":
        return "automatic instance segmentation (image encoder + instance decoder)"
    return "the image encoder (promptable segmentation with the attached decoder)"


def _numpy_preprocessing(f: ReadmeFacts) -> str:
    spec = f.manifest.preprocess_spec
    if f.manifest.baked_preprocessing:
        return "x = tile_uint8  # (S, S, 3) uint8 on a 0-255 scale: the graph normalises it"
    x01 = "t = tile.astype(np.float32); x = (t - t.min()) / (t.max() - t.min() + 1e-6)"
    if spec.mode == "minmax":
        return f"{x01}  # tile: (1, 3, S, S)"
    return (f"{x01}  # tile: (1, 3, S, S)\nmean = np.array({list(spec.pixel_mean)}, np.float32)[None, :, None, None]"
            f"\nstd = np.array({list(spec.pixel_std)}, np.float32)[None, :, None, None]\nx = (x * 255 - mean) / std")


def _io_section(f: ReadmeFacts) -> str:
    m = f.manifest
    s = m.preprocess_spec.img_size
    if f.kind == "instance":
        out = (f"`instance_maps` {f.output_shape} float32: three sigmoid maps at the model input size {s}x{s}: "
               "channel 0 foreground probability, 1 normalised distance to the object centre, 2 inverted "
               "normalised distance to the object boundary (micro-sam's automatic instance segmentation).")
    else:
        c, h, w = m.embedding
        out = (f"`image_embeddings` {f.output_shape} float32: SAM's image embedding ({c} channels on a {h}x{w} "
               f"grid, one cell per {s // h}x{s // h} input pixels).")
    steps = "\n".join(f"   {i + 1}. {p}" for i, p in enumerate(f.preprocessing))
    return f"""## What the graph computes

`{f.weights_file}` is one ONNX graph (opset {m.opset}, {m.precision}) that runs with ONNX Runtime alone.

- **Input** `image` {f.input_shape} ({f.input_axes}): a {s}x{s} tile at the resolution the model was trained on;
  grayscale images as three equal channels. Larger images: tile them into {s}x{s} blocks (bioimage.io tools do
  this for fixed-size inputs). Smaller or non-square images: resize the longest side to {s} and zero-pad
  bottom/right after the preprocessing (what the peft-export runtime does).
- **Preprocessing**, declared with the spec's own steps (bioimage.io tools apply them):
{steps}
- **Output** {out}
"""


def _post_section(f: ReadmeFacts) -> str:
    if f.kind == "instance":
        rows = "\n".join(f"| `{k}` | {v} |" for k, v in f.postprocessing.items())
        return f"""## Post-processing: from the maps to instances

A seeded watershed (micro-sam's `watershed_from_center_and_boundary_distances`; peft-export's torch-free
`peft_export.runtime.instances.maps_to_instances`): crop the maps to the image area of the input and resize them
to the image like masks; Gaussian smoothing; foreground = foreground map > threshold; seeds = connected
components of foreground pixels whose centre distance and boundary distance are below their thresholds; seeded
watershed on the boundary-distance map inside the foreground; objects smaller than the minimum size removed.
Parameters (those the export recorded, else the runtime's defaults, which are micro-sam's):

| parameter | value |
|---|---|
{rows}
"""
    c, h, w = f.manifest.embedding
    mh, mw = f.manifest.mask_input_size
    mask0 = "" if f.manifest.multimask else " Use mask 0: this model's three multimask outputs were never trained."
    return f"""## Post-processing: prompting the embedding

The embedding is SAM's: segment objects with point or box prompts through the attached `decoder.onnx`, which has
Meta's `SamOnnxModel` signature (SAM ONNX clients work unchanged). Inputs: `image_embeddings` (1, {c}, {h}, {w});
`point_coords` (1, N, 2) x/y in input-tile pixels; `point_labels` (1, N): 1 object, 0 background, 2 and 3 box
corners, -1 padding (append one (0, 0) point labelled -1 when there is no box); `mask_input` (1, 1, {mh}, {mw})
zeros; `has_mask_input` (1) zero; `orig_im_size` (2) = [H, W]. Outputs: `masks` (logits at [H, W]; > 0 is the
object), `iou_predictions`, `low_res_masks`. The attached `decoder_lowres.onnx` is the TensorRT-friendly variant
without `orig_im_size` (all four low-resolution masks).{mask0}
"""


def _run_section(f: ReadmeFacts) -> str:
    pre = _numpy_preprocessing(f)
    if f.kind == "instance":
        ours = "labels = seg.segment()                  # the maps + the watershed above"
        cli = "peft-export predict model.zip cells.tif --auto -o labels.tif"
    else:
        ours = "out = seg.predict(boxes=[[x0, y0, x1, y1]])   # prompts, as with an export folder"
        cli = "peft-export predict model.zip cells.tif --boxes boxes.json -o labels.tif"
    return f"""## How to run it

ONNX Runtime and numpy only (unzip the package first):

```python
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("{f.weights_file}")
{pre}
out = session.run(None, {{"image": x}})[0]
```

bioimage.io tools: `bioimageio test model.zip` reproduces the test output; in Python,
`bioimageio.core.predict(model="model.zip", inputs=tile)` applies the declared preprocessing.

peft-export (no PyTorch needed): `{cli}`, or

```python
from peft_export.runtime import Segmenter
seg = Segmenter("model.zip")                # large images are tiled, as with an export folder
seg.set_image(image)
{ours}
```
"""


def _model_section(f: ReadmeFacts) -> str:
    m = f.manifest
    src = m.source or {}
    check = src.get("merge_check") or {}
    merge = ""
    if check:
        merge = (f" The merge was checked against the unmerged model on `{check.get('sample')}`: embedding max "
                 f"\\|diff\\| {check.get('embedding_max_abs_diff', float('nan')):.2g}, masks "
                 f"{check.get('masks_max_abs_diff', float('nan')):.2g}.")
    tuned = (f"{peft_summary(m)} (peft-export, after Teuber, Archit & Pape, MIDL 2025).{merge}" if src.get("peft")
             else "none recorded: the base model's own weights.")
    versions = ", ".join(f"{k} {v}" for k, v in sorted((m.versions or {}).items()))
    return f"""## Model and training

- Base model: {pretty_model(m.model)} (`{m.model}`); weights licence {f.license}.
- Finetuning: {tuned}
- Checkpoint: `{Path(str(src.get("checkpoint") or "")).name or "none"}` ({src.get("kind")}); the attached
  `peft_export_manifest.json` is the export's full record (its path, sha256 of every file, parity figures).
- Training data: {training_record(m)}
- Exported {m.created} with {versions}.
"""


def _gate(f: ReadmeFacts) -> str:
    m = f.manifest
    checks = [c for c in (m.parity or {}).get("checks") or []
              if isinstance(c.get("value"), (int, float)) and isinstance(c.get("limit"), (int, float))]
    if not m.verified or not checks:
        return ("**The export skipped its parity check (`--no-verify`); it was packaged with `--allow-unverified`. "
                "Its graphs were never compared with the PyTorch model.**")
    rows = "\n".join(f"| {c['name'].replace('|', chr(92) + '|')} | {c['value']:.3g} | {c['limit']:.3g} | "
                     f"{'pass' if c.get('passed') else 'FAIL'} |" for c in checks)
    return (f"Export parity gate, ONNX Runtime vs PyTorch on `{m.parity.get('sample')}`:\n\n"
            f"| check | value | limit | result |\n|---|--:|--:|---|\n{rows}")


def _validation_section(f: ReadmeFacts) -> str:
    own = f.own_check or {}
    figures = (f"max \\|diff\\| {own['max_abs_diff']:.3g} (limit {own['limit']:.3g})" if own else "see rdf.yaml")
    how = ("`--auto`: mSA and F1 at IoU 0.5" if f.kind == "instance" else "box and point prompts: mean IoU and mSA")
    tested = ("bioimage.io's own test of the package (format, reproduction of the test output) passed before it was "
              "written." if f.validated else "bioimage.io's own test was not run at packaging (`--no-validate`): run "
              "`bioimageio test model.zip`.")
    return f"""## Validation

{_gate(f)}

At packaging, the package's graph with its declared preprocessing (read back from this package by peft-export's
torch-free runtime) reproduced the export folder's own runtime, which runs the separate graphs the export wrote, on
the test input: {figures}. The test input is {f.test_image}; `bioimageio test` reproduces the test output from it.
{tested}

To validate the model on your labelled images, run `peft-export evaluate EXPORT_DIR --data DIR` on the export
folder this package came from ({how}).
"""


def render_readme(f: ReadmeFacts) -> str:
    cites = "\n".join(f"- {text}. doi:{doi}" for text, doi in f.cites)
    limits = "- A fixed square input tile; the model only saw images of the modality and scale it was finetuned on."
    if f.manifest.baked_preprocessing:
        limits += "\n- The input is uint8 on a 0-255 scale: convert other images to it first (the graph normalises)."
    elif f.manifest.preprocess_spec.mode == "minmax":
        limits += ("\n- Each tile is min-max scaled by its own range, as in training: very dim or empty tiles are "
                   "stretched.")
    else:
        limits += ("\n- Each tile is min-max scaled to 0-255 before SAM's mean/std. peft-export's export runtime does "
                   "that for non-uint8 images but feeds uint8 images as they are, so on uint8 images whose range is "
                   "not 0-255 this package's output differs from the export folder's.")
    head = (f"# {f.name}\n\n{pretty_model(f.manifest.model)}, exported to ONNX by peft-export. This package holds "
            f"**{_what(f)}**.\n")
    return "\n".join([head, _io_section(f), _post_section(f), _run_section(f), _model_section(f),
                      _validation_section(f), f"## Limitations\n\n{limits}\n", f"## Citations\n\n{cites}\n"])
