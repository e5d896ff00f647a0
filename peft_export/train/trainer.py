"""The training loop: PEFT model, interactive recipe, validation, checkpoints, resume, DDP, AMP.

    from peft_export.train import TrainConfig, finetune
    summary = finetune(resolve_config(cli_values={"peft": "lora", "blocks": "late:4", "epochs": 5}), "runs/a")

RUN_DIR holds ``config.yaml`` (resolved options), ``metrics.jsonl`` (one record per epoch; epoch 0 is the
model before training), ``latest.pt`` and ``best.pt`` (this project's checkpoint format, written atomically,
recording model, PEFT method/options/placement, package versions, data, and the full training state).

Design notes
- Randomness: data order, crops, augmentation, object choice and prompt points come from counter-based
  generators (:func:`peft_export.train.data.rng_for`); torch's generator (dropout, adapter init) is saved in
  every checkpoint. ``--resume`` therefore continues exactly where the run stopped, also mid-epoch.
- BatchNorm layers (TinyViT) stay in eval mode: their running statistics are part of the pretrained model;
  batch statistics of 1-2 images would change a frozen trunk's output.
- Ctrl-C: the step in progress finishes, ``latest.pt`` is written at that position, and the command exits 130;
  a second Ctrl-C aborts at once. A KeyboardInterrupt raised inside a step saves the last completed step.
- Non-finite loss: training stops before the update with a clear message; checkpoints already written stay.
- Distributed: under ``torchrun`` (WORLD_SIZE > 1) the step module is wrapped in DistributedDataParallel
  (gloo on CPU, nccl on CUDA). Every global batch is split over the ranks; each image's loss is weighted by
  1 / global batch (the reported loss is the sum over ranks) and the backward pass is scaled by the number of
  ranks, because DDP averages gradients: 1 and N processes compute the same gradient. Rank 0 validates and
  writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peft_export.errors import CheckpointError, PeftExportError, UsageError
from peft_export.train.config import TrainConfig, to_yaml
from peft_export.train.data import STREAM_IMAGE, TrainData, rng_for
from peft_export.train.recipe import RecipeSettings, image_loss, prompt_kind
from peft_export.train.trunk import TrunkCache, encoder_steps, trunk_boundary

log = logging.getLogger("peft_export")

RUN_FILES = ("config.yaml", "metrics.jsonl", "latest.pt", "best.pt", "summary.json")
CACHE_DIR = "trunk_cache"


class TrainingError(PeftExportError):
    """Training cannot go on (e.g. the loss became NaN)."""


class TrainingInterrupted(PeftExportError):
    """Stopped by Ctrl-C; a resumable checkpoint was written."""

    exit_code = 130


class Events:
    """What the training loop reports (the CLI renders it; the default does nothing)."""

    def message(self, text: str) -> None: ...

    def start(self, total: int, done: int, info: dict) -> None: ...

    def step(self, done: int, loss: float, speed: float) -> None: ...

    def phase(self, text: str) -> None: ...

    def validation(self, record: dict) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _broadcast(obj: Any, d: Dist) -> Any:
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------
# helpers
def resolve_device(device: str, d: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but PyTorch sees no CUDA GPU")
        return torch.device("cuda", d.local_rank)
    if device != "cpu":
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"  # the study: fp16 autocast + GradScaler on CUDA
    if precision in ("fp16", "bf16") and device.type != "cuda":
        raise UsageError(f"--precision {precision} needs a CUDA device (CPU training runs in fp32)")
    return precision


def set_train_mode(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from peft_export._memory import peak_rss_mib  # VmHWM: ru_maxrss would include a launching parent's size

    try:
        return peak_rss_mib()
    except (ImportError, AttributeError, OSError):
        return float("nan")


def _finite_or_none(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    if resume:
        if not (run_dir / "latest.pt").is_file():
            raise UsageError(f"nothing to resume: {run_dir / 'latest.pt'} does not exist")
        return
    if run_dir.is_file():
        raise UsageError(f"run folder {run_dir} is a file")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise UsageError(f"run folder {run_dir} already exists; pass --resume to continue it or --force to "
                             "start over (its checkpoints and metrics are replaced)")
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        cache = run_dir / CACHE_DIR
        if cache.is_dir():
            for p in cache.glob("*.pt"):
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def load_datasets(cfg: TrainConfig):
    """Training and validation samples (None when there is no validation set)."""
    from peft_export.data.dataset import SAMPLE_PREFIX, load_samples

    train = load_samples(cfg.data, "train")
    if cfg.val is not None:
        val = load_samples(cfg.val, "val")
    elif str(cfg.data).startswith(SAMPLE_PREFIX) or (Path(cfg.data) / "val").is_dir():
        val = load_samples(cfg.data, "val")
    else:
        val = None
    return train, val


class _Interrupt:
    """Turns the first SIGINT into a flag checked between steps (second SIGINT: KeyboardInterrupt)."""

    def __init__(self, events: Events):
        self.flag = False
        self.events = events
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        self.events.message("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again aborts now)")

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False


class StepModule(nn.Module):
    """One training step's forward pass (encoder + interactive decoding) -> mean image loss.

    Wrapped in DistributedDataParallel when distributed; the loss of each image is weighted by
    ``1 / global_batch``, so the sum over ranks is the single-process mean (the trainer scales the backward
    pass by the world size, since DDP averages gradients over ranks).
    """

    def __init__(self, model: nn.Module, settings: RecipeSettings):
        super().__init__()
        from peft_export.models.prompt_decoder import PromptDecoder

        self.model = model
        self.settings = settings
        self._aux = {"decoder": PromptDecoder(model), "cache": None}  # not registered: shares model params

    def set_cache(self, cache: TrunkCache | None) -> None:
        self._aux["cache"] = cache

    def embed(self, xs: list[np.ndarray], device: torch.device) -> torch.Tensor:
        cache = self._aux["cache"]
        if cache is not None:
            return cache.encode(xs, device, tag=_amp_tag(device))
        x = torch.from_numpy(np.stack(xs)).to(device)
        return self.model.image_encoder(x)

    def forward(self, views, kind: str, rngs, weight: float):
        device = next(self.model.parameters()).device
        emb = self.embed([v.tensor for v in views], device)
        decoder = self._aux["decoder"]
        total = emb.new_zeros((), dtype=torch.float32)
        stats = [0.0, 0.0, 0]
        for i, (view, rng) in enumerate(zip(views, rngs)):
            res = image_loss(decoder, emb[i: i + 1], view, kind, self.settings, rng)
            total = total + res.loss * weight
            stats[0] += res.mask_loss * weight
            stats[1] += res.iou_loss * weight
            stats[2] += res.objects
        return total, stats


def _amp_tag(device: torch.device) -> str:
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return f"amp-{torch.get_autocast_dtype('cuda')}"
    return "fp32"


class _ValBackend:
    """TorchBackend for validation that reuses the trunk cache for the encoder (same numbers, less work)."""

    def __init__(self, model, spec, device, cache: TrunkCache | None):
        from peft_export.models.torch_backend import TorchBackend

        self._inner = TorchBackend(model, spec.preprocess, device, multimask=spec.multimask)
        self.name = "torch"
        self.preprocess = spec.preprocess
        self.multimask = spec.multimask
        self.cache = cache
        self.device = torch.device(device)

    def embed(self, x: np.ndarray) -> np.ndarray:
        if self.cache is None:
            return self._inner.embed(x)
        with torch.no_grad():
            return self.cache.encode([x[0]], self.device, tag="fp32").float().cpu().numpy()

    def decode(self, embedding, coords, labels, mask_input=None):
        return self._inner.decode(embedding, coords, labels, mask_input)


# ---------------------------------------------------------------------------------------------------------
@dataclass
class Position:
    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # next step inside the epoch
    iteration: int = 0  # completed optimisation steps


@dataclass
class EpochAcc:
    loss: float = 0.0
    mask_loss: float = 0.0
    iou_loss: float = 0.0
    steps: int = 0
    objects: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainState:
    pos: Position = field(default_factory=Position)
    acc: EpochAcc = field(default_factory=EpochAcc)
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    stopped: str = ""
    train_seconds: float = 0.0


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 events: Events | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self.events = events or Events()
        self.dist = Dist()
        self.state = TrainState()
        self.cache: TrunkCache | None = None

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        from peft_export.models.registry import get_spec
        from peft_export.peft import PeftConfig, apply_peft, count_parameters

        cfg = self.cfg
        dev_kind = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) \
            else "cpu"
        self.dist = init_distributed(dev_kind)
        if not self.dist.main:
            self.events = Events()  # only rank 0 talks
        self.device = resolve_device(cfg.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.batch_size % self.dist.world:
            raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                             f"({self.dist.world})")

        # data first: bad data fails before any model work or file is written
        train_samples, val_samples = load_datasets(cfg)
        ckpt = None
        if self.resume:
            from peft_export.models.checkpoint import read_checkpoint

            ckpt = read_checkpoint(self.run_dir / "latest.pt")
            if "training" not in ckpt.raw:
                raise CheckpointError(f"{self.run_dir / 'latest.pt'} is not a finetune checkpoint")
        model_name = self._model_name()
        self.spec = get_spec(model_name)
        self.data = TrainData(train_samples, self.spec.preprocess, patch_size=cfg.patch_size,
                              sampling=cfg.patch_sampling, augment=cfg.augment,
                              min_object_area=cfg.min_object_area)
        self.val_samples = val_samples
        if ckpt is not None:
            saved_fp = (ckpt.raw.get("data") or {}).get("train", {}).get("fingerprint")
            if saved_fp and saved_fp != self.data.describe()["fingerprint"]:
                raise UsageError("the training data changed since this run started; resume needs the same data "
                                 "(start a new run with --force or another --out)")

        # model + PEFT (seeded: adapter initialisation is reproducible)
        torch.manual_seed(cfg.seed)
        if ckpt is None:
            self.model, base_source = self._base_model(model_name)
            self.peft_config = PeftConfig(cfg.peft, cfg.blocks, self._peft_options())
            apply_peft(self.model, self.peft_config, model_name)
        else:
            from peft_export.models.loading import load_model
            from peft_export.peft import peft_state

            loaded = load_model(str(self.run_dir / "latest.pt"))
            self.model = loaded.model
            self.peft_config = peft_state(self.model).config
            base_source = ckpt.raw["training"].get("base_source", "")
        self.base_source = base_source
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.counts = count_parameters(self.model)

        # multimask: the study's 3-mask first point prompt only where those outputs are trained
        mm = cfg.multimask
        multimask = self.spec.multimask if mm == "auto" else mm == "on"
        self.settings = RecipeSettings(cfg.objects_per_image, cfg.sub_iterations, cfg.mask_prob, multimask)

        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.metric_mode = "max" if val_samples else "min"
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=self.metric_mode, factor=cfg.scheduler_factor, patience=cfg.scheduler_patience)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

        self.step_module = StepModule(self.model, self.settings)
        self._setup_cache()
        self.ddp = None
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.step_module, device_ids=None, broadcast_buffers=False)

        # schedule
        self.steps_per_epoch = len(self.data.epoch_order(cfg.seed, 0, cfg.samples_per_epoch, cfg.batch_size)) \
            // cfg.batch_size
        self.total_iterations = cfg.iterations or cfg.epochs * self.steps_per_epoch
        self.n_epochs = -(-self.total_iterations // self.steps_per_epoch)

        if ckpt is not None:
            self._restore(ckpt)
        elif self.dist.main:
            prepare_run_dir(self.run_dir, resume=False, force=self.force)
        if self.dist.main:
            self._write_config()
        if self.dist.active:
            import torch.distributed as dist

            dist.barrier()

    def _model_name(self) -> str:
        from peft_export.models.checkpoint import read_checkpoint
        from peft_export.models.registry import MODELS

        if self.cfg.model in MODELS:
            return self.cfg.model
        p = Path(self.cfg.model)
        if not p.exists():
            raise UsageError(f"{self.cfg.model!r} is neither a model name ({', '.join(MODELS)}) nor an existing file")
        name = read_checkpoint(p).model
        if name is None:
            raise UsageError(f"{p}: the file does not record its model; use --model NAME --checkpoint {p}")
        return name

    def _base_model(self, name: str):
        from peft_export.models.loading import load_model
        from peft_export.models.registry import get_spec

        spec = get_spec(name)
        model_arg = self.cfg.model
        if spec.test_only and self.cfg.checkpoint is None and model_arg in (name,):
            self.events.message(f"{name} is a test model: training from random weights")
            return spec.build(), "random"
        loaded = load_model(model_arg, self.cfg.checkpoint)
        if loaded.peft and not (loaded.checkpoint and loaded.checkpoint.merged):
            raise UsageError(f"{loaded.source} already holds a PEFT method ({loaded.peft.get('method')}); merge it "
                             "first (peft-export merge) or resume its run with --resume")
        return loaded.model, loaded.source

    def _peft_options(self) -> dict:
        from peft_export.peft import METHODS

        cfg = self.cfg
        if cfg.peft not in METHODS:
            raise UsageError(f"unknown PEFT method {cfg.peft!r}; choose one of: {', '.join(METHODS)}")
        allowed = set(METHODS[cfg.peft].defaults)
        key = {"adapter_alpha": "alpha", "ssf_patch_embed": "patch_embed"}
        opts = {}
        for name, value in cfg.peft_options().items():
            if value is None:
                continue
            k = key.get(name, name)
            if name == "alpha" and cfg.peft != "lora":
                k = "_not_" + name
            if name == "adapter_alpha" and cfg.peft != "adaptformer":
                k = "_not_" + name
            if k not in allowed:
                self.events.message(f"warning: {name.replace('_', '-')} does not apply to {cfg.peft}; ignored")
                continue
            if name == "targets" and isinstance(value, str):
                value = [t.strip() for t in value.split(",") if t.strip()]
            opts[k] = value
        METHODS[cfg.peft](**opts)  # validate now: one clear line for bad values
        return opts

    def _setup_cache(self) -> None:
        cfg = self.cfg
        steps = encoder_steps(self.model.image_encoder)
        boundary = trunk_boundary(steps)
        self.cache_note = ""
        mode = cfg.trunk_cache
        if mode == "off":
            self.cache_note = "trunk cache off (--trunk-cache off)"
            return
        if boundary == 0:
            self.cache_note = ("trunk cache off: the first encoder step trains "
                               f"({self.peft_config.method} on {self.peft_config.placement})")
            if mode != "auto":
                self.events.message(self.cache_note)
            return
        if not self.data.repeating:
            self.cache_note = f"trunk cache off: {self.data.non_repeating_reason}, so inputs do not repeat"
            self.events.message(self.cache_note)
            return
        if mode == "auto":
            mode = "memory"
        folder = self.run_dir / CACHE_DIR / f"rank{self.dist.rank}" if mode == "disk" else None
        if folder is not None:
            from peft_export.train.trunk import trunk_fingerprint

            folder = folder / trunk_fingerprint(steps, boundary, self.spec.name)
        self.cache = TrunkCache(steps, boundary, mode=mode, budget_mb=cfg.trunk_cache_mb, folder=folder)
        self.step_module.set_cache(self.cache)
        self.cache_note = (f"trunk cache on ({mode}): encoder steps before {self.cache.split_name} are frozen; "
                           "their output is computed once per input")

    # -- checkpoints -------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        from peft_export.data.io import atomic_write

        text = ("# peft-export finetune: resolved configuration of this run\n"
                "# repeat it with: peft-export finetune --config config.yaml --out NEW_RUN_DIR\n" + to_yaml(self.cfg))
        atomic_write(self.run_dir / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _write_metrics(self) -> None:
        from peft_export.data.io import atomic_write

        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        atomic_write(self.run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))

    def _rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _checkpoint_extra(self, *, interrupted: bool = False, rng: dict | None = None) -> dict:
        s = self.state
        rng = rng or self._rng_state()
        val_desc = None
        if self.val_samples:
            from peft_export.train.data import data_fingerprint

            val_desc = {"source": self.cfg.val or self.cfg.data, "images": len(self.val_samples),
                        "fingerprint": data_fingerprint(self.val_samples)}
        return {
            "training": {
                "config": self.cfg.to_dict(),
                "base_source": self.base_source,
                "position": dict(s.pos.__dict__),
                "epoch_acc": s.acc.to_dict(),
                "best_metric": s.best_metric,
                "best_epoch": s.best_epoch,
                "bad_epochs": s.bad_epochs,
                "history": s.history,
                "stopped": s.stopped,
                "train_seconds": s.train_seconds,
                "interrupted": interrupted,
                "total_iterations": self.total_iterations,
                "world_size": self.dist.world,
            },
            "iteration": s.pos.iteration,
            "epoch": s.pos.epoch,
            "best_metric": s.best_metric,
            "data": {"train": {"source": self.cfg.data, **self.data.describe()}, "val": val_desc},
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler is not None else {},
            "rng_state": rng,
        }

    def _save(self, name: str, *, interrupted: bool = False, rng: dict | None = None) -> Path | None:
        if not self.dist.main:
            return None
        from peft_export.models.checkpoint import save_checkpoint

        extra = self._checkpoint_extra(interrupted=interrupted, rng=rng)
        return save_checkpoint(self.run_dir / name, model_name=self.spec.name, state_dict=self.model.state_dict(),
                               peft=self.peft_config.to_dict(), extra=extra)

    def _restore(self, ckpt) -> None:
        t = ckpt.raw["training"]
        s = self.state
        s.pos = Position(**t["position"])
        s.acc = EpochAcc(**t["epoch_acc"])
        s.best_metric, s.best_epoch = t.get("best_metric"), t.get("best_epoch")
        s.bad_epochs = int(t.get("bad_epochs", 0))
        s.history = list(t.get("history") or [])
        s.train_seconds = float(t.get("train_seconds", 0.0))
        self.optimizer.load_state_dict(ckpt.raw["optimizer_state"])
        self.scheduler.load_state_dict(ckpt.raw["scheduler_state"])
        if self.scaler is not None and ckpt.raw.get("scaler_state"):
            self.scaler.load_state_dict(ckpt.raw["scaler_state"])
        rng = ckpt.raw.get("rng_state") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if int(t.get("world_size", 1)) != self.dist.world:
            self.events.message(f"note: resumed with {self.dist.world} process(es); the run started with "
                                f"{t.get('world_size', 1)} (same data per step, results agree within rounding)")

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> dict | None:
        """Box/point mean IoU and mSA on the validation set (rank 0; the same code as ``peft-export evaluate``)."""
        from peft_export.runtime.evaluate import evaluate

        record = None
        if self.dist.main and self.val_samples:
            t0 = time.perf_counter()
            backend = _ValBackend(self.model, self.spec, self.device, self.cache)
            try:
                results = evaluate(backend, self.val_samples, self.cfg.val_prompts)
            finally:
                set_train_mode(self.model)
            vals = [results[k]["mean_iou"] for k in self.cfg.val_prompts]
            metric = results[self.cfg.val_metric]["mean_iou"] if self.cfg.val_metric != "mean" else \
                float(np.mean(vals))
            record = {"val": results, "val_metric": metric, "val_seconds": round(time.perf_counter() - t0, 2)}
        return _broadcast(record, self.dist) if self.val_samples else None

    # -- the loop ---------------------------------------------------------------------------------------
    def _train_step(self, views, kind, rngs) -> tuple[float, float, float, int]:
        cfg = self.cfg
        module = self.ddp if self.ddp is not None else self.step_module
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16) \
            if self.precision in ("fp16", "bf16") else contextlib.nullcontext()
        with amp:
            loss, stats = module(views, kind, rngs, 1.0 / cfg.batch_size)
        # one agreed value on all ranks (a NaN anywhere stops everyone before the update)
        g_loss, g_mask, g_iou, g_obj = _all_reduce_sum([float(loss.detach()), *stats], self.dist)
        if not math.isfinite(g_loss):
            raise _NonFinite(g_loss)
        self._in_update = True
        if self.dist.active:
            # DDP averages gradients over the ranks; each rank's loss holds its images weighted by
            # 1 / global batch, so scaling by the world size makes the average the single-process gradient
            loss = loss * self.dist.world
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self._in_update = False
        return g_loss, g_mask, g_iou, int(g_obj)

    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        t_start = time.perf_counter()
        self._in_update = False
        set_train_mode(self.model)
        info = {"model": self.spec.name, "peft": self.peft_config.to_dict(), "parameters": self.counts,
                "device": str(self.device), "precision": self.precision, "world_size": self.dist.world,
                "train_patches": len(self.data), "val_images": len(self.val_samples or []),
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.n_epochs, "trunk_cache": self.cache_note,
                "multimask": self.settings.multimask}
        if self.dist.main:
            self.events.start(self.total_iterations, s.pos.iteration, info)
        if not self.val_samples and self.dist.main and not self.resume:
            self.events.message("warning: no validation set (--val DIR, or train/ + val/ sub-folders): best.pt "
                                "follows the training loss")
        if cfg.val_before and self.val_samples and not s.history and s.pos.iteration == 0:
            self.events.phase("validating (before training)")
            rec = self.validate()
            rec = {"epoch": 0, "iteration": 0, "lr": cfg.lr, **rec}
            s.history.append(rec)
            if self.dist.main:
                self.events.validation(rec)
                self._write_metrics()

        with _Interrupt(self.events) as intr:
            try:
                self._loop(intr)
            except _NonFinite as exc:
                last = self.run_dir / "latest.pt"
                kept = (f"the last good checkpoint is {last} (epoch {s.history[-1]['epoch']})"
                        if last.is_file() and s.history and s.history[-1].get("epoch", 0) > 0
                        else "no checkpoint had been written yet")
                raise TrainingError(
                    f"the loss became {exc.value} at iteration {s.pos.iteration + 1} (epoch {s.pos.epoch + 1}); "
                    f"training stopped, {kept}. Lower --lr (now {cfg.lr:g}) or check the data") from None
        summary = self.summary(time.perf_counter() - t_start)
        if self.dist.main:
            from peft_export.data.io import atomic_write

            atomic_write(self.run_dir / "summary.json",
                         lambda tmp: tmp.write_text(json.dumps(_jsonable(summary), indent=2), encoding="utf-8"))
        return summary

    def _loop(self, intr: _Interrupt) -> None:
        cfg, s = self.cfg, self.state
        bsz, world, rank = cfg.batch_size, self.dist.world, self.dist.rank
        while s.pos.epoch < self.n_epochs and s.pos.iteration < self.total_iterations and not s.stopped:
            epoch = s.pos.epoch
            order = self.data.epoch_order(cfg.seed, epoch, cfg.samples_per_epoch, bsz)
            self.events.phase(f"epoch {epoch + 1}/{self.n_epochs}")
            while s.pos.step < self.steps_per_epoch and s.pos.iteration < self.total_iterations:
                step = s.pos.step
                t0 = time.perf_counter()
                slots = list(range(rank, bsz, world))
                step_rng = self._rng_state()  # what a resume of this step must start from
                try:
                    rngs = [rng_for(cfg.seed, STREAM_IMAGE, epoch, step, j) for j in slots]
                    views = [self.data.view(order[step * bsz + j], r) for j, r in zip(slots, rngs)]
                    kind = prompt_kind(s.pos.iteration)
                    loss, mloss, iloss, nobj = self._train_step(views, kind, rngs)
                except KeyboardInterrupt:
                    if self._in_update:  # parameters may be half-updated: keep the last checkpoint as it is
                        raise TrainingInterrupted("interrupted during a parameter update; the last checkpoint "
                                                  f"{self.run_dir / 'latest.pt'} was kept") from None
                    self._interrupt_save(rng=step_rng)
                dt = time.perf_counter() - t0
                s.acc.loss += loss
                s.acc.mask_loss += mloss
                s.acc.iou_loss += iloss
                s.acc.objects += nobj
                s.acc.steps += 1
                s.acc.seconds += dt
                s.train_seconds += dt
                s.pos.step += 1
                s.pos.iteration += 1
                if self.dist.main:
                    self.events.step(s.pos.iteration, loss, 1.0 / dt if dt > 0 else 0.0)
                stop = _all_reduce_sum([1.0 if intr.flag else 0.0], self.dist)[0] > 0
                if stop:
                    self._interrupt_save()
            finished_epoch = s.pos.step >= self.steps_per_epoch
            last = s.pos.iteration >= self.total_iterations
            self._end_epoch(validate=last or (epoch + 1) % cfg.val_every == 0)
            if finished_epoch:
                s.pos.epoch += 1
                s.pos.step = 0
                s.acc = EpochAcc()
            self._save("latest.pt")
            if self.dist.active:
                import torch.distributed as dist

                dist.barrier()
        if not s.stopped:
            s.stopped = "finished"
            self._save("latest.pt")

    def _interrupt_save(self, rng: dict | None = None):
        s = self.state
        path = self._save("latest.pt", interrupted=True, rng=rng)
        if self.dist.main:
            self._write_metrics()
        raise TrainingInterrupted(f"interrupted at iteration {s.pos.iteration} (epoch {s.pos.epoch + 1}); "
                                  f"checkpoint saved to {path or self.run_dir / 'latest.pt'}; continue with "
                                  f"--resume")

    def _end_epoch(self, *, validate: bool) -> None:
        cfg, s = self.cfg, self.state
        acc = s.acc
        rec: dict[str, Any] = {
            "epoch": s.pos.epoch + 1, "iteration": s.pos.iteration,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": acc.loss / max(acc.steps, 1), "train_mask_loss": acc.mask_loss / max(acc.steps, 1),
            "train_iou_loss": acc.iou_loss / max(acc.steps, 1), "train_objects": acc.objects,
            "train_seconds": round(acc.seconds, 2),
            "it_per_s": round(acc.steps / acc.seconds, 4) if acc.seconds else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
        }
        if self.cache is not None:
            rec["trunk_cache"] = self.cache.stats()
        metric = None
        if validate and self.val_samples:
            self.events.phase(f"validating (epoch {s.pos.epoch + 1})")
            v = self.validate()
            rec.update(v)
            metric = v["val_metric"]
        elif not self.val_samples:
            metric = rec["train_loss"]
        improved = False
        if metric is not None:
            self.scheduler.step(metric)
            better = (s.best_metric is None or (metric > s.best_metric if self.metric_mode == "max"
                                                else metric < s.best_metric))
            if better:
                s.best_metric, s.best_epoch, s.bad_epochs, improved = metric, s.pos.epoch + 1, 0, True
            else:
                s.bad_epochs += 1
            if cfg.early_stopping and s.bad_epochs >= cfg.early_stopping:
                s.stopped = "early_stopping"
        rec["best"] = improved
        s.history.append(rec)
        if self.dist.main:
            if improved:
                self._save("best.pt")
            self._write_metrics()
            self.events.validation(rec)
            if s.stopped == "early_stopping":
                self.events.message(f"early stopping: no improvement for {s.bad_epochs} validated epochs")

    def summary(self, seconds: float) -> dict:
        s = self.state
        before = next((r for r in s.history if r.get("epoch") == 0), None)
        best = next((r for r in s.history if r.get("epoch") == s.best_epoch and r.get("best")), None)
        trained = [r for r in s.history if r.get("epoch", 0) > 0]
        return {
            "run_dir": str(self.run_dir), "model": self.spec.name, "peft": self.peft_config.to_dict(),
            "trainable_parameters": self.counts, "device": str(self.device), "precision": self.precision,
            "world_size": self.dist.world, "iterations": s.pos.iteration, "epochs": len(trained),
            "stopped": s.stopped, "seconds": round(seconds, 1), "train_seconds": round(s.train_seconds, 1),
            "val_metric": f"{self.cfg.val_metric} mean IoU" if self.val_samples else "train loss",
            "before": before and before.get("val"),
            "best": best and {"epoch": best["epoch"], "metric": best.get("val_metric", best.get("train_loss")),
                              "val": best.get("val")},
            "last": trained[-1] if trained else None,
            "trunk_cache": self.cache.stats() if self.cache is not None else self.cache_note,
            "multimask": self.settings.multimask,
            "checkpoints": {"best": str(self.run_dir / "best.pt"), "latest": str(self.run_dir / "latest.pt")},
        }

    def close(self) -> None:
        if self.dist.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class _NonFinite(Exception):
    def __init__(self, value):
        super().__init__(str(value))
        self.value = value


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def finetune(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
             events: Events | None = None) -> dict:
    """Run (or resume) a finetuning run; returns the summary (also written to RUN_DIR/summary.json)."""
    run_dir = Path(run_dir)
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        prepare_run_dir(run_dir, resume=False, force=False)  # raises the clear message before any work
    if resume:
        prepare_run_dir(run_dir, resume=True, force=False)
    trainer = Trainer(cfg, run_dir, resume=resume, force=force, events=events)
    # sigmoid of very negative logits gives denormal floats, which are ~20x slower on x86 CPUs; flushing them
    # to zero changes values below 1e-38 only
    flushed = torch.set_flush_denormal(True)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        trainer.close()
