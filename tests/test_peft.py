"""PEFT methods: every method through the same small checks, on a SAM ViT and a TinyViT, three placements.

The case grid (method x model x placement) is built once per case: apply -> give the adapters random
non-zero values -> reference outputs. Each check is its own test (as Hugging Face peft's ``_test_merge_layers``,
``_test_merge_layers_is_idempotent``, ...): placement, trainable parts, merge equals the unmerged model (fp32),
the merged state dict loads strictly into the vanilla builder, merging twice changes nothing, a NaN adapter is
refused, an fp16 model merges in fp32. AdaptFormer must be refused by name. Plus the option declarations
(CLI, config keys, validation), placement parsing, the study's trainable-parameter counts for vit_b, micro-sam
as an oracle, and the `merge` command.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass

import pytest
import torch

from peft_export.errors import UsageError, VerificationError
from peft_export.models import build_sam, get_spec
from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.peft import (
    METHODS,
    OPTIONS,
    NotMergeableError,
    PeftConfig,
    apply_peft,
    count_parameters,
    merge_peft,
    resolve_placement,
)
from peft_export.peft.base import MergeableModule

OPTIONS_OF = {"lora": {"rank": 4, "targets": ["q", "k", "v", "mlp"]}, "fact": {"rank": 4, "scale": 0.5},
              "adaptformer": {"bottleneck": 8}}
PLACEMENTS = ["all", "late:1", "0,2"]
MODELS = ["vit_tiny", "tinyvit_tiny"]
MERGEABLE = [m for m in METHODS if METHODS[m].mergeable]
ADAPTER_METHODS = ["lora", "fact", "ssf"]  # mergeable methods that add adapter layers (the others tune weights)

GRID = [(m, model, p) for m in METHODS for model in MODELS for p in PLACEMENTS]
MERGE_GRID = [c for c in GRID if c[0] in MERGEABLE]
ADAPTER_GRID = [c for c in GRID if c[0] in ADAPTER_METHODS]


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


@functools.cache
def _built(method, model_name, placement):
    """(model with the method applied and random adapters, its config, an input, the reference outputs)."""
    torch.manual_seed(0)
    model = build_sam(model_name).eval()
    config = PeftConfig(method, placement, dict(OPTIONS_OF.get(method, {})))
    apply_peft(model, config, model_name)
    _randomize_trainable(model)
    x = torch.randn(1, 3, model.image_encoder.img_size, model.image_encoder.img_size,
                    generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _outputs(model, x)
    return model, config, x, ref


@dataclass
class Case:
    built: torch.nn.Module  # shared by the tests of this case: read only
    config: PeftConfig
    x: torch.Tensor
    ref: tuple
    model_name: str

    @property
    def model(self) -> torch.nn.Module:
        """A fresh copy of the built model, to change."""
        return copy.deepcopy(self.built)


@pytest.fixture
def case(request) -> Case:
    return Case(*_built(*request.param), request.param[1])


def _grid(cases):
    return pytest.mark.parametrize("case", cases, indirect=True, ids=["-".join(c) for c in cases])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_every_method_has_its_options_class_and_is_in_the_grid():
    assert list(METHODS) == list(OPTIONS)
    assert {c[0] for c in GRID} == set(METHODS)
    adds_layers = set()
    for method in METHODS:
        model = build_sam("vit_tiny")
        apply_peft(model, PeftConfig(method, "all"), "vit_tiny")
        if any(isinstance(m, MergeableModule) for m in model.modules()):
            adds_layers.add(method)
    assert adds_layers == set(ADAPTER_METHODS)


@_grid(GRID)
def test_apply_resolves_the_placement(case):
    model, config = case.built, case.config
    n_blocks = len(model.image_encoder.blocks)
    expected = resolve_placement(config.placement, n_blocks) if config.method not in ("full", "frozen") else []
    assert config.blocks == expected


@_grid(GRID)
def test_trainable_parts(case):
    model, config = case.built, case.config
    trainable = count_parameters(model)
    assert (trainable["image_encoder"] == 0) == (config.method == "frozen")
    assert trainable["mask_decoder"] == sum(p.numel() for p in model.mask_decoder.parameters())
    assert trainable["prompt_encoder"] == sum(p.numel() for p in model.prompt_encoder.parameters())


@_grid([c for c in GRID if c[0] != "full"])
def test_only_chosen_blocks_train(case):
    """Only the chosen blocks (and SSF's patch embedding) hold trainable encoder parameters."""
    model, config = case.built, case.config
    block_of = {id(p): i for i, blk in enumerate(model.image_encoder.blocks) for p in blk.parameters()}
    for name, p in model.image_encoder.named_parameters():
        if p.requires_grad:
            assert block_of.get(id(p)) in config.blocks or (config.method == "ssf" and "patch_embed" in name), name


@_grid(MERGE_GRID)
def test_merge_layers(case):
    """The merged model computes what the unmerged one did (fp32)."""
    model, x, ref = case.model, case.x, case.ref
    merged = merge_peft(model).eval()
    with torch.no_grad():
        for a, b in zip(_outputs(merged, x), ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@_grid(MERGE_GRID)
def test_merged_state_dict_loads_into_the_vanilla_model(case):
    model, x, ref = case.model, case.x, case.ref
    vanilla = get_spec(case.model_name).build().eval()
    vanilla.load_state_dict(merge_peft(model).state_dict(), strict=True)  # plain module tree and key names
    with torch.no_grad():
        for a, b in zip(_outputs(vanilla, x), ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@_grid(MERGE_GRID)
def test_merge_layers_is_idempotent(case):
    """Merging a merged model again leaves every weight as it is."""
    model, config = case.model, case.config
    merged = merge_peft(model)
    once = _state(merged)
    again = merge_peft(merged)
    assert again is merged
    twice = _state(again)
    assert once.keys() == twice.keys()
    for k in once:
        assert torch.equal(once[k], twice[k]), k
    METHODS[config.method](**config.options).merge(merged, "vit")  # the method's own merge: nothing left to fold
    for k, v in _state(merged).items():
        assert torch.equal(once[k], v), k


@_grid(ADAPTER_GRID)
def test_merge_refuses_a_nan_adapter(case):
    model = case.model
    before = _state(model)
    name, param = next((n, p) for n, p in model.image_encoder.named_parameters() if p.requires_grad
                       and any(n.startswith(m) for m in _adapter_layer_names(model)))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(VerificationError, match=r"cannot merge: image_encoder\..* holds NaN"):
        merge_peft(model)
    after = _state(model)  # nothing was folded
    assert after.keys() == before.keys()
    for k in before:
        if k != "image_encoder." + name:
            assert torch.equal(after[k], before[k]), k


def _adapter_layer_names(model) -> list[str]:
    return [n.removeprefix("image_encoder.") + "." for n, m in model.named_modules()
            if isinstance(m, MergeableModule)]


@_grid(MERGE_GRID)
def test_fp16_model_merges_in_fp32(case):
    """An fp16 model's fold is computed in fp32: exactly what merging its fp32 copy and rounding gives, and within
    fp16 rounding of the fp32 model's merge; the merged model stays fp16."""
    model = case.model
    fp32_merge = _state(merge_peft(copy.deepcopy(model)))
    half = copy.deepcopy(model).half()
    reference = _state(merge_peft(copy.deepcopy(half).float()).half())
    merged = _state(merge_peft(half))
    assert merged.keys() == reference.keys() == fp32_merge.keys()
    for k, v in merged.items():
        if v.is_floating_point():
            assert v.dtype == torch.float16, k
            assert torch.equal(v, reference[k]), k
            torch.testing.assert_close(v.float(), fp32_merge[k], rtol=2e-3, atol=1e-4, msg=k)


@_grid([c for c in GRID if c[0] not in MERGEABLE])
def test_not_mergeable_is_refused_by_name(case):
    model, config = case.model, case.config
    with pytest.raises(NotMergeableError, match=config.method):
        merge_peft(model)


def test_new_adapters_start_as_identity_where_the_study_says_so():
    """LoRA (B=0), AdaptFormer (Up=0) start at base SAM; FacT does not (V is not zero)."""
    x = torch.randn(1, 3, 256, 256)
    base = build_sam("vit_tiny").eval()
    with torch.no_grad():
        ref = base.image_encoder(x)
    for method, same in (("lora", True), ("adaptformer", False), ("fact", False)):
        model = copy.deepcopy(base)
        apply_peft(model, PeftConfig(method, "all", OPTIONS_OF.get(method, {})), "vit_tiny")
        model.eval()
        with torch.no_grad():
            out = model.image_encoder(x)
        if method == "adaptformer":  # the study variant adds +u, so not identity; plain variant is identity
            m2 = copy.deepcopy(base)
            apply_peft(m2, PeftConfig("adaptformer", "all", {"variant": "plain"}), "vit_tiny")
            with torch.no_grad():
                torch.testing.assert_close(m2.eval().image_encoder(x), ref)
        assert torch.allclose(out, ref, atol=1e-6) == same, method


# ---- options: declared once (peft/options.py), everything else derived ----------------------------------

def test_cli_options_come_from_the_options_classes():
    from peft_export.peft.options import cli_options

    opts = {o.flag: o for o in cli_options()}
    # the existing option names keep working; a declaration names its CLI option where it differs
    assert set(opts) >= {"--rank", "--alpha", "--targets", "--dropout", "--bottleneck", "--adapter-alpha", "--variant",
                         "--ssf-patch-embed"}
    assert opts["--rank"].fields == {"lora": "rank", "fact": "rank"} and opts["--rank"].type is int
    assert opts["--adapter-alpha"].fields == {"adaptformer": "alpha"} and opts["--adapter-alpha"].key == "adapter_alpha"
    assert opts["--alpha"].fields == {"lora": "alpha"}
    assert opts["--ssf-patch-embed"].type is bool and opts["--ssf-patch-embed"].key == "ssf_patch_embed"
    assert "lora:" in opts["--rank"].help and "(default 32)" in opts["--rank"].help and "(default 16)" in \
        opts["--rank"].help
    # every field of every method is one CLI option
    fields = sorted((m, f) for m, cls in OPTIONS.items() for f in cls.model_fields)
    assert sorted((m, f) for o in cli_options() for m, f in o.fields.items()) == fields


@pytest.mark.parametrize("command", ["finetune", "merge", "merge-and-export"])
def test_help_shows_every_peft_option_under_the_peft_panel(run_cli, command):
    import re

    from peft_export.peft.options import cli_options

    code, out, _ = run_cli(command, "--help")
    assert code == 0
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", out))
    assert "PEFT" in text and "PEFT method: " + ", ".join(OPTIONS) in text
    for o in cli_options():
        assert o.flag in text, o.flag
    assert "--no-ssf-patch-embed" in text


def test_an_option_for_another_method_is_ignored_with_a_warning():
    from peft_export.peft.options import peft_config_from

    said = []
    cfg = peft_config_from("ssf", "late:1", {"rank": 3, "ssf_patch_embed": False, "adapter_alpha": None}, said.append)
    assert cfg.options == {"patch_embed": False} and cfg.placement == "late:1"
    assert said == ["--rank does not apply to ssf; ignored"]
    cfg = peft_config_from("adaptformer", None, {"adapter_alpha": "0.5", "alpha": 2.0}, said.append)
    assert cfg.options == {"alpha": "0.5"} and said[-1] == "--alpha does not apply to adaptformer; ignored"
    assert METHODS["adaptformer"](**cfg.options).options["alpha"] == 0.5


@pytest.mark.parametrize("method,options,match", [
    ("lora", {"rank": 0}, r"lora option --rank: Input should be greater than or equal to 1 \(got 0\)"),
    ("lora", {"targets": "q,x"}, "lora option --targets: unknown value 'x'; choose from q, k, v, mlp"),
    ("lora", {"targets": ""}, "lora option --targets: List should have at least 1 item"),
    ("fact", {"dropout": 1.0}, "fact option --dropout: Input should be less than 1"),
    ("fact", {"scale": float("nan")}, "fact option --scale"),
    ("adaptformer", {"alpha": "abc"}, "adaptformer option --adapter-alpha: .*'learnable' or .*number"),
    ("adaptformer", {"variant": "new"}, "adaptformer option --variant: unknown value 'new'; choose from study, plain"),
    ("ssf", {"rank": 3}, "ssf has no option 'rank' \\(options: patch_embed\\)"),
    ("dora", {}, "unknown PEFT method 'dora'"),
])
def test_a_bad_option_value_is_one_clear_line(method, options, match):
    from peft_export.peft.options import parse_options

    with pytest.raises(UsageError, match=match) as info:
        parse_options(method, options)
    assert "\n" not in str(info.value)


def test_training_config_keys_are_the_cli_options():
    from peft_export.peft.options import cli_options
    from peft_export.train import resolve_config
    from peft_export.train.config import field_names

    assert {o.key for o in cli_options()} <= set(field_names())
    cfg = resolve_config({"peft": "adaptformer", "adapter_alpha": 0.5, "bottleneck": "8", "iterations": 1})
    assert (cfg.adapter_alpha, cfg.bottleneck) == ("0.5", 8)
    assert cfg.peft_config().options == {"alpha": "0.5", "bottleneck": 8}
    with pytest.raises(UsageError, match="adaptformer option --bottleneck"):
        resolve_config({"peft": "adaptformer", "bottleneck": 0, "iterations": 1})


def test_fact_scale_scales_the_update_and_merges():
    """The option added to show that one declaration gives CLI, config and validation: FacT's scale s."""
    from peft_export.peft.options import cli_options
    from peft_export.train import resolve_config

    assert {o.flag: o.fields for o in cli_options()}["--scale"] == {"fact": "scale"}
    assert resolve_config({"peft": "fact", "scale": "2", "iterations": 1}).peft_config().options == {"scale": 2.0}
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    outs = {}
    for scale in (1.0, 2.0):
        torch.manual_seed(0)
        model = build_sam("vit_tiny").eval()
        apply_peft(model, PeftConfig("fact", "all", {"rank": 4, "scale": scale}), "vit_tiny")
        qkv = model.image_encoder.blocks[0].attn.qkv
        with torch.no_grad():
            tokens = torch.randn(2, 5, qkv.dim, generator=torch.Generator().manual_seed(4))
            outs[scale] = qkv(tokens) - qkv.qkv_proj(tokens)
            ref = model.image_encoder(x)
            merged = merge_peft(copy.deepcopy(model))
            torch.testing.assert_close(merged.image_encoder(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2.0], 2 * outs[1.0])
    assert outs[1.0].abs().max() > 0


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
    from peft_export.loading import load_model

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
        apply_peft(model, PeftConfig(method, "late:1", OPTIONS_OF.get(method, {})), "vit_b")
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
    real = lora.LoRAQKV.delta_weight

    def broken(self):
        folds = real(self)
        folds["weight"].add = folds["weight"].add + 0.1 * torch.randn_like(folds["weight"].add)  # a wrong delta
        return folds

    monkeypatch.setattr(lora.LoRAQKV, "delta_weight", broken)
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
