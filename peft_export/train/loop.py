"""The epoch loop: steps, Ctrl-C, the end of each epoch (validation, scheduler, best.pt, early stopping).

- Ctrl-C: the step in progress finishes, ``latest.pt`` is written at that position, and the command exits 130;
  a second Ctrl-C aborts at once. A KeyboardInterrupt raised inside a step saves the last completed step
  (with the RNG state from before that step, so ``--resume`` repeats it exactly).
- Non-finite loss: training stops before the update with a clear message; checkpoints already written stay.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft_export.errors import PeftExportError
from peft_export.train.config import TrainConfig
from peft_export.train.data import STREAM_IMAGE, TrainData, rng_for
from peft_export.train.distributed import Dist
from peft_export.train.recipe import prompt_kind
from peft_export.train.run_folder import RunFolder
from peft_export.train.state import EpochAcc, RngState, TrainState
from peft_export.train.step import NonFiniteLoss, TrainStep
from peft_export.train.validation import Validator


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


@dataclass
class Schedule:
    steps_per_epoch: int
    total_iterations: int

    @property
    def epochs(self) -> int:
        return -(-self.total_iterations // self.steps_per_epoch)


@dataclass
class TrainingLoop:
    cfg: TrainConfig
    data: TrainData
    step: TrainStep
    state: TrainState
    schedule: Schedule
    validator: Validator
    scheduler: Any  # ReduceLROnPlateau
    save: Callable[..., Path | None]  # save(name, interrupted=False, rng=None): a checkpoint (rank 0)
    folder: RunFolder
    rng: RngState
    dist: Dist
    events: Events
    epoch_figures: Callable[[], dict]  # extra figures of each epoch's record (peak memory, trunk cache)

    def run(self) -> None:
        s = self.state
        with _Interrupt(self.events) as intr:
            try:
                while (s.pos.epoch < self.schedule.epochs and s.pos.iteration < self.schedule.total_iterations
                       and not s.stopped):
                    self._epoch(intr)
                if not s.stopped:
                    s.stopped = "finished"
                    self.save("latest.pt")
            except NonFiniteLoss as exc:
                last = self.folder.latest
                kept = (f"the last good checkpoint is {last} (epoch {s.history[-1]['epoch']})"
                        if last.is_file() and s.history and s.history[-1].get("epoch", 0) > 0
                        else "no checkpoint had been written yet")
                raise TrainingError(
                    f"the loss became {exc.value} at iteration {s.pos.iteration + 1} (epoch {s.pos.epoch + 1}); "
                    f"training stopped, {kept}. Lower --lr (now {self.cfg.lr:g}) or check the data") from None

    def _epoch(self, intr: _Interrupt) -> None:
        cfg, s, sched = self.cfg, self.state, self.schedule
        bsz, epoch = cfg.batch_size, s.pos.epoch
        order = self.data.epoch_order(cfg.seed, epoch, cfg.samples_per_epoch, bsz)
        slots = list(range(self.dist.rank, bsz, self.dist.world))
        self.events.phase(f"epoch {epoch + 1}/{sched.epochs}")
        while s.pos.step < sched.steps_per_epoch and s.pos.iteration < sched.total_iterations:
            t0 = time.perf_counter()
            step_rng = self.rng.state_dict()  # what a resume of this step must start from
            try:
                rngs = [rng_for(cfg.seed, STREAM_IMAGE, epoch, s.pos.step, j) for j in slots]
                views = [self.data.view(order[s.pos.step * bsz + j], r) for j, r in zip(slots, rngs)]
                result = self.step(views, prompt_kind(s.pos.iteration, cfg.point_fraction), rngs)
            except KeyboardInterrupt:
                if self.step.in_update:  # parameters may be half-updated: keep the last checkpoint as it is
                    raise TrainingInterrupted("interrupted during a parameter update; the last checkpoint "
                                              f"{self.folder.latest} was kept") from None
                self._interrupt_save(rng=step_rng)
            dt = time.perf_counter() - t0
            s.acc.add(result, dt)
            s.train_seconds += dt
            s.pos.step += 1
            s.pos.iteration += 1
            if self.dist.main:
                self.events.step(s.pos.iteration, result.loss, 1.0 / dt if dt > 0 else 0.0)
            if self.dist.all_reduce_sum([1.0 if intr.flag else 0.0])[0] > 0:
                self._interrupt_save()
        finished_epoch = s.pos.step >= sched.steps_per_epoch
        last = s.pos.iteration >= sched.total_iterations
        self._end_epoch(validate=last or (epoch + 1) % cfg.val_every == 0)
        if finished_epoch:
            s.pos.epoch += 1
            s.pos.step = 0
            s.acc = EpochAcc()
        self.save("latest.pt")
        self.dist.barrier()

    def _interrupt_save(self, rng: dict | None = None):
        s = self.state
        path = self.save("latest.pt", interrupted=True, rng=rng)
        if self.dist.main:
            self.folder.write_metrics(s.history)
        raise TrainingInterrupted(f"interrupted at iteration {s.pos.iteration} (epoch {s.pos.epoch + 1}); "
                                  f"checkpoint saved to {path or self.folder.latest}; continue with --resume")

    def _end_epoch(self, *, validate: bool) -> None:
        s = self.state
        rec: dict[str, Any] = {"epoch": s.pos.epoch + 1, "iteration": s.pos.iteration,
                               "lr": self.step.optimizer.param_groups[0]["lr"], **s.acc.record(),
                               **self.epoch_figures()}
        metric = None
        if validate and self.validator.samples:
            self.events.phase(f"validating (epoch {s.pos.epoch + 1})")
            v = self.validator()
            rec.update(v)
            metric = v["val_metric"]
        elif not self.validator.samples:
            metric = rec["train_loss"]
        rec["best"] = metric is not None and self._track(metric)
        s.history.append(rec)
        if self.dist.main:
            if rec["best"]:
                self.save("best.pt")
            self.folder.write_metrics(s.history)
            self.events.validation(rec)
            if s.stopped == "early_stopping":
                self.events.message(f"early stopping: no improvement for {s.bad_epochs} validated epochs")

    def _track(self, metric: float) -> bool:
        """Scheduler step, best metric, early stopping; whether this epoch is the best so far."""
        s = self.state
        self.scheduler.step(metric)
        better = s.best_metric is None or (metric > s.best_metric if self.validator.mode == "max"
                                           else metric < s.best_metric)
        if better:
            s.best_metric, s.best_epoch, s.bad_epochs = metric, s.pos.epoch + 1, 0
        else:
            s.bad_epochs += 1
        if self.cfg.early_stopping and s.bad_epochs >= self.cfg.early_stopping:
            s.stopped = "early_stopping"
        return better
