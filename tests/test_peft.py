"""PEFT methods: ONE matrix runs every method through the same checks, on a SAM ViT and a TinyViT.

apply -> give the adapters random non-zero values -> merge -> outputs equal (fp32) -> the merged state dict
loads strictly into the vanilla builder. AdaptFormer must be refused by name. Plus placement parsing, the
study's trainable-parameter counts for vit_b (computed from a built model), micro-sam as an oracle, and the
`merge` command.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peft_export.errors import UsageError
from peft_export.models import build_sam, get_spec
from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.peft import (
    METHODS,
    NotMergeableError,
    PeftConfig,
    apply_peft,
    count_parameters,
    merge_peft,
    resolve_placement,
)

OPTIONS = {"lora": {"rank": 4, "targets": ["q", "k", "v", "mlp"]}, "fact": {"rank": 4},
           "adaptformer": {"bottleneck": 8}}
PLACEMENTS = ["all", "late:1", "0,2"]
MODELS = ["vit_tiny", "tinyvit_tiny"]


def _randomize_trainable(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.image_encoder.named_parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith("scale") else 0.0)


def _outputs(model, x):
    emb = model.image_encoder(x)
    h, w = model.prompt_encoder.image_embedding_size
    s = model.image_encoder.img_size
    coords = torch.tensor([[[0.1 * s, 0.2 * s], [0.6 * s, 0.7 * s]], [[0.5 * s, 0.5 * s], [0.0, 0.0]]])
    labels = torch.tensor([[2.0, 3.0], [1.0, -1.0]])
    masks, iou = PromptDecoder(model)(emb, coords, labels, torch.zeros(2, 1, 4 * h, 4 * w), torch.zeros(2))
    return emb, masks, iou


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_matrix(method, model_name, placement):
    torch.manual_seed(0)
    model = build_sam(model_name).eval()
    config = PeftConfig(method, placement, dict(OPTIONS.get(method, {})))
    apply_peft(model, config, model_name)
    n_blocks = len(model.image_encoder.blocks)
    expected_blocks = resolve_placement(placement, n_blocks) if method not in ("full", "frozen") else []
    assert config.blocks == expected_blocks
    trainable = count_parameters(model)
    if method == "frozen":
        assert trainable["image_encoder"] == 0
    else:
        assert trainable["image_encoder"] > 0
    assert trainable["mask_decoder"] == sum(p.numel() for p in model.mask_decoder.parameters())
    # only chosen blocks (and SSF's patch embedding) may hold trainable encoder parameters
    block_of = {id(p): i for i, blk in enumerate(model.image_encoder.blocks) for p in blk.parameters()}
    for name, p in model.image_encoder.named_parameters():
        if p.requires_grad and method != "full":
            assert block_of.get(id(p)) in expected_blocks or (method == "ssf" and "patch_embed" in name), name
    _randomize_trainable(model)
    x = torch.randn(1, 3, model.image_encoder.img_size, model.image_encoder.img_size,
                    generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb, masks, iou = _outputs(model, x)
    if method == "adaptformer":
        with pytest.raises(NotMergeableError, match="adaptformer"):
            merge_peft(copy.deepcopy(model))
        return
    merged = merge_peft(copy.deepcopy(model)).eval()
    vanilla = get_spec(model_name).build()
    vanilla.load_state_dict(merged.state_dict(), strict=True)  # plain module tree and key names again
    with torch.no_grad():
        for a, b in zip(_outputs(vanilla, x), (emb, masks, iou)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_new_adapters_start_as_identity_where_the_study_says_so():
    """LoRA (B=0), AdaptFormer (Up=0) start at base SAM; FacT does not (V is not zero)."""
    x = torch.randn(1, 3, 256, 256)
    base = build_sam("vit_tiny").eval()
    with torch.no_grad():
        ref = base.image_encoder(x)
    for method, same in (("lora", True), ("adaptformer", False), ("fact", False)):
        model = copy.deepcopy(base)
        apply_peft(model, PeftConfig(method, "all", OPTIONS.get(method, {})), "vit_tiny")
        model.eval()
        with torch.no_grad():
            out = model.image_encoder(x)
        if method == "adaptformer":  # the study variant adds +u, so not identity; plain variant is identity
            m2 = copy.deepcopy(base)
            apply_peft(m2, PeftConfig("adaptformer", "all", {"variant": "plain"}), "vit_tiny")
            with torch.no_grad():
                torch.testing.assert_close(m2.eval().image_encoder(x), ref)
        assert torch.allclose(out, ref, atol=1e-6) == same, method


# ---- placement ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("all", list(range(12))), ("late:1", [11]), ("late:4", [8, 9, 10, 11]), ("late:50%", list(range(6, 12))),
    ("late:25%", [9, 10, 11]), ("late:8%", [11]), ("6-11", list(range(6, 12))), ("0,3,9", [0, 3, 9]),
    ("0-2,9", [0, 1, 2, 9]),
])
def test_placements(spec, expected):
    assert resolve_placement(spec, 12, "vit_b") == expected


@pytest.mark.parametrize("spec,match", [
    ("12", "vit_b has 12 encoder blocks"), ("late:13", "vit_b has 12 encoder blocks"), ("late:0", "N >= 1"),
    ("5-3", "reversed"), ("early", "cannot read placement"), ("late:150%", "percentage"),
])
def test_bad_placements(spec, match):
    with pytest.raises(UsageError, match=match):
        resolve_placement(spec, 12, "vit_b")


def test_tinyvit_placement_counts_attention_blocks():
    model = build_sam("lite_medsam")
    assert len(model.image_encoder.blocks) == 10  # depths 2 (conv), 2, 6, 2
    with pytest.raises(UsageError, match="lite_medsam has 10 encoder blocks"):
        apply_peft(model, PeftConfig("lora", "10"), "lite_medsam")


def test_unknown_method_and_option():
    with pytest.raises(UsageError, match="unknown PEFT method"):
        apply_peft(build_sam("vit_tiny"), PeftConfig("dora"), "vit_tiny")
    with pytest.raises(UsageError, match="has no option 'rank'"):
        apply_peft(build_sam("vit_tiny"), PeftConfig("ssf", "all", {"rank": 3}), "vit_tiny")
    with pytest.raises(UsageError, match="targets"):
        apply_peft(build_sam("vit_tiny"), PeftConfig("lora", "all", {"targets": "q,x"}), "vit_tiny")


# ---- the study's trainable-parameter figures for vit_b (from a built model, on the meta device) ----------

@pytest.mark.parametrize("method,placement,options,millions", [
    ("lora", "all", {"rank": 32}, 1.18),
    ("fact", "all", {"rank": 16}, 0.30),
    ("ssf", "all", {}, 0.20),
    ("bias", "all", {}, 0.10),
    ("layernorm", "all", {}, 0.037),
    ("attention", "all", {}, 28.4),
    ("late_ft", "late:1", {}, 7.1),
    ("lora", "late:1", {"rank": 32, "targets": "q,k,v,mlp"}, 0.393),
])
def test_vit_b_trainable_parameters_match_the_study(method, placement, options, millions):
    with torch.device("meta"):
        model = get_spec("vit_b").build()
        apply_peft(model, PeftConfig(method, placement, options), "vit_b")
    n = count_parameters(model)["image_encoder"] / 1e6
    digits = len(str(millions).split(".")[1])
    assert round(n, digits) == millions, n


# ---- micro-sam (the study's implementation) as an oracle ----------------------------------------------

MICRO_SAM_CASES = [
    ("lora", "LoRASurgery", {"rank": 4}, {"rank": 4}),
    ("lora", "LoRASurgery", {"rank": 4, "update_matrices": ["q", "k", "v", "mlp"]},
     {"rank": 4, "targets": ["q", "k", "v", "mlp"]}),
    ("fact", "FacTSurgery", {"rank": 4}, {"rank": 4}),
    ("ssf", "SSFSurgery", {"rank": 4}, None),
    ("adaptformer", "AdaptFormer", {"rank": 4}, {}),
    ("attention", "AttentionSurgery", {}, {}),
    ("bias", "BiasSurgery", {}, {}),
    ("layernorm", "LayerNormSurgery", {}, {}),
    ("late_ft", "ClassicalSurgery", {}, {}),
]


@pytest.mark.parametrize("method,surgery,ms_kwargs,our_options", MICRO_SAM_CASES)
def test_micro_sam_checkpoints_load_merge_and_match(tmp_path, method, surgery, ms_kwargs, our_options, run_cli):
    """Same weights in (micro-sam's PEFT model, saved as its trainer does), same outputs out."""
    ps = pytest.importorskip("micro_sam.models.peft_sam", reason="micro-sam oracle not installed "
                             "(pip install --no-deps micro-sam)")
    from peft_export.models.loading import load_model

    torch.manual_seed(0)
    ref = build_sam("vit_tiny")
    kwargs = dict(ms_kwargs)
    rank = kwargs.pop("rank", None)
    ref = ps.PEFT_Sam(ref, rank=rank, peft_module=getattr(ps, surgery), attention_layers_to_update=[2, 3],
                      **kwargs).sam.eval()
    _randomize_trainable(ref, seed=5)
    ckpt = tmp_path / "best.pt"
    torch.save({"model_state": {f"sam.{k}": v for k, v in ref.state_dict().items()}, "iteration": 3}, ckpt)
    peft = {"method": method, "placement": "2-3", "options": our_options or {}}
    loaded = load_model("vit_tiny", ckpt, peft_from=peft)
    ours = loaded.model.eval()
    ours_trainable = {n for n, p in ours.image_encoder.named_parameters() if p.requires_grad}
    ref_trainable = {n for n, p in ref.image_encoder.named_parameters() if p.requires_grad}
    assert ours_trainable == ref_trainable
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for a, b in zip(_outputs(ours, x), _outputs(ref, x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the CLI merge of the same file, as a user would run it
    out = tmp_path / "merged.pt"
    args = ["merge", str(ckpt), "--from", "micro-sam", "--model", "vit_tiny", "--peft", method, "--blocks", "2-3",
            "-o", str(out), "--json"]
    if our_options and "rank" in our_options:
        args += ["--rank", str(our_options["rank"])]
    if our_options and "targets" in our_options:
        args += ["--targets", ",".join(our_options["targets"])]
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    report = json.loads(stdout)
    if method == "adaptformer":
        assert report["merged"] is False and "cannot be folded" in report["reason"]
        return
    assert report["merged"] is True and report["verification"]["passed"]
    sd = torch.load(out, weights_only=True)
    vanilla = get_spec("vit_tiny").build()
    vanilla.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for a, b in zip(_outputs(vanilla.eval(), x), _outputs(ref, x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- merge command -----------------------------------------------------------------------------------

@pytest.fixture
def own_lora_checkpoint(tmp_path):
    from peft_export.models.checkpoint import save_checkpoint

    model = build_sam("vit_tiny").eval()
    config = PeftConfig("lora", "late:2", {"rank": 4})
    apply_peft(model, config, "vit_tiny")
    _randomize_trainable(model)
    p = tmp_path / "run" / "best.pt"
    save_checkpoint(p, model_name="vit_tiny", state_dict=model.state_dict(), peft=config.to_dict())
    return p, model


def test_merge_own_checkpoint_and_load_in_segment_anything(tmp_path, own_lora_checkpoint, run_cli):
    ckpt, model = own_lora_checkpoint
    out = tmp_path / "merged.pt"
    code, stdout, err = run_cli("merge", str(ckpt), "-o", str(out))
    assert code == 0, err
    assert "image embedding" in stdout and "merged" in stdout
    side = json.loads((tmp_path / "merged.pt.json").read_text())
    assert side["model"] == "vit_tiny" and side["source"]["peft"]["method"] == "lora"
    assert side["verification"]["embedding_max_abs_diff"] < 1e-4
    vanilla = get_spec("vit_tiny").build()
    vanilla.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(vanilla.image_encoder(x), model.image_encoder(x), atol=1e-5, rtol=1e-5)
    # refuses to overwrite without --force; with --force it does
    code, _, err = run_cli("merge", str(ckpt), "-o", str(out))
    assert code == 2 and "--force" in err
    assert run_cli("merge", str(ckpt), "-o", str(out), "--force")[0] == 0


def test_merged_vit_b_loads_into_segment_anything_registry(tmp_path):
    """The vit_b merge output is what segment_anything's own builder loads strictly. (Numerical equality of
    the fold is the matrix above; a vit_b forward takes minutes on a CPU, so it is not repeated here.)"""
    from segment_anything import sam_model_registry

    for method in ("lora", "ssf"):
        model = build_sam("vit_b").eval()
        apply_peft(model, PeftConfig(method, "late:1", OPTIONS.get(method, {})), "vit_b")
        _randomize_trainable(model)
        merged = merge_peft(model)
        out = tmp_path / f"vit_b_{method}.pt"
        torch.save(merged.state_dict(), out)
        sam = sam_model_registry["vit_b"](checkpoint=str(out))  # strict load inside segment_anything
        qkv = merged.image_encoder.blocks[11].attn.qkv.weight
        assert torch.equal(sam.image_encoder.blocks[11].attn.qkv.weight, qkv)


def test_failed_verification_writes_nothing(tmp_path, own_lora_checkpoint, monkeypatch, run_cli):
    """A merge whose check fails is an error and leaves no output behind."""
    from peft_export.peft import lora

    ckpt, _ = own_lora_checkpoint
    real = lora.LoRAQKV.merged

    def broken(self):
        lin = real(self)
        lin.weight.data += 0.1 * torch.randn_like(lin.weight)  # a wrong fold
        return lin

    monkeypatch.setattr(lora.LoRAQKV, "merged", broken)
    out = tmp_path / "merged.pt"
    code, _, err = run_cli("merge", str(ckpt), "-o", str(out))
    assert code != 0 and "differs from the unmerged" in err
    assert not out.exists() and not (tmp_path / "merged.pt.json").exists()


def test_merge_bad_inputs(tmp_path, run_cli):
    plain = tmp_path / "plain.pt"
    torch.save(build_sam("vit_tiny").state_dict(), plain)
    code, _, err = run_cli("merge", str(plain), "-o", str(tmp_path / "m.pt"), "--from", "micro-sam")
    assert code == 2 and "--model is required" in err
    code, _, err = run_cli("merge", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "m.pt"))
    assert code == 2 and "not found" in err
    code, _, err = run_cli("merge", str(plain), "-o", str(tmp_path / "m.pt"), "--model", "vit_tiny",
                           "--peft", "lora", "--blocks", "late:9")
    assert code == 2 and "vit_tiny has 4 encoder blocks" in err
