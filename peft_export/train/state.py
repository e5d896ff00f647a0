"""The training state that checkpoints carry, so that ``--resume`` continues exactly.

- :class:`TrainState`: where the run is (epoch, step, iteration), the running epoch sums, the best metric,
  early-stopping count, the metrics history; stored under ``training`` in every checkpoint.
- :class:`CheckpointParts`: the other named parts, each saved under its own top-level key with its
  ``state_dict()`` (``optimizer_state``, ``scheduler_state``, ``scaler_state``, ``rng_state``, as micro-sam's
  trainer names them). A new trainable part (a decoder) is one more ``add``; a checkpoint written before it
  existed simply lacks the key, and the part keeps its fresh state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from peft_export.train.step import StepResult


@dataclass
class Position:
    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # next step inside the epoch
    iteration: int = 0  # completed optimisation steps


@dataclass
class EpochAcc:
    """Sums over the steps of the current epoch (stored flat: ``loss``, each term, ``steps``, ...)."""

    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    objects: int = 0
    seconds: float = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        self.loss += result.loss
        for k, v in result.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.objects += result.objects
        self.steps += 1
        self.seconds += seconds

    def record(self) -> dict[str, Any]:
        """The epoch's ``train_*`` figures for metrics.jsonl (losses are means over the steps)."""
        n = max(self.steps, 1)
        return {"train_loss": self.loss / n, **{f"train_{k}": v / n for k, v in self.terms.items()},
                "train_objects": self.objects, "train_seconds": round(self.seconds, 2),
                "it_per_s": round(self.steps / self.seconds, 4) if self.seconds else None}

    def to_dict(self) -> dict:
        return {"loss": self.loss, **self.terms, "steps": self.steps, "objects": self.objects,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> EpochAcc:
        fixed = ("loss", "steps", "objects", "seconds")
        return cls(**{k: d[k] for k in fixed if k in d}, terms={k: v for k, v in d.items() if k not in fixed})


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

    def to_dict(self) -> dict:
        return {"position": dict(self.pos.__dict__), "epoch_acc": self.acc.to_dict(),
                "best_metric": self.best_metric, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "history": self.history, "stopped": self.stopped, "train_seconds": self.train_seconds}

    def restore(self, t: dict) -> None:
        """From a checkpoint's ``training`` dict (the run goes on, so ``stopped`` is not taken over)."""
        self.pos = Position(**t["position"])
        self.acc = EpochAcc.from_dict(t["epoch_acc"])
        self.best_metric, self.best_epoch = t.get("best_metric"), t.get("best_epoch")
        self.bad_epochs = int(t.get("bad_epochs", 0))
        self.history = list(t.get("history") or [])
        self.train_seconds = float(t.get("train_seconds", 0.0))


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class RngState:
    """torch's generator (dropout, adapter init) and the device's; the data's randomness is counter-based."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def load_state_dict(self, rng: dict) -> None:
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


class CheckpointParts:
    """Named training-state parts, each saved under its own key (a missing part, e.g. no GradScaler, saves {})."""

    def __init__(self) -> None:
        self._parts: dict[str, Stateful | None] = {}

    def add(self, key: str, part: Stateful | None) -> None:
        self._parts[key] = part

    def state(self, **overrides: Any) -> dict[str, Any]:
        """Every part's state; ``overrides`` replace some (e.g. the RNG state from before an interrupted step)."""
        out = {k: (p.state_dict() if p is not None else {}) for k, p in self._parts.items()}
        out.update(overrides)
        return out

    def load(self, raw: dict[str, Any]) -> None:
        for key, part in self._parts.items():
            if part is not None and raw.get(key):
                part.load_state_dict(raw[key])
