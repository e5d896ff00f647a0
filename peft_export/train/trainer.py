"""A finetuning run: puts the collaborators together and runs them.

    from peft_export.train import configure_run, finetune
    cfg = configure_run("runs/a", cli_values={"peft": "lora", "blocks": "late:4", "epochs": 5})
    summary = finetune(cfg, "runs/a")

The parts, each in its module: the run folder and its checks (:mod:`.run_folder`), processes and DDP
(:mod:`.distributed`), devices and precisions (:mod:`peft_export.models.devices`), the step's losses and update
(:mod:`.step`), the checkpointed state (:mod:`.state`), validation (:mod:`.validation`) and the epoch loop with
Ctrl-C, NaN stop and early stopping (:mod:`.loop`). Randomness: data order, crops, augmentation, object choice
and prompt points come from counter-based generators (:func:`peft_export.train.data.rng_for`); torch's generator
(dropout, adapter init) is saved in every checkpoint, so ``--resume`` continues exactly, also mid-epoch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from peft_export.data.dataset import SAMPLE_PREFIX, load_samples
from peft_export.errors import UsageError
from peft_export.loading import load_model
from peft_export.models.checkpoint import read_checkpoint, save_checkpoint
from peft_export.models.devices import peak_memory_mb, resolve_device, resolve_precision, wants_cuda
from peft_export.models.registry import MODELS, get_spec
from peft_export.peft import apply_peft, count_parameters, peft_state
from peft_export.peft.base import unfreeze
from peft_export.peft.options import parse_options, peft_config_from
from peft_export.train.config import TrainConfig
from peft_export.train.data import TrainData, data_fingerprint
from peft_export.train.distributed import Dist, init_distributed
from peft_export.train.instance import setup_instance_decoder
from peft_export.train.loop import Events, Schedule, TrainingError, TrainingInterrupted, TrainingLoop
from peft_export.train.recipe import RecipeSettings
from peft_export.train.run_folder import RunFolder
from peft_export.train.state import CheckpointParts, RngState, TrainState
from peft_export.train.step import StepModule, StepResult, TrainStep
from peft_export.train.trunk import TrunkCache, encoder_steps, trunk_boundary, trunk_fingerprint
from peft_export.train.validation import Validator, set_train_mode

__all__ = ["Events", "Trainer", "TrainingError", "TrainingInterrupted", "finetune", "peak_memory_mb",
           "set_train_mode"]


def load_datasets(cfg: TrainConfig):
    """Training and validation samples (None when there is no validation set)."""
    train = load_samples(cfg.data, "train")
    if cfg.val is not None:
        val = load_samples(cfg.val, "val")
    elif str(cfg.data).startswith(SAMPLE_PREFIX) or (Path(cfg.data) / "val").is_dir():
        val = load_samples(cfg.data, "val")
    else:
        val = None
    return train, val


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 events: Events | None = None):
        self.cfg = cfg
        self.folder = RunFolder(run_dir)
        self.run_dir = self.folder.path
        self.resume = resume
        self.force = force
        self.events = events or Events()
        self.dist = Dist()
        self.state = TrainState()
        self.cache: TrunkCache | None = None
        self.cache_note = ""

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self._setup_processes()
        ckpt = self._setup_data()  # data first: bad data fails before any model work or file is written
        self._setup_model(ckpt)
        self._setup_step()
        if ckpt is not None:
            self.state.restore(ckpt.raw["training"])
            self.parts.load(ckpt.raw)
            started = int(ckpt.raw["training"].get("world_size", 1))
            if started != self.dist.world:
                self.events.message(f"note: resumed with {self.dist.world} process(es); the run started with "
                                    f"{started} (same data per step, results agree within rounding)")
        elif self.dist.main:
            self.folder.start(force=self.force)
        if self.dist.main:
            self.folder.write_config(self.cfg)
        self.dist.barrier()

    def _setup_processes(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed("cuda" if wants_cuda(cfg.device) else "cpu")
        if not self.dist.main:
            self.events = Events()  # only rank 0 talks
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.batch_size % self.dist.world:
            raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                             f"({self.dist.world})")

    def _setup_data(self):
        cfg = self.cfg
        train_samples, self.val_samples = load_datasets(cfg)
        ckpt = self.folder.resume_checkpoint() if self.resume else None
        self.spec = get_spec(self._model_name())
        self.data = TrainData(train_samples, self.spec.preprocess, patch_size=cfg.patch_size,
                              sampling=cfg.patch_sampling, augment=cfg.augment, min_object_area=cfg.min_object_area)
        if ckpt is not None:
            saved_fp = (ckpt.raw.get("data") or {}).get("train", {}).get("fingerprint")
            if saved_fp and saved_fp != self.data.describe()["fingerprint"]:
                raise UsageError("the training data changed since this run started; resume needs the same data "
                                 "(start a new run with --force or another --out)")
        val = None
        if self.val_samples:
            val = {"source": cfg.val or cfg.data, "images": len(self.val_samples),
                   "fingerprint": data_fingerprint(self.val_samples)}
        self.data_description = {"train": {"source": cfg.data, **self.data.describe()}, "val": val}
        return ckpt

    def _setup_model(self, ckpt) -> None:
        """Model + PEFT (seeded: adapter initialisation is reproducible), or the run's own from its checkpoint;
        and the instance decoder when the run trains one."""
        torch.manual_seed(self.cfg.seed)
        base_decoder = None
        if ckpt is None:
            self.model, self.base_source, base_decoder = self._base_model(self.spec.name)
            if peft_state(self.model) is not None:  # --instance-decoder-only on a finetuned (PEFT) checkpoint
                self.peft_config = peft_state(self.model).config
            else:
                self.peft_config = self._run_peft_config()
                apply_peft(self.model, self.peft_config, self.spec.name)
        else:
            loaded = load_model(str(self.folder.latest))
            self.model, base_decoder = loaded.model, loaded.instance_decoder
            self.peft_config = peft_state(self.model).config
            self.base_source = ckpt.raw["training"].get("base_source", "")
        self.instance_decoder = None
        if self.cfg.instance_decoder:
            self.instance_decoder = setup_instance_decoder(self.model, self.spec, base_decoder,
                                                           only=self.cfg.instance_decoder_only)
            if self.cfg.prompt_decoder:  # the prompt heads train on the frozen encoder's embeddings
                unfreeze(self.model.prompt_encoder.parameters())
                unfreeze(self.model.mask_decoder.parameters())
            self.instance_decoder.to(self.device)
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.counts = count_parameters(self.model)
        if self.instance_decoder is not None:
            self.params += list(self.instance_decoder.parameters())
            self.counts["instance_decoder"] = sum(p.numel() for p in self.instance_decoder.parameters())
            self.counts["total"] += self.counts["instance_decoder"]

    def _run_peft_config(self):
        warn = lambda text: self.events.message("warning: " + text)  # noqa: E731
        if self.cfg.instance_decoder_only:
            if self.cfg.prompt_decoder:
                self.events.message("--instance-decoder-only --prompt-decoder: SAM's image encoder stays frozen; the "
                                    "instance decoder, prompt encoder and mask decoder train; --peft/--blocks are "
                                    "not used")
            else:
                self.events.message("--instance-decoder-only: SAM (image encoder, prompt encoder, mask decoder) "
                                    "stays frozen and only the instance decoder trains; --peft/--blocks are not used")
            return peft_config_from("frozen", None, {}, warn)
        return self.cfg.peft_config(warn=warn)

    def _setup_step(self) -> None:
        cfg = self.cfg
        # multimask: the study's 3-mask first point prompt only where those outputs are trained
        multimask = self.spec.multimask if cfg.multimask == "auto" else cfg.multimask == "on"
        self.settings = RecipeSettings(cfg.objects_per_image, cfg.sub_iterations, cfg.mask_prob, multimask,
                                       cfg.point_sampling)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.validator = Validator(self.model, self.spec, self.device, self.val_samples, prompts=cfg.val_prompts,
                                   metric=cfg.val_metric, dist=self.dist)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=self.validator.mode, factor=cfg.scheduler_factor, patience=cfg.scheduler_patience)
        self.step_module = StepModule(self.model, self.settings, self.instance_decoder,
                                      instance_only=cfg.instance_decoder_only,
                                      prompt_losses=not cfg.instance_decoder_only or cfg.prompt_decoder)
        self._setup_cache()
        self.validator.cache = self.cache
        self.validator.instance_decoder = self.instance_decoder
        self.step = TrainStep(self.dist.wrap(self.step_module), self.optimizer, precision=self.precision,
                              batch_size=cfg.batch_size, dist=self.dist)
        self.rng = RngState(self.device)
        self.parts = CheckpointParts()
        for key, part in (("optimizer_state", self.optimizer), ("scheduler_state", self.scheduler),
                          ("scaler_state", self.step.scaler), ("rng_state", self.rng)):
            self.parts.add(key, part)
        if self.instance_decoder is not None:  # micro-sam's key for the instance decoder's weights
            self.parts.add("decoder_state", self.instance_decoder)
        steps = len(self.data.epoch_order(cfg.seed, 0, cfg.samples_per_epoch, cfg.batch_size)) // cfg.batch_size
        self.schedule = Schedule(steps, cfg.iterations or cfg.epochs * steps)
        self.loop = TrainingLoop(cfg, self.data, self.step, self.state, self.schedule, self.validator,
                                 self.scheduler, self._save, self.folder, self.rng, self.dist, self.events,
                                 self._epoch_figures)

    def _model_name(self) -> str:
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
        """(model, where it came from, its instance decoder or None)."""
        model_arg = self.cfg.model
        if self.spec.test_only and self.cfg.checkpoint is None and model_arg == name:
            self.events.message(f"{name} is a test model: training from random weights")
            return self.spec.build(), "random", None
        loaded = load_model(model_arg, self.cfg.checkpoint)
        unmerged = loaded.peft and not (loaded.checkpoint and loaded.checkpoint.merged)
        if unmerged and not self.cfg.instance_decoder_only:
            raise UsageError(f"{loaded.source} already holds a PEFT method ({loaded.peft.get('method')}); merge "
                             "it first (peft-export merge), resume its run with --resume, or train an instance "
                             "decoder on it with --instance-decoder-only")
        return loaded.model, loaded.source, loaded.instance_decoder

    def _setup_cache(self) -> None:
        cfg = self.cfg
        steps = encoder_steps(self.model.image_encoder)
        boundary = trunk_boundary(steps)
        mode = cfg.trunk_cache
        if mode == "off":
            self.cache_note = "trunk cache off (--trunk-cache off)"
            return
        if boundary == 0:
            pc = self.peft_config
            self.cache_note = f"trunk cache off: the first encoder step trains ({pc.method} on {pc.placement})"
            late = bool(pc.blocks) and min(pc.blocks) > 0
            if pc.method == "ssf" and late and parse_options("ssf", pc.options).patch_embed:
                self.events.message(
                    f"note: ssf on {pc.placement} also scales and shifts the patch embedding (--ssf-patch-embed, as "
                    "the study describes SSF), so backward runs through the whole encoder: memory and step time "
                    "stay near all blocks'; --no-ssf-patch-embed keeps the late placement's savings")
            elif mode != "auto":
                self.events.message(self.cache_note)
            return
        if not self.data.repeating:
            self.cache_note = f"trunk cache off: {self.data.non_repeating_reason}, so inputs do not repeat"
            self.events.message(self.cache_note)
            return
        if mode == "auto":
            mode = "memory"
        folder = None
        if mode == "disk":
            folder = self.folder.cache_dir / f"rank{self.dist.rank}" / trunk_fingerprint(steps, boundary,
                                                                                         self.spec.name)
        self.cache = TrunkCache(steps, boundary, mode=mode, budget_mb=cfg.trunk_cache_mb, folder=folder)
        self.step_module.set_cache(self.cache)
        self.cache_note = (f"trunk cache on ({mode}): encoder steps before {self.cache.split_name} are frozen; "
                           "their output is computed once per input")

    # -- checkpoints -------------------------------------------------------------------------------------
    def _save(self, name: str, *, interrupted: bool = False, rng: dict | None = None) -> Path | None:
        if not self.dist.main:
            return None
        s = self.state
        training = {"config": self.cfg.to_dict(), "base_source": self.base_source, **s.to_dict(),
                    "interrupted": interrupted, "total_iterations": self.schedule.total_iterations,
                    "world_size": self.dist.world}
        extra = {"training": training, "iteration": s.pos.iteration, "epoch": s.pos.epoch,
                 "best_metric": s.best_metric, "data": self.data_description,
                 **self.parts.state(**({"rng_state": rng} if rng is not None else {}))}
        return save_checkpoint(self.folder.path / name, model_name=self.spec.name,
                               state_dict=self.model.state_dict(), peft=self.peft_config.to_dict(), extra=extra)

    def _instance_info(self) -> dict | None:
        if self.instance_decoder is None:
            return None
        return {"only": bool(self.cfg.instance_decoder_only), "prompt_decoder": bool(self.cfg.prompt_decoder),
                **self.instance_decoder.config.to_dict()}

    def _epoch_figures(self) -> dict:
        figures = {"peak_memory_mb": round(peak_memory_mb(self.device), 1)}
        if self.cache is not None:
            figures["trunk_cache"] = self.cache.stats()
        return figures

    # -- running -----------------------------------------------------------------------------------------
    def train_step(self, views, kind: str, rngs) -> StepResult:
        """One optimisation step on ``views`` (the loop's step, for benchmarks)."""
        return self.step(views, kind, rngs)

    _train_step = train_step  # the name peft_export/bench and benchmarks/ call

    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        t_start = time.perf_counter()
        set_train_mode(self.model, self.instance_decoder)
        info = {"model": self.spec.name, "peft": self.peft_config.to_dict(), "parameters": self.counts,
                "device": str(self.device), "precision": self.precision, "world_size": self.dist.world,
                "train_patches": len(self.data), "val_images": len(self.val_samples or []),
                "steps_per_epoch": self.schedule.steps_per_epoch, "epochs": self.schedule.epochs,
                "trunk_cache": self.cache_note, "multimask": self.settings.multimask,
                "instance_decoder": self._instance_info()}
        if self.dist.main:
            self.events.start(self.schedule.total_iterations, s.pos.iteration, info)
        if not self.val_samples and self.dist.main and not self.resume:
            self.events.message("warning: no validation set (--val DIR, or train/ + val/ sub-folders): best.pt "
                                "follows the training loss")
        if cfg.val_before and self.val_samples and not s.history and s.pos.iteration == 0:
            self.events.phase("validating (before training)")
            rec = {"epoch": 0, "iteration": 0, "lr": cfg.lr, **self.validator()}
            s.history.append(rec)
            if self.dist.main:
                self.events.validation(rec)
                self.folder.write_metrics(s.history)
        self.loop.run()
        summary = self.summary(time.perf_counter() - t_start)
        if self.dist.main:
            self.folder.write_summary(summary)
        return summary

    def summary(self, seconds: float) -> dict:
        s = self.state
        before = next((r for r in s.history if r.get("epoch") == 0), None)
        best = next((r for r in s.history if r.get("epoch") == s.best_epoch and r.get("best")), None)
        trained = [r for r in s.history if r.get("epoch", 0) > 0]
        return {
            "run_dir": str(self.run_dir), "model": self.spec.name, "peft": self.peft_config.to_dict(),
            "trainable_parameters": self.counts, "device": str(self.device), "precision": self.precision,
            "world_size": self.dist.world, "cpu_threads": torch.get_num_threads(), "iterations": s.pos.iteration,
            "epochs": len(trained),
            "stopped": s.stopped, "seconds": round(seconds, 1), "train_seconds": round(s.train_seconds, 1),
            "val_metric": (("instance mSA (automatic segmentation)" if self.cfg.val_metric == "instance" else
                            f"{self.cfg.val_metric} mean IoU") if self.val_samples else "train loss"),
            "before": before and before.get("val"),
            "best": best and {"epoch": best["epoch"], "metric": best.get("val_metric", best.get("train_loss")),
                              "val": best.get("val")},
            "last": trained[-1] if trained else None,
            "trunk_cache": self.cache.stats() if self.cache is not None else self.cache_note,
            "multimask": self.settings.multimask, "instance_decoder": self._instance_info(),
            "checkpoints": {"best": str(self.folder.best), "latest": str(self.folder.latest)},
        }

    def close(self) -> None:
        self.dist.close()


def finetune(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
             events: Events | None = None) -> dict:
    """Run (or resume) a finetuning run; returns the summary (also written to RUN_DIR/summary.json)."""
    RunFolder(run_dir).check(resume=resume, force=force)  # the clear message before any work
    trainer = Trainer(cfg, run_dir, resume=resume, force=force, events=events)
    # sigmoid of very negative logits gives denormal floats, which are ~20x slower on x86 CPUs; flushing them
    # to zero changes values below 1e-38 only
    flushed = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    if cfg.threads:  # the process's setting again afterwards (finetune may run inside a longer-lived process)
        torch.set_num_threads(cfg.threads)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
        trainer.close()
