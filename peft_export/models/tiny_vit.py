"""TinyViT image encoder for SAM-family models (MobileSAM ``vit_t``, LiteMedSAM).

Written for this project; its module tree follows the state-dict key layout that the published MobileSAM
and LiteMedSAM checkpoints use (``patch_embed.seq.{0,2}.{c,bn}``, ``layers.{s}.blocks.{b}.attn.qkv``,
``layers.{s}.blocks.{b}.mlp.fc1``, ``layers.{s}.downsample.conv{1,2,3}``, ``neck.{0..3}``), so those
checkpoints load strictly.

Structure: a convolutional patch embedding, stage 0 of MBConv blocks, then stages of attention blocks
(windowed attention with per-head relative position biases, a depth-wise "local" conv and an MLP), each stage
joined by a patch-merging conv block, and SAM's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d).

Note on ``attn.qkv``: unlike SAM's ViT, TinyViT's fused qkv output is laid out *per head*
(``[q_h, k_h, v_h]`` for each head ``h``); :func:`qkv_index` gives the rows of q, k and v.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


@dataclass(frozen=True)
class TinyViTConfig:
    img_size: int = 1024
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    # "conv3x3": two 3x3 stride-2 conv+BN (MobileSAM, /4); "conv1x1": two 1x1 stride-1 conv+BN (LiteMedSAM)
    patch_embed: str = "conv3x3"
    out_chans: int = 256
    extra: dict = field(default_factory=dict)

    @property
    def patch_stride(self) -> int:
        return 4 if self.patch_embed == "conv3x3" else 1

    def stage_resolutions(self) -> list[int]:
        """Token grid side of each stage: /2 per merge, except the last merge which keeps the size."""
        res = [self.img_size // self.patch_stride]
        n = len(self.depths)
        for i in range(n - 1):
            stride = 1 if i == n - 2 else 2
            res.append((res[-1] + stride - 1) // stride)
        return res

    @property
    def embedding_size(self) -> int:
        return self.stage_resolutions()[-1]


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``c.*`` and ``bn.*``)."""

    def __init__(self, cin, cout, ks=1, stride=1, pad=0, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, kind: str):
        super().__init__()
        half = embed_dim // 2
        if kind == "conv3x3":
            layers = [Conv2dBN(in_chans, half, 3, 2, 1), nn.GELU(), Conv2dBN(half, embed_dim, 3, 2, 1)]
        elif kind == "conv1x1":
            layers = [Conv2dBN(in_chans, half, 1, 1, 0), nn.GELU(), Conv2dBN(half, embed_dim, 1, 1, 0)]
        else:
            raise ValueError(f"unknown TinyViT patch embedding {kind!r}")
        self.seq = nn.Sequential(*layers)

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x):
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x):
        if x.ndim == 3:  # (B, L, C) tokens -> (B, C, H, W)
            b = x.shape[0]
            x = x.view(b, self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Multi-head attention over one window with learned per-head relative position biases."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def forward(self, x):  # (B, N, C)
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.key_dim, dim=3)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


def qkv_index(num_heads: int, dim: int) -> dict[str, torch.Tensor]:
    """Row indices of q, k and v inside TinyViT's per-head fused ``qkv`` projection."""
    kd = dim // num_heads
    out = {}
    for j, name in enumerate("qkv"):
        rows = [h * 3 * kd + j * kd + i for h in range(num_heads) for i in range(kd)]
        out[name] = torch.tensor(rows, dtype=torch.long, device="cpu")
    return out


class TinyViTBlock(nn.Module):
    def __init__(self, dim, resolution, num_heads, window, mlp_ratio, local_conv_size):
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.window_size = window
        self.num_heads = num_heads
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x):
        h = w = self.resolution
        b, length, c = x.shape
        ws = self.window_size
        shortcut = x
        if h == ws and w == ws:
            x = self.attn(x)
        else:
            x = x.view(b, h, w, c)
            pad_b = (ws - h % ws) % ws
            pad_r = (ws - w % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            x = self.attn(x)
            x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            if pad_b or pad_r:
                x = x[:, :h, :w].contiguous()
            x = x.view(b, length, c)
        x = shortcut + x
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.local_conv(x)
        x = x.view(b, c, length).transpose(1, 2)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim, depth, expand_ratio, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionStage(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window, mlp_ratio, local_conv_size, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            [TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio, local_conv_size) for _ in range(depth)]
        )
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck: (B, 3, S, S) -> (B, out_chans, S', S')."""

    def __init__(self, config: TinyViTConfig):
        super().__init__()
        cfg = config
        self.config = cfg
        self.img_size = cfg.img_size
        dims, n = cfg.embed_dims, len(cfg.depths)
        res = cfg.stage_resolutions()
        self.patch_embed = PatchEmbed(3, dims[0], cfg.patch_embed)
        self.layers = nn.ModuleList()
        for i in range(n):
            down = None
            if i < n - 1:
                down = PatchMerging(res[i], dims[i], dims[i + 1], stride=1 if i == n - 2 else 2)
            if i == 0:
                stage = ConvStage(dims[0], cfg.depths[0], cfg.mbconv_expand_ratio, down)
            else:
                stage = AttentionStage(
                    dims[i], res[i], cfg.depths[i], cfg.num_heads[i], cfg.window_sizes[i],
                    cfg.mlp_ratio, cfg.local_conv_size, down,
                )
            self.layers.append(stage)
        self.embedding_size = res[-1]
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )
        self.apply(_init_weights)

    @property
    def blocks(self) -> list[TinyViTBlock]:
        """The attention blocks in order (what PEFT placements index)."""
        return [blk for stage in self.layers[1:] for blk in stage.blocks]

    def forward(self, x):
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        b, _, c = x.shape
        s = self.embedding_size
        x = x.view(b, s, s, c).permute(0, 3, 1, 2)
        return self.neck(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
