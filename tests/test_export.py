"""`peft-export export` / `merge-and-export` (issue 5): every PEFT method through merge -> ONNX -> parity gate.

References are independent of the exporter's own gate wherever it matters:
- the exported encoder vs the *unmerged* PEFT model in PyTorch, on an input the gate never sees;
- Meta's decoder signature vs segment_anything's own ``SamOnnxModel`` run eagerly in PyTorch (its ONNX export
  is what freezes sizes; its eager forward is Meta's definition of the outputs), at three aspect ratios;
- fp16/int8 mask IoU vs PyTorch fp32 on real LiteMedSAM weights, prompts from the tile's ground truth.
Structures are traced once per session (the exporter's template cache): later exports of the same structure
substitute weights, then optimise, save and verify like any export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_peft_checkpoint, tiny_base_model

from peft_export.errors import VerificationError
from peft_export.export import (
    ExportOptions,
    Thresholds,
    export_model,
    graphs,
    onnx_export,
    precision,
    prepare_for_export,
)
from peft_export.export.exporter import ExportParityError, PreparedModel
from peft_export.imaging import SAM_PIXEL_MEAN, SAM_PIXEL_STD, normalize_and_pad, preprocess, resized_shape
from peft_export.loading import load_model
from peft_export.manifest import read_manifest
from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.models.registry import get_spec
from peft_export.peft import METHODS, PeftConfig, apply_peft, merge_peft
from peft_export.peft.selective import _Selective

META_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
META_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]
LOWRES_INPUTS = META_INPUTS[:-1]
ATOL = RTOL = 1e-4  # fp32 ONNX vs PyTorch, as the gate's defaults


def session(path_or_model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def assert_close(actual, expected, what: str, atol: float = ATOL, rtol: float = RTOL) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.abs(actual - expected).max())
    limit = atol + rtol * float(np.abs(expected).max())
    assert diff <= limit, f"{what}: max |diff| {diff:.3g} > {limit:.3g}"
    return diff


def mask_iou(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line_error(err: str) -> str:
    """The error itself is one line (progress lines such as "loading X" may precede it), no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, last, got:\n{err}"
    assert errors[0].startswith("error:") and "Traceback" not in err, err
    return errors[0]


# ---- shared inputs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_image():
    """A resized (max side 256) uint8 RGB image, not the gate's sample: (u8 HWC, preprocessed (1,3,256,256))."""
    rng = np.random.default_rng(7)
    u8 = rng.integers(0, 256, (256, 200, 3), dtype=np.uint8)
    return u8, normalize_and_pad(u8.astype(np.float32), get_spec("vit_tiny").preprocess)


@pytest.fixture(scope="module")
def tiny_base_embedding(tiny_image):
    with torch.no_grad():
        return tiny_base_model().image_encoder(torch.from_numpy(tiny_image[1])).numpy()


# ---- every PEFT method on vit_tiny -------------------------------------------------------------------

# (method options, export options): the export options vary so that each is verified once without extra exports
CASES = {
    "lora": None,  # the session fixture `tiny_export` (merge-and-export through the CLI)
    "fact": ({"rank": 4}, {"single_mask": True}),
    "ssf": ({}, {"bake_preprocessing": True}),
    "adaptformer": ({"bottleneck": 8}, {}),
    "attention": ({}, {}),
    "bias": ({}, {"simplify": True}),
    "layernorm": ({}, {}),
    "late_ft": ({}, {}),
    "frozen": ({}, {}),
    "full": ({}, {}),
}


def test_cases_cover_every_method():
    assert set(CASES) == set(METHODS)


@pytest.mark.parametrize("method", list(CASES))
def test_every_peft_method_merges_exports_and_matches_the_unmerged_model(method, tiny_export, tiny_image,
                                                                        tiny_base_embedding, tmp_path):
    spec_u8, x = tiny_image
    if CASES[method] is None:
        out, ckpt = tiny_export.out_dir, tiny_export.checkpoint
        peft_model = load_model(str(ckpt)).model
        export_opts = {}
    else:
        method_opts, export_opts = CASES[method]
        # frozen: only the decoder trains, so that is what gets random values
        parts = ("mask_decoder",) if method == "frozen" else ("image_encoder",)
        ckpt, peft_model = make_peft_checkpoint(tmp_path / "best.pt", "vit_tiny", method, "late:2", method_opts,
                                                parts=parts)
        prepared = prepare_for_export(load_model(str(ckpt)))
        out = tmp_path / "onnx"
        result = export_model(prepared, out, ExportOptions(**export_opts))
        assert result.report is not None and result.report.passed
    manifest = read_manifest(out)  # sha256 of every file checked
    mergeable = METHODS[method].mergeable
    assert manifest.verified and manifest.parity["passed"]
    assert manifest.source["peft"]["method"] == method and manifest.source["merged"] == mergeable
    assert ("merge_check" in manifest.source) == mergeable
    for key, value in export_opts.items():
        got = {"single_mask": manifest.extra["decoder"]["single_mask"], "simplify": manifest.extra["simplified"],
               "bake_preprocessing": manifest.baked_preprocessing}[key]
        assert got == value, key

    # independent reference: the UNMERGED PEFT model in PyTorch, on an input the gate never sees
    with torch.no_grad():
        expected = peft_model.eval().image_encoder(torch.from_numpy(x)).numpy()
    feed = spec_u8 if manifest.baked_preprocessing else x
    got = session(out / "encoder.onnx").run(None, {"image": feed})[0]
    assert_close(got, expected, f"{method}: encoder.onnx vs unmerged PEFT model")
    if method == "frozen":  # nothing in the encoder trains: it must equal the base model; the decoder differs
        assert_close(got, tiny_base_embedding, "frozen: encoder vs base")
        coords = np.array([[[40.0, 50.0], [180.0, 200.0]]], np.float32)
        labels = np.array([[2.0, 3.0]], np.float32)
        mask_in, has = np.zeros((1, 1, 64, 64), np.float32), np.zeros(1, np.float32)
        lr = session(out / "decoder_lowres.onnx").run(None, dict(zip(LOWRES_INPUTS, (got, coords, labels, mask_in,
                                                                                  has))))[0]
        with torch.no_grad():
            t = [torch.from_numpy(a) for a in (got, coords, labels, mask_in, has)]
            lr_t = PromptDecoder(peft_model)(*t)[0].numpy()
            lr_base = PromptDecoder(tiny_base_model())(*t)[0].numpy()
        assert_close(lr, lr_t, "frozen: decoder_lowres vs PEFT decoder")
        assert np.abs(lr - lr_base).max() > 1e-2, "the trained decoder weights did not reach the export"
    else:  # the adapters matter: the export is not the base model
        assert np.abs(got - tiny_base_embedding).max() > 1e-2 * np.abs(tiny_base_embedding).max(), \
            f"{method}: export equals the base model (adapters dropped?)"
    if method == "adaptformer":  # exported with its adapter modules: 2 extra linear layers per chosen block
        base_ops = precision.count_ops(onnx.load(tiny_export / "encoder.onnx"))
        ops = precision.count_ops(onnx.load(out / "encoder.onnx"))
        assert ops.get("MatMul", 0) + ops.get("Gemm", 0) >= base_ops.get("MatMul", 0) + base_ops.get("Gemm", 0) + 4
        assert "not mergeable" in manifest.source["note"]


def test_structures_are_traced_once(tiny_export, tmp_path, monkeypatch):
    """A second export of the same structure re-uses the traced template (and is still verified); forgetting the
    memos makes the next export call the tracer again (the tracer is stubbed to fail there: tracing for real would
    only repeat what the session's first export of this model did, ~20 s)."""
    import peft_export.export.onnx_export as onnx_export
    from peft_export.export.onnx_export import ExportFailedError

    calls = []

    def no_tracing(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        raise RuntimeError("the tracer ran")

    monkeypatch.setattr(onnx_export.torch.onnx, "export", no_tracing)
    prepared = prepare_for_export(load_model(str(tiny_export.checkpoint)))
    result = export_model(prepared, tmp_path / "again", ExportOptions(verify=False))
    assert result.manifest.extra["reused_trace"] == {"encoder": True, "decoder": True} and not calls
    assert result.seconds["trace_encoder"] < 5
    # same weights, same graphs: byte-identical files
    for role in ("encoder", "decoder", "decoder_lowres"):
        assert result.manifest.files[role]["sha256"] == sha256(tiny_export / f"{role}.onnx"), role
    # the memos are explicit and listed: forgetting them all makes the next export trace from scratch
    from peft_export import memo

    assert {"onnx_export.templates", "onnx_export.optimized", "parity.references"} <= set(memo.MEMOS)
    before = {name: len(m) for name, m in memo.MEMOS.items()}
    with memo.forgotten():  # the other tests keep the session's traces (a LiteMedSAM trace is ~25 s)
        assert all(len(m) == 0 for m in memo.MEMOS.values())
        with pytest.raises(ExportFailedError, match="the tracer ran"):
            export_model(prepared, tmp_path / "fresh", ExportOptions(verify=False))
        assert len(calls) == 1 and not (tmp_path / "fresh").exists()
    assert {name: len(m) for name, m in memo.MEMOS.items() if name in before} == before


def test_memo_keeps_the_most_recently_used_entries_within_its_limit():
    from peft_export.memo import MEMOS, Memo

    m = Memo("test.memo", limit=2)
    try:
        m.put("a", 1)
        m.put("b", 2)
        assert m.get("a") == 1  # a is now the most recent
        m.put("c", 3)
        assert (m.get("b"), m.get("a"), m.get("c"), len(m)) == (None, 1, 3, 2)
        with pytest.raises(ValueError):
            Memo("test.none", limit=0)
    finally:
        MEMOS.pop("test.memo", None)


# ---- Meta's decoder signature vs segment_anything at three aspect ratios ----------------------------

SIZES = {"wide": (180, 500), "tall": (640, 230), "square": (333, 333)}


def _meta_prompts(rng):
    """(coords, labels) in model pixels: a click (+ padding point, N=2), a box (N=2), a box + click (N=3)."""
    return [(np.array([[[120.0, 80.0], [0.0, 0.0]]], np.float32), np.array([[1.0, -1.0]], np.float32)),
            (np.array([[[30.0, 40.0], [150.0, 170.0]]], np.float32), np.array([[2.0, 3.0]], np.float32)),
            (np.array([[[60.0, 20.0], [240.0, 90.0], [100.0, 50.0]]], np.float32),
             np.array([[2.0, 3.0, 1.0]], np.float32))]


@pytest.mark.parametrize("single_mask", [False, True])
def test_meta_decoder_matches_segment_anything_at_three_aspect_ratios(tiny_export, single_mask):
    from segment_anything.utils.onnx import SamOnnxModel

    sam = load_model(str(tiny_export.checkpoint)).model.eval()
    reference = SamOnnxModel(sam, return_single_mask=single_mask)
    if single_mask:  # Meta's return_single_mask selection, built onto the exported low-res decoder
        lowres = onnx.load(tiny_export / "decoder_lowres.onnx")
        meta = session(graphs.attach_meta_postprocessing(lowres, 256, single_mask=True, multimask=True))
    else:
        meta = session(tiny_export / "decoder.onnx")
        assert [i.name for i in meta.get_inputs()] == META_INPUTS
        assert [o.name for o in meta.get_outputs()] == META_OUTPUTS
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((1, 64, 16, 16)).astype(np.float32)
    chosen = set()
    for name, hw in SIZES.items():
        for k, (coords, labels) in enumerate(_meta_prompts(rng)):
            has = np.array([float(k == 2)], np.float32)  # the last prompt also refines a previous mask
            mask_in = (rng.standard_normal((1, 1, 64, 64)) * has[0]).astype(np.float32)
            orig = np.array(hw, np.float32)
            got = meta.run(None, dict(zip(META_INPUTS, (emb, coords, labels, mask_in, has, orig))))
            with torch.no_grad():
                exp = [t.numpy() for t in reference(*(torch.from_numpy(a) for a in
                                                      (emb, coords, labels, mask_in, has, orig)))]
            assert got[0].shape == (1, 1 if single_mask else 4, *hw), name
            for g, e, what in zip(got, exp, META_OUTPUTS):
                assert_close(g, e, f"{name} {hw} prompt {k}: {what}")
            if single_mask:
                full = [torch.from_numpy(a) for a in (emb, coords, labels, mask_in, has)]
                with torch.no_grad():
                    all4 = PromptDecoder(sam)(*full)[0].numpy()
                chosen.add(int(np.argmin(np.abs(all4[0] - got[2][0]).reshape(4, -1).max(1))))
    if single_mask:  # N=2 prompts took a multimask output (1..3), the N=3 prompt mask 0
        assert 0 in chosen and chosen & {1, 2, 3}, chosen


def test_lowres_decoder_has_no_orig_size_and_matches_pytorch(tiny_export):
    """The TensorRT-friendly signature: all four low-res masks and IoUs, dynamic prompts and points."""
    low = session(tiny_export / "decoder_lowres.onnx")
    assert [i.name for i in low.get_inputs()] == LOWRES_INPUTS
    sam = load_model(str(tiny_export.checkpoint)).model.eval()
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((1, 64, 16, 16)).astype(np.float32)
    for b, n in ((1, 1), (3, 4)):
        coords = rng.uniform(0, 256, (b, n, 2)).astype(np.float32)
        labels = rng.choice([0.0, 1.0], (b, n)).astype(np.float32)
        args = (emb, coords, labels, np.zeros((b, 1, 64, 64), np.float32), np.zeros(b, np.float32))
        got = low.run(None, dict(zip(LOWRES_INPUTS, args)))
        with torch.no_grad():
            exp = [t.numpy() for t in PromptDecoder(sam)(*(torch.from_numpy(a) for a in args))]
        assert got[0].shape == (b, 4, 64, 64)
        for g, e, what in zip(got, exp, ("low_res_masks", "iou_predictions")):
            assert_close(g, e, f"B={b} N={n}: {what}")


# ---- manifest ------------------------------------------------------------------------------------------

def test_manifest_lists_every_file_with_its_sha256_and_the_preprocessing(tiny_export):
    out = tiny_export.out_dir
    data = json.loads((out / "manifest.json").read_text())
    listed = {e["path"] for e in data["files"].values()}
    assert listed == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert {"encoder", "decoder", "decoder_lowres"} <= set(data["files"])
    for role, entry in data["files"].items():
        assert entry["sha256"] == sha256(out / entry["path"]), role
        assert entry["bytes"] == (out / entry["path"]).stat().st_size
    assert data["opset"] >= 18
    for role in ("encoder", "decoder", "decoder_lowres"):
        model = onnx.load(out / f"{role}.onnx")
        onnx.checker.check_model(model)
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset >= 18 and (role != "encoder" or opset == data["opset"])
    pre = data["preprocess"]
    assert pre["img_size"] == 256 and pre["mode"] == "sam"
    np.testing.assert_allclose(pre["pixel_mean"], [123.675, 116.28, 103.53])
    np.testing.assert_allclose(pre["pixel_std"], [58.395, 57.12, 57.375])
    assert tuple(pre["pixel_mean"]) == SAM_PIXEL_MEAN and tuple(pre["pixel_std"]) == SAM_PIXEL_STD
    assert data["model"] == "vit_tiny" and data["precision"] == "fp32" and data["verified"] is True
    assert data["embedding"] == [64, 16, 16] and data["mask_input_size"] == [64, 64]
    assert data["files"]["encoder"]["inputs"] == [{"name": "image", "shape": ["B", 3, 256, 256], "dtype": "float32"}]
    assert [i["name"] for i in data["files"]["decoder"]["inputs"]] == META_INPUTS
    assert [o["name"] for o in data["files"]["decoder"]["outputs"]] == META_OUTPUTS
    src = data["source"]
    assert src["checkpoint"] == str(tiny_export.checkpoint.resolve()) and src["kind"] == "peft-export"
    assert src["peft"]["method"] == "lora" and src["peft"]["blocks"] == [2, 3] and src["merged"] is True
    assert src["merge_check"]["passed"] is True
    for tool in ("torch", "onnx", "onnxscript", "peft_export"):
        assert tool in data["versions"], tool
    assert "onnxruntime" in data["versions"] or "onnxruntime-gpu" in data["versions"]
    checks = {c["name"]: c for c in data["parity"]["checks"]}
    assert checks["image embedding max |diff|"]["value"] <= checks["image embedding max |diff|"]["limit"]
    assert all(c["passed"] for c in checks.values()) and len(checks) == 5
    batch = checks["encoder batch 2 vs batch 1 max |diff|"]  # the dynamic batch axis is checked, not assumed
    assert batch["value"] <= batch["limit"]
    assert data["parity"]["sample"].startswith("dsb2018")


def test_a_modified_export_file_is_detected(tiny_export, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_export.out_dir, copy_dir)
    read_manifest(copy_dir)
    with open(copy_dir / "decoder.onnx", "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\0" * 8)
    with pytest.raises(VerificationError, match="sha256"):
        read_manifest(copy_dir)


# ---- the parity gate catches broken exports; failures leave nothing behind ---------------------------

@pytest.fixture(scope="module")
def tiny_prepared(tiny_export) -> PreparedModel:
    return prepare_for_export(load_model(str(tiny_export.checkpoint)))


def test_corrupted_weight_fails_the_gate_and_writes_nothing(tiny_export, tmp_path, monkeypatch, run_cli):
    real = onnx_export.optimize

    def corrupt(model):
        out = real(model)
        if out.graph.input[0].name == "image":  # the encoder: perturb its largest weight a little
            big = max(out.graph.initializer, key=lambda t: int(np.prod(t.dims)))
            arr = onnx.numpy_helper.to_array(big).copy()
            arr.flat[::5] += 0.02
            big.CopyFrom(onnx.numpy_helper.from_array(arr, big.name))
        return out

    monkeypatch.setattr(onnx_export, "optimize", corrupt)
    out = tmp_path / "exports" / "bad"
    code, _, err = run_cli("export", str(tiny_export.checkpoint), "-o", str(out))
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: export parity check failed: image embedding max |diff|"), err
    assert "FAIL" in err  # the parity table
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []  # no partial folder either


def _frozen_crop_postprocessing(real):
    """segment_anything's legacy-exported SamOnnxModel bug: the crop size frozen from a 256x256 dummy image."""
    def nodes(*args, **kwargs):
        ns, inits = real(*args, **kwargs)
        prefix = kwargs.get("prefix", "post/")
        out = []
        for n in ns:
            if list(n.output) == [prefix + "resized"]:
                n = onnx.helper.make_node("Constant", [], [prefix + "resized"],
                                          value=onnx.numpy_helper.from_array(np.array([256, 256], np.int64)))
            out.append(n)
        return out, inits
    return nodes


def test_corrupted_graph_fails_the_gate_and_keeps_the_old_folder(tiny_prepared, tmp_path, monkeypatch):
    """A Meta decoder that is right for square images only: caught by the gate's second aspect ratio; with
    --force the existing OUT_DIR stays as it was."""
    monkeypatch.setattr(graphs, "postprocessing_nodes", _frozen_crop_postprocessing(graphs.postprocessing_nodes))
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(ExportParityError, match="Meta decoder outputs") as info:
        export_model(tiny_prepared, out, ExportOptions(force=True))
    failed = [c.name for c in info.value.report.failures()]
    assert failed == ["Meta decoder outputs max |diff|"], failed
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"] and os.listdir(out) == ["old.txt"]
    assert (out / "old.txt").read_text() == "previous export"


def test_mask_iou_gate_fails_a_broken_fp16_decoder(tiny_prepared, tmp_path, monkeypatch):
    """fp16/int8 are gated on mask IoU: a decoder whose logits flip sign (IoU ~ 0) must fail it."""
    real = precision.to_fp16

    def flip(model):
        out = real(model)
        if out.graph.output[0].name == "low_res_masks":
            for n in out.graph.node:
                for i, name in enumerate(n.output):
                    if name == "low_res_masks":
                        n.output[i] = "low_res_masks_raw"
            out.graph.node.append(onnx.helper.make_node("Neg", ["low_res_masks_raw"], ["low_res_masks"]))
        return out

    monkeypatch.setattr(precision, "to_fp16", flip)
    with pytest.raises(ExportParityError, match="mask IoU") as info:
        export_model(tiny_prepared, tmp_path / "fp16", ExportOptions(precision="fp16"))
    report = info.value.report
    assert report.figures["mask_iou_mean"] < 0.5 and report.figures["iou_threshold"] == 0.99
    assert not (tmp_path / "fp16").exists()


# ---- CLI: --force, --no-verify, --json, bad input ------------------------------------------------------

def test_force_and_no_verify(tiny_export, tmp_path, run_cli):
    ckpt = str(tiny_export.checkpoint)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = run_cli("merge-and-export", ckpt, "-o", str(out), "--no-verify")
    assert code == 2 and "--force" in one_line_error(err)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    a_file = tmp_path / "file.onnx"
    a_file.write_text("x")
    code, _, err = run_cli("export", ckpt, "-o", str(a_file))
    assert code == 2 and "--force" in one_line_error(err) and a_file.read_text() == "x"

    code, stdout, err = run_cli("merge-and-export", ckpt, "-o", str(out), "--no-verify", "--force", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["verified"] is False and result["passed"] is None and Path(result["out_dir"]) == out
    assert "--no-verify" in err  # the warning goes to stderr even with --json
    manifest = read_manifest(out)
    assert manifest.verified is False and manifest.parity == {"verified": False, "reason": "exported with --no-verify"}
    assert sorted(os.listdir(out)) == ["decoder.onnx", "decoder_lowres.onnx", "encoder.onnx", "manifest.json"]
    # unverified, but the same graphs as the verified export of the same checkpoint
    for role in ("encoder", "decoder", "decoder_lowres"):
        assert sha256(out / f"{role}.onnx") == sha256(tiny_export / f"{role}.onnx"), role


def test_bad_input_gives_one_line_and_writes_nothing(tiny_export, tmp_path, run_cli):
    out = tmp_path / "out"
    ckpt = str(tiny_export.checkpoint)
    plain = tmp_path / "plain.pt"
    torch.save(tiny_base_model().state_dict(), plain)
    cases = [
        (("export", "no_such_model", "-o", str(out)), "neither a model name"),
        (("export", "vit_tiny", "-o", str(out)), "no weights for vit_tiny"),
        (("export", "vit_tiny", "--checkpoint", str(tmp_path / "missing.pt"), "-o", str(out)), "not found"),
        (("merge-and-export", str(tmp_path / "missing.pt"), "-o", str(out)), "not found"),
        (("merge-and-export", str(plain), "-o", str(out)), "--model is required"),
        (("merge-and-export", ckpt, "-o", str(out), "--from", "keras"),
         "--from: unknown value 'keras'; choose from auto, peft-export, micro-sam"),
        (("export", ckpt, "-o", str(out), "--precision", "int4"), "--precision: unknown value 'int4'"),
        (("merge-and-export", ckpt, "-o", str(out), "-p", "bf16"), "--precision: unknown value 'bf16'"),
        (("export", ckpt, "-o", str(out), "--opset", "17"), "--opset: Input should be greater than or equal to 18"),
        (("export", ckpt, "-o", str(out), "--int8-iou", "1.5"), "--int8-iou: Input should be less than or equal to 1"),
        (("export", ckpt, "-o", str(out), "--atol", "-1"), "--atol: Input should be greater than or equal to 0"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(*args)
        assert code == 2, (args, err)
        assert expected in one_line_error(err), (args, err)
        assert not out.exists(), args


def test_help_lists_the_options(run_cli):
    code, stdout, _ = run_cli("merge-and-export", "--help")
    assert code == 0
    for opt in ("--precision", "--force", "--no-verify", "--bake-preprocessing", "--single-mask", "--simplify"):
        assert opt in stdout, opt


@pytest.mark.parametrize("mode", ["sam", "minmax"])
def test_baked_preprocessing_graph_matches_numpy(mode):
    """The piece `--bake-preprocessing` puts in front of the encoder (ssf's export above runs it end to end for
    SAM's normalisation): uint8 (H', W', 3) -> normalised, zero-padded (1, 3, S, S), for both modes."""
    from peft_export.imaging import PreprocessSpec

    spec = PreprocessSpec(img_size=64, mode=mode)
    sess = session(graphs.preprocessing_model(spec))
    rng = np.random.default_rng(1)
    for hw in ((64, 40), (23, 64), (64, 64)):
        u8 = rng.integers(10, 200, (*hw, 3), dtype=np.uint8)
        got = sess.run(None, {"image": u8})[0]
        assert_close(got, normalize_and_pad(u8.astype(np.float32), spec), f"{mode} {hw}", atol=1e-5, rtol=1e-6)


# ---- LiteMedSAM with its real weights ----------------------------------------------------------------

@pytest.fixture(scope="module")
def lite_case(dsb_val):
    """An input the gate never sees (the val tile flipped and cropped to 200x256), and prompts from its ground
    truth: boxes of the five largest nuclei (model pixels)."""
    sample = dsb_val[0]
    image = np.ascontiguousarray(sample.image[::-1, :][:200])
    labels = np.ascontiguousarray(sample.labels[::-1, :][:200])
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    boxes = []
    for i in ids[np.argsort(counts)[::-1][:5]]:
        ys, xs = np.nonzero(labels == i)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    rh, rw = resized_shape(*image.shape[:2], 256)
    scale = np.array([rw / image.shape[1], rh / image.shape[0]] * 2, np.float32)
    coords = (np.array(boxes, np.float32) * scale).reshape(-1, 2, 2)
    return image, coords, np.tile(np.array([[2.0, 3.0]], np.float32), (len(coords), 1))


@pytest.fixture(scope="module")
def lite_reference(lite_export_fp32, lite_case, lite_medsam):
    """PyTorch fp32: the unmerged PEFT model's embedding and box masks, and the base model's embedding."""
    image, coords, labels = lite_case
    prep = preprocess(image, get_spec("lite_medsam").preprocess)
    peft_model = load_model(str(lite_export_fp32.checkpoint)).model.eval()
    x = torch.from_numpy(prep.tensor)
    with torch.no_grad():
        emb = peft_model.image_encoder(x)
        n = len(coords)
        masks = PromptDecoder(peft_model)(emb, torch.from_numpy(coords), torch.from_numpy(labels),
                                          torch.zeros(n, 1, 256, 256), torch.zeros(n))[0].numpy()
        base_emb = lite_medsam.image_encoder(x).numpy()
    return {"x": prep.tensor, "prep": prep, "embedding": emb.numpy(), "masks": masks, "base_embedding": base_emb}


def _chain(folder: Path, image: np.ndarray, coords, labels, baked: bool, prep) -> tuple[np.ndarray, np.ndarray]:
    """ONNX encoder -> decoder_lowres, all prompts: (embedding, single-mask low-res logits)."""
    from peft_export.export.parity import baked_input

    feed = baked_input(image, get_spec("lite_medsam").preprocess) if baked else prep.tensor
    emb = session(folder / "encoder.onnx").run(None, {"image": feed})[0]
    n = len(coords)
    lr = session(folder / "decoder_lowres.onnx").run(None, dict(zip(LOWRES_INPUTS, (
        emb, coords, labels, np.zeros((n, 1, 256, 256), np.float32), np.zeros(n, np.float32)))))[0]
    return emb, lr[:, 0]


def test_lite_medsam_lora_merge_and_export_matches_the_unmerged_model(lite_export_fp32, lite_case, lite_reference):
    out = lite_export_fp32.out_dir
    manifest = read_manifest(out)
    assert manifest.model == "lite_medsam" and manifest.verified and manifest.parity["passed"]
    assert manifest.source["peft"]["method"] == "lora" and manifest.source["peft"]["blocks"] == [8, 9]  # of 10
    assert manifest.preprocess["mode"] == "minmax" and manifest.preprocess["img_size"] == 256
    assert manifest.multimask is False and manifest.embedding == [256, 64, 64]
    assert manifest.parity["sample"].startswith("dsb2018")  # the real tile
    image, coords, labels = lite_case
    emb, lr = _chain(out, image, coords, labels, False, lite_reference["prep"])
    assert_close(emb, lite_reference["embedding"], "lite encoder.onnx vs unmerged PEFT model")
    assert_close(lr, lite_reference["masks"][:, 0], "lite chain masks vs unmerged PEFT model", atol=1e-3)
    # the merged adapters matter: the export is measurably not the base LiteMedSAM
    base = lite_reference["base_embedding"]
    assert np.abs(emb - base).max() > 100 * (ATOL + RTOL * np.abs(base).max())


@pytest.fixture(scope="module")
def lite_prepared(lite_export_fp32) -> PreparedModel:
    """The merged LiteMedSAM (its merge was verified by the fixture's merge-and-export)."""
    loaded = load_model(str(lite_export_fp32.checkpoint))
    source = {"checkpoint": str(lite_export_fp32.checkpoint), "kind": "peft-export",
              "peft": lite_export_fp32.peft, "merged": True}
    return PreparedModel(merge_peft(copy.deepcopy(loaded.model)).eval(), loaded.spec, source)


# The fp16 gate for this test model: its adapters are random noise on zero-shot LiteMedSAM, whose point-prompt
# masks (IoU 0.015 vs the truth) flip with the smallest change: measured 0.973-0.992 over adapter initialisations
# against the default 0.99, while the README's finetuned model passes 0.99 with 0.996 (min 0.990). As INT8_TEST_IOU.
FP16_TEST_IOU = 0.97


def test_lite_medsam_fp16_is_gated_on_mask_iou(lite_prepared, lite_export_fp32, lite_case, lite_reference, tmp_path):
    """fp16: float16 weights, float32 islands, gated on mask IoU vs fp32 PyTorch; int8 is tested in test_int8.py."""
    out = tmp_path / "fp16"
    result = export_model(lite_prepared, out, ExportOptions(precision="fp16", thresholds=Thresholds(
        fp16_iou=FP16_TEST_IOU)))
    manifest = read_manifest(out)
    assert manifest.precision == "fp16" and manifest.verified
    checks = {c["name"]: c for c in manifest.parity["checks"]}
    gate = checks["mask IoU vs fp32 PyTorch (mean)"]
    assert gate["limit"] == FP16_TEST_IOU and Thresholds().fp16_iou == 0.99  # the given limit applies; default 0.99
    assert gate["value"] >= gate["limit"] and gate["passed"]
    assert checks["Meta decoder mask IoU (mean)"]["passed"] and result.report.passed
    print(f"\nfp16: gate mask IoU {gate['value']:.4f} ({gate['note']})")

    enc = onnx.load(out / "encoder.onnx")
    fp32_bytes = (lite_export_fp32 / "encoder.onnx").stat().st_size
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    kinds = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in enc.graph.initializer
             if len(i.dims) >= 2 and i.data_type in floats}
    assert kinds == {"float16"}, kinds
    assert manifest.files["decoder"]["inputs"][0]["dtype"] == "float32"  # the runtime contract stays fp32
    # normalisations and softmax run in float32 inside the fp16 graph
    inferred = onnx.shape_inference.infer_shapes(enc)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    softmax_in = [types.get(n.input[0]) for n in enc.graph.node if n.op_type == "Softmax"]
    assert softmax_in and set(softmax_in) == {onnx.TensorProto.FLOAT}
    assert (out / "encoder.onnx").stat().st_size < 0.6 * fp32_bytes
    # independent: the whole ONNX chain on an input the gate never saw vs PyTorch fp32 (unmerged PEFT model)
    image, coords, labels = lite_case
    _, lr = _chain(out, image, coords, labels, False, lite_reference["prep"])
    ious = [mask_iou(a, b) for a, b in zip(lr, lite_reference["masks"][:, 0])]
    print(f"fp16: mask IoU vs PyTorch fp32 on a new input: mean {np.mean(ious):.4f} min {np.min(ious):.4f}")
    assert np.mean(ious) >= 0.98, ious


def test_lite_medsam_adaptformer_is_exported_with_its_adapters(lite_medsam, lite_export_fp32,
                                                               lite_reference, tmp_path):
    ckpt, _ = make_peft_checkpoint(tmp_path / "af.pt", "lite_medsam", "adaptformer", "late:2",
                                            {"bottleneck": 16}, base=lite_medsam, scale=0.02)
    prepared = prepare_for_export(load_model(str(ckpt)))
    assert prepared.merge_report is None and prepared.source["merged"] is False
    out = tmp_path / "onnx"
    result = export_model(prepared, out, ExportOptions())
    assert result.report.passed and result.manifest.source["peft"]["method"] == "adaptformer"
    assert result.manifest.extra["reused_trace"]["decoder"] is True  # same decoder structure as the LoRA export
    ops = precision.count_ops(onnx.load(out / "encoder.onnx"))
    base_ops = precision.count_ops(onnx.load(lite_export_fp32 / "encoder.onnx"))
    linear = ops.get("MatMul", 0) + ops.get("Gemm", 0)
    assert linear >= base_ops.get("MatMul", 0) + base_ops.get("Gemm", 0) + 4, (ops, base_ops)
    # the gate compared with this very model; on a new input the adapters change the base model's output
    emb = session(out / "encoder.onnx").run(None, {"image": lite_reference["x"]})[0]
    base = lite_reference["base_embedding"]
    assert np.abs(emb - base).max() > 100 * (ATOL + RTOL * np.abs(base).max())


# the other methods on LiteMedSAM (LoRA: the session fixture; AdaptFormer: above). Those with merge arithmetic (FacT's
# factors, SSF's scale and shift folded into the linear layers) are merged and exported on the real weights here, each
# export reusing the traced structure and held to the unmerged model. The selective methods add no module: they train
# a subset of SAM's own weights (attention, biases, norms, late blocks, all of them, or none of the encoder), so their
# export is the base graph with other numbers, which the tiny model's matrix
# (test_every_peft_method_merges_exports_and_matches_the_unmerged_model) proves for each of them.
LITE_CASES = {"fact": {"rank": 8}, "ssf": {}}
SELECTIVE = {name for name, cls in METHODS.items() if issubclass(cls, _Selective)}


def test_lite_cases_complete_the_method_matrix():
    assert set(LITE_CASES) | {"lora", "adaptformer"} | SELECTIVE == set(METHODS)
    assert {"attention", "bias", "layernorm", "late_ft", "frozen", "full"} == SELECTIVE
    for name in SELECTIVE:  # no module of their own: the state dict keeps the base model's keys
        model = tiny_base_model()
        keys = set(model.state_dict())
        apply_peft(model, PeftConfig(name, "late:2", {}), "vit_tiny")
        assert set(model.state_dict()) == keys, name


@pytest.mark.parametrize("method", list(LITE_CASES))
def test_lite_medsam_methods_with_merge_arithmetic_export_and_match_the_unmerged_model(method, lite_medsam, lite_case,
                                                                                  lite_reference, tmp_path):
    ckpt, peft_model = make_peft_checkpoint(tmp_path / "best.pt", "lite_medsam", method, "late:2", LITE_CASES[method],
                                            base=lite_medsam, scale=0.02)
    prepared = prepare_for_export(load_model(str(ckpt)))
    out = tmp_path / "onnx"
    # the parity gate on real weights runs in the LoRA and AdaptFormer exports; here the graphs are held to the
    # unmerged PEFT model directly (below), which is the stronger check, and the gate's second pass would add 7 s each
    result = export_model(prepared, out, ExportOptions(verify=False))
    assert result.manifest.source["merged"] is True
    assert result.manifest.extra["reused_trace"] == {"encoder": True, "decoder": True}
    image, coords, labels = lite_case
    prep = lite_reference["prep"]
    emb, lr = _chain(out, image, coords, labels, False, prep)
    x = torch.from_numpy(prep.tensor)
    with torch.no_grad():
        expected = peft_model.eval().image_encoder(x)
        n = len(coords)
        masks = PromptDecoder(peft_model)(expected, torch.from_numpy(coords), torch.from_numpy(labels),
                                          torch.zeros(n, 1, 256, 256), torch.zeros(n))[0].numpy()
    assert_close(emb, expected.numpy(), f"lite {method}: encoder.onnx vs unmerged PEFT model")
    assert_close(lr, masks[:, 0], f"lite {method}: chain masks vs unmerged PEFT model", atol=1e-3)
    base = lite_reference["base_embedding"]
    assert np.abs(emb - base).max() > 10 * (ATOL + RTOL * np.abs(base).max()), f"{method}: adapters dropped?"
