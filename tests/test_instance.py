"""The instance decoder (micro-sam's AIS): model, targets, watershed, metrics, checkpoints, training.

Independent references: torch-em's own UNETR with the same weights (decoder), torch-em's
``PerObjectDistanceTransform`` (targets) and ``watershed_from_center_and_boundary_distances`` (post-processing) —
torch-em is installed with its dependencies as a test oracle (``pip install torch-em``); hand-counted label
images (metrics); an uninterrupted run (resume); the frozen base checkpoint (decoder-only training).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import disk_image, randomise_batchnorm

from peft_export.errors import CheckpointError

TORCH_EM = "torch-em is the oracle here: pip install torch-em (with its dependencies)"


def _torch_em(module: str):
    try:
        return pytest.importorskip(module, reason=TORCH_EM)
    except ImportError:  # importorskip raises Skipped; a broken install raises ImportError inside
        pytest.skip(TORCH_EM)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_sam():
    from peft_export.models.registry import get_spec

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_spec("vit_tiny").build().eval()


# ---------------------------------------------------------------------------------------------------------
# the decoder vs torch-em's UNETR, through a micro-sam-style checkpoint
@pytest.mark.parametrize("transpose", [False, True], ids=["interpolate", "transposed-conv"])
def test_micro_sam_checkpoint_decoder_matches_torch_em_unetr(tmp_path, transpose):
    """micro-sam builds its AIS decoder as torch-em's UNETR(backbone="sam", use_skip_connection=False,
    final_activation="Sigmoid", out_channels=3) and saves ``{"model_state": {"sam.*"}, "decoder_state": ...}``.
    Random weights (16 features to keep it quick; the key names and structure do not depend on it)."""
    unetr_mod = _torch_em("torch_em.model.unetr")
    from peft_export.loading import load_model

    sam = _tiny_sam()
    torch.manual_seed(1)
    unetr = unetr_mod.UNETR(backbone="sam", encoder=sam.image_encoder, out_channels=3, use_sam_stats=True,
                            final_activation="Sigmoid", use_skip_connection=False, resize_input=True,
                            use_conv_transpose=transpose, initial_features=16)
    randomise_batchnorm(unetr)
    unetr.eval()
    decoder_state = {k: v for k, v in unetr.state_dict().items() if not k.startswith("encoder")}
    ckpt = tmp_path / "micro_sam_best.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in sam.state_dict().items()}, "decoder_state": decoder_state,
                "iteration": 10}, ckpt)
    loaded = load_model("vit_tiny", ckpt)
    assert loaded.checkpoint.kind == "micro-sam" and loaded.instance_decoder is not None
    cfg = loaded.instance_decoder.config
    assert (cfg.levels, cfg.features, cfg.upsampler) == (4, 16, "transpose" if transpose else "interpolate")
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = unetr.decode((emb, None, None), (256, 256), (256, 256))  # torch-em's own path, incl. postprocessing
        ours = loaded.instance_decoder(emb)
    assert ours.shape == ref.shape == (1, 3, 256, 256)
    assert float((ours - ref).abs().max()) <= 1e-4
    assert float(ref.std()) > 1e-3  # the maps are not flat, so the comparison means something


def _state(**changes) -> dict[str, torch.Tensor]:
    from peft_export.models.instance_decoder import InstanceDecoder, InstanceDecoderConfig

    cfg = dict(in_channels=64, levels=4, features=8)
    cfg.update(changes)
    return InstanceDecoder(InstanceDecoderConfig(**cfg)).state_dict()


@pytest.mark.parametrize("state,match", [
    (lambda: _state(in_channels=256), "takes 256-channel embeddings; vit_tiny's have 64"),
    (lambda: _state(levels=2), "upsamples 4x; vit_tiny needs 16x"),
    (lambda: {k: v for k, v in _state().items() if not k.startswith("decoder_head.block.4")},
     "does not fit the instance decoder \\(missing decoder_head.block.4"),
    (lambda: {"unet.conv.weight": torch.zeros(1)}, "not an instance decoder"),
])
def test_decoder_state_that_does_not_fit_the_model_is_refused(tmp_path, state, match):
    from peft_export.loading import load_model

    sam = _tiny_sam()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in sam.state_dict().items()}, "decoder_state": state()}, ckpt)
    with pytest.raises(CheckpointError, match=match) as info:
        load_model("vit_tiny", ckpt)
    assert "\n" not in str(info.value)


def test_model_sizes_and_output_resolution():
    """Output at the model input size for SAM-style (16x) and LiteMedSAM-style (4x) embeddings; others refused."""
    from peft_export.models.instance_decoder import InstanceDecoder, InstanceDecoderConfig, levels_for

    assert levels_for(1024, 64) == 4 and levels_for(256, 64) == 2
    with pytest.raises(CheckpointError, match="4x, 8x, 16x"):
        levels_for(100, 64)
    dec = InstanceDecoder(InstanceDecoderConfig(32, 2, 8)).eval()
    with torch.no_grad():
        out = dec(torch.randn(2, 32, 16, 16))
    assert out.shape == (2, 3, 64, 64) and float(out.min()) >= 0 and float(out.max()) <= 1


# ---------------------------------------------------------------------------------------------------------
# targets and post-processing vs torch-em; metrics by hand
def test_targets_match_torch_em_per_object_distance_transform(dsb_val):
    label_mod = _torch_em("torch_em.transform.label")
    from peft_export.data.dataset import load_samples
    from peft_export.train.instance import instance_targets

    trafo = label_mod.PerObjectDistanceTransform(distances=True, boundary_distances=True, directed_distances=False,
                                                 foreground=True, instances=False, apply_label=False)
    for sample in [*dsb_val, load_samples("sample:dsb2018", "train")[0]]:
        ours = instance_targets(sample.labels)
        ref = trafo(sample.labels)
        assert ours.shape == ref.shape == (3, *sample.labels.shape)
        assert float(np.abs(ours - ref).max()) <= 1e-5, sample.name
    # objects not asked for are background
    ids = np.unique(dsb_val[0].labels)[1:4]
    part = instance_targets(dsb_val[0].labels, ids)
    assert set(np.unique(dsb_val[0].labels[part[0] > 0])) == set(ids.tolist())


def test_watershed_matches_torch_em_and_recovers_the_truth(dsb_val):
    """Perfect maps with noise: the watershed gives torch-em's instances, and those are the hand-drawn nuclei."""
    seg_mod = _torch_em("torch_em.util.segmentation")
    from peft_export.metrics import instance_scores, matched_iou
    from peft_export.runtime.instances import InstanceOptions, maps_to_instances
    from peft_export.train.instance import instance_targets

    labels = dsb_val[0].labels
    noisy = instance_targets(labels) + np.random.default_rng(0).normal(0, 0.1, (3, *labels.shape))
    maps = np.clip(noisy, 0, 1).astype(np.float32)
    ours = maps_to_instances(maps, InstanceOptions(foreground_smoothing=0))  # torch-em's function does not smooth fg
    ref = seg_mod.watershed_from_center_and_boundary_distances(maps[1], maps[2], maps[0])
    assert matched_iou(ours, ref.astype(np.int64)) >= 0.999
    truth = instance_scores(maps_to_instances(maps), labels)
    assert truth["f1"] >= 0.9 and truth["msa"] >= 0.8, truth


def test_instance_scores_count_matches_by_hand():
    from peft_export.metrics import instance_scores, merge_instance_scores

    gt = np.zeros((20, 20), np.int32)
    gt[1:5, 1:5], gt[10:14, 10:14], gt[15:19, 1:5] = 1, 2, 3
    pred = np.zeros_like(gt)
    pred[1:5, 1:5] = 7  # exact
    pred[10:14, 10:12] = 8  # half of object 2: IoU 0.5, not a match at > 0.5
    pred[6:8, 15:19] = 9  # a false positive
    s = instance_scores(pred, gt)
    assert (s["tp"], s["fp"], s["fn"], s["objects_pred"], s["objects_true"]) == (1, 2, 2, 3, 3)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(1 / 3) and s["mean_iou"] == pytest.approx(0.5)
    empty = instance_scores(np.zeros_like(gt), np.zeros_like(gt))
    assert empty["f1"] == empty["msa"] == 1.0
    both = merge_instance_scores([s, instance_scores(gt, gt)])
    assert (both["tp"], both["fp"], both["fn"]) == (4, 2, 2) and both["f1"] == pytest.approx(8 / 12)


# ---------------------------------------------------------------------------------------------------------
# training: joint and decoder-only, resume, the checkpoint layout
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    import tifffile

    root = tmp_path_factory.mktemp("synth_ais")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for i in range(n):
            image, labels = disk_image(rng)
            for kind, arr in (("images", image), ("labels", labels.astype(np.uint16))):
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(root / split / kind / f"{split}{i}.tif", arr)
    return root


TINY = ["--model", "tinyvit_tiny", "--peft", "lora", "--rank", "4", "--blocks", "late:2", "--objects-per-image", "3",
        "--sub-iterations", "1", "--val-prompts", "box", "--lr", "1e-3", "--no-val-before", "--quiet"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_joint_training_checkpoint_layout_and_exact_resume(run_cli, synth, tmp_path, monkeypatch):
    """--instance-decoder: its loss is one more term; the checkpoint holds micro-sam's ``decoder_state``; Ctrl-C
    (a KeyboardInterrupt inside step 3) and --resume give the uninterrupted run's decoder and losses."""
    import peft_export.train.step as step_mod
    from peft_export.loading import load_model
    from peft_export.models.checkpoint import read_checkpoint

    args = [*TINY, "--data", str(synth), "--iterations", "5", "--instance-decoder"]
    ref = tmp_path / "ref"
    code, _, err = run_cli("finetune", *args, "--out", str(ref))
    assert code == 0, err
    recs = _metrics(ref)
    assert all(np.isfinite(r["train_instance_loss"]) and r["train_instance_loss"] > 0 for r in recs)
    assert recs[-1]["train_loss"] > recs[-1]["train_instance_loss"]  # the prompt losses are still there
    inst = recs[-1]["val"]["instance"]
    assert {"msa", "f1", "precision", "recall", "objects_pred", "objects_true"} <= set(inst)
    assert inst["objects_true"] == 4
    ck = read_checkpoint(ref / "latest.pt")
    assert ck.decoder_state is not None and "out_conv.weight" in ck.decoder_state
    assert load_model(str(ref / "latest.pt")).instance_decoder.config.features == 8

    real, calls = step_mod.image_loss, {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    run = tmp_path / "run"
    monkeypatch.setattr(step_mod, "image_loss", interrupt)
    code, _, err = run_cli("finetune", *args, "--out", str(run))
    assert code == 130, err
    monkeypatch.setattr(step_mod, "image_loss", real)
    code, _, err = run_cli("finetune", "--out", str(run), "--resume", "--quiet")
    assert code == 0, err
    a, b = read_checkpoint(ref / "latest.pt").decoder_state, read_checkpoint(run / "latest.pt").decoder_state
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert [r["train_instance_loss"] for r in _metrics(run)] == pytest.approx(
        [r["train_instance_loss"] for r in recs], rel=1e-6)
    # a resumed run keeps training its decoder: asking to drop it is refused
    code, _, err = run_cli("finetune", "--out", str(run), "--resume", "--no-instance-decoder")
    assert code == 2 and "instance-decoder" in err


def test_decoder_only_training_freezes_sam(run_cli, synth, tmp_path):
    """--instance-decoder-only on a finetuned (PEFT) run: SAM's weights, adapters included, stay as they were; the
    decoder trains; the encoder is cached whole; best.pt follows the automatic segmentation's mSA."""
    from peft_export.models.checkpoint import read_checkpoint

    base = tmp_path / "base"
    code, _, err = run_cli("finetune", *TINY, "--data", str(synth), "--iterations", "2", "--out", str(base))
    assert code == 0, err
    run = tmp_path / "only"
    code, out, err = run_cli("finetune", "--model", str(base / "best.pt"), "--data", str(synth), "--iterations", "4",
                             "--lr", "1e-3", "--instance-decoder-only", "--no-val-before", "--out", str(run), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["val_metric"] == "instance mSA (automatic segmentation)"
    assert summary["trunk_cache"]["split_before"] == "(whole encoder)"
    assert summary["trainable_parameters"]["image_encoder"] == 0 == summary["trainable_parameters"]["mask_decoder"]
    a, b = read_checkpoint(base / "best.pt"), read_checkpoint(run / "best.pt")
    assert b.peft == a.peft  # the base run's LoRA, still mergeable by merge-and-export
    for k, v in a.state_dict.items():
        assert torch.equal(b.state_dict[k], v), k
    assert a.decoder_state is None and b.decoder_state is not None
    assert b.raw["training"]["config"]["val_metric"] == "instance"
    assert set(_metrics(run)[-1]) >= {"train_instance_loss"} and "train_mask_loss" not in _metrics(run)[-1]


def test_prompt_decoder_trains_beside_the_instance_decoder_on_the_frozen_encoder(run_cli, synth, tmp_path):
    """--instance-decoder-only --prompt-decoder: the image encoder (adapters included) stays as it was and stays
    cached whole; the prompt encoder and mask decoder train with the interactive recipe (its losses are reported)
    beside the instance decoder (APG's point prompts come from them)."""
    from peft_export.models.checkpoint import read_checkpoint

    base = tmp_path / "base"
    code, _, err = run_cli("finetune", *TINY, "--data", str(synth), "--iterations", "2", "--out", str(base))
    assert code == 0, err
    run = tmp_path / "both"
    code, out, err = run_cli("finetune", "--model", str(base / "best.pt"), "--data", str(synth), "--iterations", "4",
                             "--lr", "1e-3", "--instance-decoder-only", "--prompt-decoder", "--no-val-before",
                             "--out", str(run), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["trunk_cache"]["split_before"] == "(whole encoder)"
    assert summary["trainable_parameters"]["image_encoder"] == 0 < summary["trainable_parameters"]["mask_decoder"]
    a, b = read_checkpoint(base / "best.pt"), read_checkpoint(run / "best.pt")
    assert b.peft == a.peft
    changed = {k.split(".")[0] for k, v in a.state_dict.items() if not torch.equal(b.state_dict[k], v)}
    assert "mask_decoder" in changed and changed <= {"mask_decoder", "prompt_encoder"}, changed
    assert b.decoder_state is not None
    assert {"train_instance_loss", "train_mask_loss", "train_iou_loss"} <= set(_metrics(run)[-1])


def test_binary_mask_labels_are_split_into_objects_with_a_warning(run_cli, synth, tmp_path, caplog):
    """Instance targets need instance labels: a binary mask is split into connected components (with a warning,
    as for prompt training) and the decoder trains on those objects."""
    import shutil

    import tifffile

    data = tmp_path / "binary"
    shutil.copytree(synth, data)
    for p in (data / "train" / "labels").glob("*.tif"):
        tifffile.imwrite(p, (tifffile.imread(p) > 0).astype(np.uint8))
    with caplog.at_level("WARNING", logger="peft_export"):
        code, out, err = run_cli("finetune", *TINY, "--data", str(data), "--iterations", "1", "--instance-decoder",
                                 "--out", str(tmp_path / "r"), "--json")
    assert code == 0, err
    assert "binary mask; split into 4 connected components" in caplog.text
    assert json.loads(out)["last"]["train_instance_loss"] > 0


@pytest.mark.parametrize("args,message", [
    (["--instance-decoder-only", "--no-instance-decoder"], "cannot go with --no-instance-decoder"),
    (["--val-metric", "instance"], "needs an instance decoder"),
    (["--prompt-decoder"], "--prompt-decoder goes with --instance-decoder-only"),
])
def test_bad_instance_options_give_one_line(run_cli, synth, tmp_path, args, message):
    code, _, err = run_cli("finetune", *TINY, "--data", str(synth), "--iterations", "1", "--out",
                           str(tmp_path / "r"), *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# export (instance_decoder.onnx, manifest, parity gate) and the torch-free runtime (segment_instances, CLI)
def test_export_writes_the_instance_decoder_graph_with_its_contract(inst_export):
    """I/O contract (the bioimage.io composition relies on it), manifest entry, parity figures; the graph vs the
    PyTorch decoder on embeddings the gate never saw (batch of 3)."""
    import onnx

    from peft_export.manifest import read_manifest
    from peft_export.runtime.onnx_backend import ort_session

    out, decoder = inst_export.out_dir, inst_export.decoder
    m = read_manifest(out)
    assert m.files["instance_decoder"]["path"] == "instance_decoder.onnx"
    extra = m.extra["instance_decoder"]
    assert extra["channels"] == ["foreground", "center_distance", "boundary_distance"]
    assert extra["postprocessing"]["foreground_threshold"] == 0.5 and extra["output_size"] == 256
    graph = onnx.load(out / "instance_decoder.onnx", load_external_data=False).graph

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    (inp,), (outp,) = graph.input, graph.output
    assert (inp.name, outp.name) == ("image_embeddings", "instance_maps")
    assert inp.type.tensor_type.elem_type == outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp)[1:] == [64, 16, 16] and dims(outp)[1:] == [3, 256, 256] and isinstance(dims(inp)[0], str)
    checks = json.dumps(m.to_dict())
    assert "instance decoder maps max |diff|" in checks, "the parity gate did not check the instance decoder"
    emb = torch.randn(3, 64, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = decoder(emb).numpy()
    got = ort_session(out / "instance_decoder.onnx").run(None, {"image_embeddings": emb.numpy()})[0]
    assert got.shape == (3, 3, 256, 256) and float(np.abs(got - ref).max()) <= 1e-4
    assert float(ref.std()) > 1e-3


def test_onnx_runtime_and_pytorch_give_the_same_instances(inst_export, dsb_val):
    """Segmenter.segment(method="instance") on the export (ONNX Runtime, no torch in the path) vs the checkpoint's
    PyTorch model + decoder: the same label image (object-matched IoU), untiled and tiled."""
    from peft_export.loading import load_model
    from peft_export.metrics import matched_iou
    from peft_export.models.torch_backend import TorchBackend
    from peft_export.runtime.instances import InstanceOptions, image_maps
    from peft_export.runtime.segmenter import Segmenter
    from peft_export.runtime.strategies import AutoOptions
    from peft_export.runtime.tiling import Tiling

    ckpt, out = inst_export.checkpoint, inst_export.out_dir
    loaded = load_model(str(ckpt))
    torch_be = TorchBackend(loaded.model, loaded.spec.preprocess, multimask=True,
                            instance_decoder=loaded.instance_decoder)
    image = dsb_val[0].image
    ours, ref = Segmenter(out), Segmenter(torch_be)
    ours.set_image(image)
    ref.set_image(image)
    maps = image_maps(ref)
    # random weights give maps near 0.5: thresholds at their medians, so that there are objects to compare
    fg, center, boundary = (float(np.median(m)) for m in maps)
    cfg = AutoOptions(method="instance", instance=InstanceOptions(
        foreground_threshold=fg, center_distance_threshold=center, boundary_distance_threshold=boundary))
    a, b = ours.segment(cfg), ref.segment(cfg)
    assert a.shape == image.shape[:2] and b.max() >= 3, "the maps should give a few objects"
    assert matched_iou(a, b) >= 0.99
    big = np.tile(image, (2, 2) + (1,) * (image.ndim - 2))  # larger than the model input: tiles with a halo
    tiled = Segmenter(out, tiling=Tiling(tile=256, halo=32))
    tiled.set_image(big)
    assert len(tiled.plan.grid) > 1
    labels = tiled.segment(cfg)
    assert labels.shape == big.shape[:2] and labels.max() >= a.max()


def test_predict_and_evaluate_auto_use_the_instance_decoder(run_cli, inst_export, tiny_export, dsb_val, tmp_path):
    import tifffile

    out = inst_export.out_dir
    img = tmp_path / "tile.tif"
    tifffile.imwrite(img, dsb_val[0].image)
    code, stdout, err = run_cli("predict", str(out), str(img), "--auto", "-o", str(tmp_path / "a.tif"), "--json")
    assert code == 0, err
    assert "instance decoder" in err and json.loads(stdout)["objects"] >= 0
    code, stdout, err = run_cli("evaluate", str(out), "--auto", "--json")
    assert code == 0, err
    auto = json.loads(stdout)["auto"]
    assert auto["method"] == "instance" and auto["objects_true"] == int(dsb_val[0].labels.max())
    assert {"msa", "precision", "recall", "f1", "objects_pred"} <= set(auto)
    # the prompt table's automatic row: the same strategy, the objects it found beside the true ones
    code, stdout, err = run_cli("evaluate", str(out), "--prompts", "box,auto", "--json")
    assert code == 0, err
    row = json.loads(stdout)["results"]["auto"]
    assert row["method"] == "instance" and row["objects_found"] == auto["objects_pred"]
    assert row["objects"] == auto["objects_true"] and row["msa"] == pytest.approx(auto["msa"])
    # an export without an instance decoder, asked for one: one line saying how to make one
    code, _, err = run_cli("predict", str(tiny_export.out_dir), str(img), "--auto", "--method", "instance", "-o",
                           str(tmp_path / "b.tif"))
    assert code == 2 and "no instance decoder" in err and "--instance-decoder" in err, err
    assert len(err.strip().splitlines()) == 1


def test_build_engine_plans_the_instance_decoder(inst_export, tiny_export):
    """build-engine plans a third engine for an export with an instance decoder (batch 1..--encoder-batch) and
    none for one without. TensorRT itself is not installed here: the build and its engine are unverified."""
    from peft_export.export.tensorrt.options import EngineOptions
    from peft_export.export.tensorrt.plan import plan_engines

    plan = plan_engines(inst_export.out_dir, EngineOptions(encoder_batch=3))
    e = plan.engines["instance_decoder"]
    assert (e.onnx, e.engine) == ("instance_decoder.onnx", "instance_decoder.engine")
    assert e.profile["image_embeddings"] == {"min": [1, 64, 16, 16], "opt": [3, 64, 16, 16], "max": [3, 64, 16, 16]}
    assert "instance_decoder" in plan.trtexec()
    assert set(plan_engines(tiny_export.out_dir).engines) == {"encoder", "decoder"}


def test_merge_writes_the_instance_decoder_beside_the_plain_sam_weights(tmp_path, run_cli):
    """`merge` keeps SAM's state dict loadable as it is and writes the decoder to <stem>.decoder.pt (micro-sam's
    key); with --force and a checkpoint without a decoder, a stale decoder file is removed."""
    from peft_export.loading import load_model

    sam = _tiny_sam()
    state = _state()
    ckpt = tmp_path / "micro_sam_best.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in sam.state_dict().items()}, "decoder_state": state}, ckpt)
    out = tmp_path / "merged.pt"
    code, stdout, err = run_cli("merge", str(ckpt), "--from", "micro-sam", "--model", "vit_tiny", "-o", str(out),
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["instance_decoder"] == str(tmp_path / "merged.decoder.pt")
    _tiny_sam().load_state_dict(torch.load(out, weights_only=True), strict=True)
    saved = torch.load(tmp_path / "merged.decoder.pt", weights_only=True)["decoder_state"]
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    # the pair loads back as a micro-sam checkpoint with its decoder
    both = tmp_path / "both.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in torch.load(out, weights_only=True).items()},
                "decoder_state": saved}, both)
    assert load_model("vit_tiny", both).instance_decoder is not None

    code, _, err = run_cli("merge", str(ckpt), "--from", "micro-sam", "--model", "vit_tiny", "-o", str(out))
    assert code != 0 and "already exists" in err
    plain = tmp_path / "plain.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in sam.state_dict().items()}}, plain)
    code, stdout, err = run_cli("merge", str(plain), "--from", "micro-sam", "--model", "vit_tiny", "-o", str(out),
                                "--force", "--json")
    assert code == 0, err
    assert json.loads(stdout)["instance_decoder"] is None and not (tmp_path / "merged.decoder.pt").exists()
