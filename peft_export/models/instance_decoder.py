"""The instance-segmentation decoder (micro-sam's AIS decoder) on SAM's image embedding.

micro-sam trains a UNETR decoder from torch-em on the image embedding — without skip connections, with three
sigmoid outputs: foreground probability, normalised distance to the object centre, inverted normalised distance
to the object boundary (:mod:`peft_export.train.instance` makes those targets). A seeded watershed turns the
three maps into instances (:mod:`peft_export.runtime.instances`, torch-free).

The module tree here has torch-em's ``UNETR`` attribute names (``base``, ``decoder.blocks``/``samplers``,
``deconv1``..``deconvN``, ``deconv_out``, ``decoder_head``, ``out_conv``), so a micro-sam checkpoint's
``decoder_state`` loads as it is; for SAM models at 1024 input (16x from a 64x64 embedding) the computation is
torch-em's (``tests/test_instance.py`` compares both with the same weights). Generalised to any power-of-two
ratio between the model input size S and the embedding size h: ``levels = log2(S / h)`` upsampling steps (4 for
SAM ViT and MobileSAM, 2 for LiteMedSAM's 256 input), feature widths ``features * 2**i`` as torch-em derives
them, so the output is (B, 3, S, S) at the model input resolution, cropped and resized like SAM's masks.

One detail of torch-em kept on purpose: the decoder concatenates each upsampled map with the *middle*
channels of the matching ``deconv`` output (torch-em's crop also runs over the channel axis).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from peft_export.errors import CheckpointError

CHANNELS = ("foreground", "center_distance", "boundary_distance")
UPSAMPLERS = ("interpolate", "transpose")
DEFAULT_FEATURES = 64  # torch-em's initial_features


@dataclass(frozen=True)
class InstanceDecoderConfig:
    in_channels: int  # embedding channels C
    levels: int  # log2(S / h): upsampling steps from the embedding to the model input
    features: int = DEFAULT_FEATURES  # width of the finest level (torch-em's initial_features)
    upsampler: str = "interpolate"  # bilinear x2 + 1x1 conv (micro-sam's default) or 2x2 transposed conv
    out_channels: int = len(CHANNELS)

    @property
    def widths(self) -> list[int]:
        """Feature widths from the coarsest decoder level to the finest (torch-em: [512, 256, 128, 64])."""
        return [self.features * 2 ** i for i in range(self.levels)][::-1]

    def to_dict(self) -> dict:
        return asdict(self)


def config_for(sam, features: int | None = None, upsampler: str = "interpolate") -> InstanceDecoderConfig:
    """A fresh decoder's configuration for a segment_anything ``Sam`` (input size and embedding from the model)."""
    c = int(sam.prompt_encoder.embed_dim)
    h = int(sam.prompt_encoder.image_embedding_size[0])
    s = int(sam.image_encoder.img_size)
    return InstanceDecoderConfig(c, levels_for(s, h), features or DEFAULT_FEATURES, upsampler)


def levels_for(img_size: int, embedding_size: int) -> int:
    ratio = img_size / embedding_size
    levels = round(math.log2(ratio)) if ratio > 0 else 0
    if levels < 2 or 2 ** levels != ratio:
        raise CheckpointError(f"the instance decoder needs an input size that is 4x, 8x, 16x... the embedding size; "
                              f"this model has {img_size} and {embedding_size}")
    return levels


class _Upsample(nn.Module):
    """torch-em's ``Upsampler2d``: bilinear x2, then a 1x1 convolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


class _Transpose(nn.Module):
    """torch-em's ``SingleDeconv2DBlock``: a 2x2 transposed convolution with stride 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)

    def forward(self, x):
        return self.block(x)


class _Conv3(nn.Module):
    """torch-em's ``SingleConv2DBlock``: a 3x3 convolution."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.block(x)


class _ConvBlock(nn.Module):
    """torch-em's ``ConvBlock2d``: (InstanceNorm, 3x3 conv, ReLU) twice."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(nn.InstanceNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.InstanceNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.block(x)


def _upsampler(kind: str, cin: int, cout: int) -> nn.Module:
    return _Transpose(cin, cout) if kind == "transpose" else _Upsample(cin, cout)


class _Deconv(nn.Module):
    """torch-em's ``Deconv2DBlock``: upsample x2, 3x3 conv, BatchNorm, ReLU."""

    def __init__(self, kind: str, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(_upsampler(kind, cin, cout), _Conv3(cout, cout), nn.BatchNorm2d(cout),
                                   nn.ReLU(inplace=True))

    def forward(self, x):
        return self.block(x)


class _Decoder(nn.Module):
    """torch-em's ``Decoder``: per level, upsample and a conv block on [upsampled, middle channels of the skip]."""

    def __init__(self, kind: str, widths: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(_ConvBlock(a, b) for a, b in pairwise(widths))
        self.samplers = nn.ModuleList(_upsampler(kind, a, b) for a, b in pairwise(widths))

    def forward(self, x, skips: list[torch.Tensor]):
        for block, sampler, skip in zip(self.blocks, self.samplers, skips):
            x = sampler(x)
            x = block(torch.cat([x, _middle_channels(skip, x.shape[1])], dim=1))
        return x


def _middle_channels(x: torch.Tensor, n: int) -> torch.Tensor:
    start = (x.shape[1] - n) // 2
    return x[:, start: start + n]


class InstanceDecoder(nn.Module):
    """image embedding (B, C, h, w) -> (B, 3, S, S) sigmoid maps: foreground, centre distance, boundary distance."""

    def __init__(self, config: InstanceDecoderConfig):
        super().__init__()
        if config.upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}")
        self.config = config
        w, kind, n = config.widths, config.upsampler, config.levels
        chain = [config.in_channels, *w]  # deconv1: C -> w0, deconv2: w0 -> w1, ..., deconvN: w[N-2] -> w[N-1]
        for i in range(n):
            setattr(self, f"deconv{i + 1}", _Deconv(kind, chain[i], chain[i + 1]))
        self.base = _ConvBlock(config.in_channels, w[0])
        self.decoder = _Decoder(kind, w)
        self.deconv_out = _upsampler(kind, w[-1], w[-1])
        self.decoder_head = _ConvBlock(2 * w[-1], w[-1])
        self.out_conv = nn.Conv2d(w[-1], config.out_channels, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        z = embedding
        skips = []
        for i in range(self.config.levels):
            z = getattr(self, f"deconv{i + 1}")(z)
            skips.append(z)
        x = self.decoder(self.base(embedding), skips[:-1])
        x = self.decoder_head(torch.cat([self.deconv_out(x), skips[-1]], dim=1))
        return torch.sigmoid(self.out_conv(x))


def build_instance_decoder(sam, features: int | None = None) -> InstanceDecoder:
    return InstanceDecoder(config_for(sam, features))


# ---- decoder_state (micro-sam's checkpoint key, and ours) ---------------------------------------------------

def config_from_state(state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> InstanceDecoderConfig:
    """The architecture a ``decoder_state`` was saved from (torch-em UNETR key names); one line when it is not one."""
    try:
        base = state["base.block.1.weight"]
        out = state["out_conv.weight"]
    except KeyError:
        keys = ", ".join(list(state)[:3]) or "none"
        raise CheckpointError(f"{source}: decoder_state is not an instance decoder (UNETR) state: no base/out_conv "
                              f"weights (keys: {keys})") from None
    levels = sum(1 for i in range(1, 12) if f"deconv{i}.block.1.block.weight" in state)
    samplers = [k for k in state if k.startswith("decoder.samplers.")]
    kind = "transpose" if any(".block." in k for k in samplers) else "interpolate"
    if "deconv1.block.0.conv.weight" not in state and "deconv1.block.0.block.weight" not in state:
        raise CheckpointError(f"{source}: decoder_state has no deconv1 weights: a UNETR with skip connections or "
                              "another decoder, not micro-sam's instance decoder")
    return InstanceDecoderConfig(int(base.shape[1]), levels, int(out.shape[1]), kind, int(out.shape[0]))


def decoder_from_state(state: dict[str, torch.Tensor], sam, model_name: str, *,
                       source: str = "checkpoint") -> InstanceDecoder:
    """An :class:`InstanceDecoder` holding ``state``, checked against the model it decodes (one clear line)."""
    cfg = config_from_state(state, source=source)
    want = config_for(sam)
    if cfg.out_channels != len(CHANNELS):
        raise CheckpointError(f"{source}: decoder_state predicts {cfg.out_channels} channels; the instance decoder "
                              f"has {len(CHANNELS)} ({', '.join(CHANNELS)})")
    if cfg.in_channels != want.in_channels:
        raise CheckpointError(f"{source}: decoder_state takes {cfg.in_channels}-channel embeddings; {model_name}'s "
                              f"have {want.in_channels} channels (a decoder trained for another model)")
    if cfg.levels != want.levels:
        raise CheckpointError(f"{source}: decoder_state upsamples {2 ** cfg.levels}x; {model_name} needs "
                              f"{2 ** want.levels}x (embedding to input size): a decoder trained for another model")
    decoder = InstanceDecoder(cfg)
    own = decoder.state_dict()
    bad = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    extra = [k for k in state if k not in own]
    if bad or extra:
        k = (bad or extra)[0]
        if k not in state:
            what = f"missing {k}"
        elif k in own:
            what = f"{k}: file {tuple(state[k].shape)} vs decoder {tuple(own[k].shape)}"
        else:
            what = f"unexpected {k}"

        raise CheckpointError(f"{source}: decoder_state does not fit the instance decoder ({what})")
    decoder.load_state_dict(state)
    return decoder.eval()
