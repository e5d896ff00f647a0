"""The image encoder as a list of steps, and the frozen-trunk cache.

With a late placement the encoder steps before the first adapted block are frozen: their output depends only
on the input image. :func:`encoder_steps` writes the encoder's forward pass as an explicit sequence (ViT:
patch embedding + position embedding, each block, the neck; TinyViT: patch embedding, every MBConv block and
patch-merging step of stage 0, every attention block and merge of the later stages, the neck), so the split can
fall anywhere — also inside a TinyViT stage. :func:`trunk_boundary` finds the first step that trains.

:class:`TrunkCache` keeps the trunk output per input (keyed by a hash of the input tensor's bytes, so a hit is
by construction the same input), in memory or on disk, within a size budget. Running the remaining steps on a
cached trunk output is the same computation as the full forward pass (the tests check losses agree).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peft_export.data.io import atomic_write
from peft_export.errors import first_line

log = logging.getLogger("peft_export")


@dataclass
class Step:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    modules: list[nn.Module]
    params: list[nn.Parameter] = field(default_factory=list)

    def trains(self) -> bool:
        """Whether this step has trainable parameters or stochastic layers (dropout)."""
        if any(p.requires_grad for p in self.params):
            return True
        for m in self.modules:
            if any(p.requires_grad for p in m.parameters()):
                return True
            if any(isinstance(sub, nn.Dropout) and sub.p > 0 for sub in m.modules()):
                return True
        return False


def encoder_steps(encoder: nn.Module) -> list[Step]:
    """The encoder's forward pass as a list of steps (applied in order, they equal ``encoder(x)``)."""
    from peft_export.models.tiny_vit import TinyViT  # lazy: pulls PIL, segment_anything, torchvision

    if isinstance(encoder, TinyViT):
        return _tinyvit_steps(encoder)
    return _vit_steps(encoder)


def _vit_steps(enc) -> list[Step]:
    def embed(x):
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        return x

    params = [enc.pos_embed] if isinstance(enc.pos_embed, nn.Parameter) else []
    steps = [Step("patch_embed", embed, [enc.patch_embed], params)]
    for i, blk in enumerate(enc.blocks):
        steps.append(Step(f"blocks.{i}", blk, [blk]))
    steps.append(Step("neck", lambda x: enc.neck(x.permute(0, 3, 1, 2)), [enc.neck]))
    return steps


def _tinyvit_steps(enc) -> list[Step]:
    steps = [Step("patch_embed", enc.patch_embed, [enc.patch_embed])]
    attn_index = 0
    for s, stage in enumerate(enc.layers):
        for b, blk in enumerate(stage.blocks):
            if s == 0:
                name = f"layers.0.blocks.{b}"
            else:
                name = f"blocks.{attn_index} (layers.{s}.blocks.{b})"
                attn_index += 1
            steps.append(Step(name, blk, [blk]))
        if stage.downsample is not None:
            steps.append(Step(f"layers.{s}.downsample", stage.downsample, [stage.downsample]))

    def neck(x):
        b, _, c = x.shape
        n = enc.embedding_size
        return enc.neck(x.view(b, n, n, c).permute(0, 3, 1, 2))

    steps.append(Step("neck", neck, [enc.neck]))
    return steps


def trunk_boundary(steps: list[Step]) -> int:
    """Index of the first step that trains (len(steps) when nothing in the encoder trains)."""
    for i, step in enumerate(steps):
        if step.trains():
            return i
    return len(steps)


def run_steps(steps: list[Step], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = step.fn(x)
    return x


def input_key(x: np.ndarray) -> str:
    arr = np.ascontiguousarray(x)
    h = hashlib.blake2b(arr.tobytes(), digest_size=16)
    h.update(str(arr.shape).encode())
    h.update(str(arr.dtype).encode())
    return h.hexdigest()


def trunk_fingerprint(steps: list[Step], boundary: int, extra: str = "") -> str:
    """Hash of the frozen trunk's weights and buffers (a disk cache is only reused for the same trunk)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(extra.encode())
    for step in steps[:boundary]:
        h.update(step.name.encode())
        for m in step.modules:
            for k, v in m.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        for p in step.params:
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TrunkCache:
    """Trunk outputs per input, in memory or on disk, bounded by ``budget_mb`` (entries beyond it are recomputed)."""

    def __init__(self, steps: list[Step], boundary: int, *, mode: str = "memory", budget_mb: float = 2048,
                 folder: str | Path | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(mode)
        self.steps = steps
        self.boundary = boundary
        self.mode = mode
        self.budget = int(budget_mb * 2**20)
        self.folder = Path(folder) if folder is not None else None
        if mode == "disk":
            if self.folder is None:
                raise ValueError("disk cache needs a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
        self._mem: dict[str, torch.Tensor] = {}
        # an entry is ``<key>.pt`` with its sha256 in ``<key>.sha256`` (written after it): without one, it is not used
        self._disk: set[str] = {p.stem for p in self.folder.glob("*.pt") if self._digest_path(p.stem).is_file()} \
            if self.folder else set()
        self.bytes = sum((self.folder / f"{k}.pt").stat().st_size for k in self._disk) if self.folder else 0
        self.hits = 0
        self.misses = 0
        self.full_warned = False

    @property
    def entries(self) -> int:
        return len(self._mem) if self.mode == "memory" else len(self._disk)

    def stats(self) -> dict:
        return {"mode": self.mode, "split_before": self.split_name, "hits": self.hits, "misses": self.misses,
                "entries": self.entries, "mb": round(self.bytes / 2**20, 1)}

    @property
    def split_name(self) -> str:
        return self.steps[self.boundary].name if self.boundary < len(self.steps) else "(whole encoder)"

    def _digest_path(self, key: str) -> Path:
        return self.folder / f"{key}.sha256"

    def _load_verified(self, key: str) -> torch.Tensor | None:
        """A disk entry, read only when its file matches the sha256 written with it; otherwise it is dropped (a
        warning) and recomputed: a changed or damaged entry never reaches training."""
        path = self.folder / f"{key}.pt"
        try:
            data = path.read_bytes()  # read once: hashed, then loaded from memory
            if hashlib.sha256(data).hexdigest() == self._digest_path(key).read_text().strip():
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            problem = "does not match its sha256"
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            problem = f"cannot be read ({first_line(exc)})"
        log.warning("trunk cache entry %s %s: recomputing it", path, problem)
        self._disk.discard(key)
        self.bytes -= path.stat().st_size if path.is_file() else 0
        for p in (self._digest_path(key), path):
            p.unlink(missing_ok=True)
        return None

    def _get(self, key: str, device) -> torch.Tensor | None:
        if self.mode == "memory":
            t = self._mem.get(key)
        else:
            t = self._load_verified(key) if key in self._disk else None
        return None if t is None else t.to(device, non_blocking=True)

    def _put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.bytes + size > self.budget:
            if not self.full_warned:
                log.warning("trunk cache full (%d entries, %.0f MB of --trunk-cache-mb %.0f): further inputs are "
                            "recomputed each time", self.entries, self.bytes / 2**20, self.budget / 2**20)
                self.full_warned = True
            return
        cpu = value.detach().to("cpu").clone()
        if self.mode == "memory":
            self._mem[key] = cpu
        else:
            buf = io.BytesIO()
            torch.save(cpu, buf)
            data = buf.getvalue()
            atomic_write(self.folder / f"{key}.pt", lambda tmp: tmp.write_bytes(data))
            atomic_write(self._digest_path(key), lambda tmp: tmp.write_text(hashlib.sha256(data).hexdigest() + "\n"))
            self._disk.add(key)
            size = len(data)  # the file, as a reopened cache counts it
        self.bytes += size

    def trunk(self, x: np.ndarray, device, tag: str = "fp32") -> torch.Tensor:
        """Trunk output for one input ``x`` (1, 3, S, S) numpy; computed (without autograd) on a miss.

        ``tag`` names the numeric context (fp32, or the autocast dtype): entries never cross contexts.
        """
        key = f"{input_key(x)}-{tag}"
        hit = self._get(key, device)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
            out = run_steps(self.steps[: self.boundary], t)
        self._put(key, out)
        return out

    def encode(self, xs: list[np.ndarray], device, tag: str = "fp32") -> torch.Tensor:
        """The image embedding of a batch: cached trunk per image, the remaining steps on the batch."""
        trunk = torch.cat([self.trunk(x[None] if x.ndim == 3 else x, device, tag) for x in xs], dim=0)
        return run_steps(self.steps[self.boundary:], trunk)
