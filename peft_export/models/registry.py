"""The model zoo: one registry of SAM-family models, one function to build any of them.

Every entry is a segment_anything ``Sam`` (image encoder + prompt encoder + mask decoder), so everything
downstream (PEFT, training, export) works on one module tree. Preprocessing is a property of the entry:
SAM's models normalise with SAM's pixel mean/std, LiteMedSAM scales each image to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from peft_export.errors import UsageError
from peft_export.imaging import SAM_PIXEL_MEAN, SAM_PIXEL_STD, PreprocessSpec
from peft_export.models.checkpoint import load_state_dict_into, normalize_state_dict, read_checkpoint
from peft_export.models.tiny_vit import TinyViT, TinyViTConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "vit" (segment_anything ImageEncoderViT) or "tinyvit"
    img_size: int
    preprocess_mode: str  # "sam" or "minmax"
    description: str
    builder: Callable[[], Sam]
    test_only: bool = False
    # whether SAM's three multimask outputs were trained (LiteMedSAM trained only the single-mask output)
    multimask: bool = True
    # segment_anything's own registry key for the same architecture (the "vanilla builder")
    segment_anything_key: str | None = None
    # width of a fresh instance decoder's finest level (models/instance_decoder.py): torch-em's 64 for SAM's models
    # (micro-sam's checkpoints); 32 for LiteMedSAM, whose decoder runs 2 levels at 256x256 (a third of the CPU time)
    instance_features: int = 64

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec(img_size=self.img_size, mode=self.preprocess_mode)

    def build(self) -> Sam:
        model = self.builder()
        model.eval()
        return model


def _decoder(prompt_dim: int, embed_size: int, img_size: int, mlp_dim: int, heads: int) -> dict:
    return dict(
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(embed_size, embed_size),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=mlp_dim, num_heads=heads),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=prompt_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def _build_vit(embed_dim, depth, heads, global_attn, *, img_size=1024, window=14, prompt_dim=256,
               mlp_dim=2048, dec_heads=8) -> Sam:
    patch = 16
    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=patch,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(global_attn),
        window_size=window,
        out_chans=prompt_dim,
    )
    return Sam(image_encoder=encoder, **_decoder(prompt_dim, img_size // patch, img_size, mlp_dim, dec_heads))


def _build_tinyvit(cfg: TinyViTConfig, *, prompt_dim=256, mlp_dim=2048, dec_heads=8) -> Sam:
    encoder = TinyViT(cfg)
    return Sam(image_encoder=encoder, **_decoder(prompt_dim, cfg.embedding_size, cfg.img_size, mlp_dim, dec_heads))


MOBILE_SAM = TinyViTConfig(img_size=1024, patch_embed="conv3x3")
LITE_MEDSAM = TinyViTConfig(img_size=256, patch_embed="conv1x1")
TINY_TINYVIT = TinyViTConfig(
    img_size=64, embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
    window_sizes=(7, 7, 7, 7), patch_embed="conv1x1", out_chans=32,
)

_SPECS = [
    ModelSpec("vit_b", "vit", 1024, "sam", "SAM ViT-B (91M), segment_anything architecture",
              partial(_build_vit, 768, 12, 12, (2, 5, 8, 11)), segment_anything_key="vit_b"),
    ModelSpec("vit_l", "vit", 1024, "sam", "SAM ViT-L (308M), segment_anything architecture",
              partial(_build_vit, 1024, 24, 16, (5, 11, 17, 23)), segment_anything_key="vit_l"),
    ModelSpec("vit_h", "vit", 1024, "sam", "SAM ViT-H (636M), segment_anything architecture",
              partial(_build_vit, 1280, 32, 16, (7, 15, 23, 31)), segment_anything_key="vit_h"),
    ModelSpec("vit_t", "tinyvit", 1024, "sam", "MobileSAM: TinyViT-5M encoder, 1024 input",
              partial(_build_tinyvit, MOBILE_SAM)),
    ModelSpec("lite_medsam", "tinyvit", 256, "minmax",
              "LiteMedSAM: TinyViT-5M encoder, 256 input, [0,1] min-max preprocessing (real weights bundled)",
              partial(_build_tinyvit, LITE_MEDSAM), multimask=False, instance_features=32),
    ModelSpec("vit_tiny", "vit", 256, "sam", "tiny SAM ViT (embed 96, depth 4) for fast tests; random weights",
              partial(_build_vit, 96, 4, 3, (1, 3), img_size=256, window=8, prompt_dim=64, mlp_dim=128,
                      dec_heads=4), test_only=True, instance_features=8),
    ModelSpec("tinyvit_tiny", "tinyvit", 64, "minmax", "tiny TinyViT (4 stages, 4 attention blocks) for fast tests",
              partial(_build_tinyvit, TINY_TINYVIT, prompt_dim=32, mlp_dim=64, dec_heads=2), test_only=True,
              instance_features=8),
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def build_sam(name: str, checkpoint=None, *, device: str | torch.device = "cpu", strict: bool = True) -> Sam:
    """Build zoo model ``name`` (eval mode, fp32) and optionally load plain weights from ``checkpoint``.

    ``checkpoint`` is a path or an already-loaded state dict. PEFT checkpoints (this project's own, or
    micro-sam's with ``--from micro-sam``) are loaded with :func:`peft_export.models.load_model` instead,
    which also re-applies the adapters.
    """
    spec = get_spec(name)
    model = spec.build()
    if checkpoint is not None:
        if isinstance(checkpoint, dict):
            state = normalize_state_dict(checkpoint, source="state dict")
        else:
            state = read_checkpoint(checkpoint).state_dict
        load_state_dict_into(model, state, name, strict=strict)
    return model.to(device)


def encoder_blocks(model: Sam) -> list[torch.nn.Module]:
    """The image-encoder blocks that PEFT placements index (ViT blocks or TinyViT attention blocks)."""
    enc = model.image_encoder
    return list(enc.blocks)


def model_family(model: Sam) -> str:
    return "tinyvit" if isinstance(model.image_encoder, TinyViT) else "vit"


def embedding_shape(model: Sam) -> tuple[int, int, int]:
    """(channels, h, w) of the image embedding."""
    pe = model.prompt_encoder
    h, w = pe.image_embedding_size
    return pe.embed_dim, h, w
