"""RUN_DIR: what a finetune run writes, the checks before a run starts or resumes, and its configuration.

RUN_DIR holds ``config.yaml`` (resolved options), ``metrics.jsonl`` (one record per epoch; epoch 0 is the
model before training), ``latest.pt`` and ``best.pt`` (this project's checkpoint format, written atomically),
``summary.json`` and, with ``--trunk-cache disk``, ``trunk_cache/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peft_export.data.io import atomic_write
from peft_export.errors import UsageError
from peft_export.files import clean_stale
from peft_export.train.config import TrainConfig, config_for_resume, resolve_config, to_yaml

RUN_FILES = ("config.yaml", "metrics.jsonl", "latest.pt", "best.pt", "summary.json")
CACHE_DIR = "trunk_cache"


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.latest = self.path / "latest.pt"
        self.best = self.path / "best.pt"
        self.cache_dir = self.path / CACHE_DIR

    # -- checks: before any work ------------------------------------------------------------------------
    def check(self, *, resume: bool, force: bool) -> None:
        """Refuse a run folder that does not fit: one clear line."""
        if resume and force:
            raise UsageError("give --resume or --force, not both")
        if resume:
            if not self.latest.is_file():
                raise UsageError(f"nothing to resume: {self.latest} does not exist")
            return
        if self.path.is_file():
            raise UsageError(f"run folder {self.path} is a file")
        if self.path.is_dir() and any(self.path.iterdir()) and not force:
            raise UsageError(f"run folder {self.path} already exists; pass --resume to continue it or --force to "
                             "start over (its checkpoints and metrics are replaced)")

    def resume_checkpoint(self):
        """The checkpoint to resume (``latest.pt``), refused unless it is a finetune checkpoint."""
        from peft_export.models.checkpoint import read_checkpoint  # lazy: pulls PIL, segment_anything, torch

        self.check(resume=True, force=False)
        clean_stale(self.path, recursive=True)
        ckpt = read_checkpoint(self.latest)
        if not isinstance((ckpt.raw.get("training") or {}).get("config"), dict):
            raise UsageError(f"{self.latest} is not a finetune checkpoint")
        return ckpt

    def start(self, *, force: bool) -> None:
        """Make the folder for a new run; with ``force`` remove the run's own files (others stay)."""
        self.check(resume=False, force=force)
        clean_stale(self.path, recursive=True)  # what a killed run's atomic writes left (peft_export/files.py)
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        if self.cache_dir.is_dir():
            for p in self.cache_dir.glob("*.pt"):
                p.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    # -- files ----------------------------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> None:
        atomic_write(self.path / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_config(self, cfg: TrainConfig) -> None:
        self._write("config.yaml", "# peft-export finetune: resolved configuration of this run\n"
                    "# repeat it with: peft-export finetune --config config.yaml --out NEW_RUN_DIR\n" + to_yaml(cfg))

    def write_metrics(self, history: list[dict]) -> None:
        self._write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def write_summary(self, summary: dict) -> None:
        self._write("summary.json", json.dumps(_jsonable(summary), indent=2))


def configure_run(run_dir: str | Path, *, resume: bool = False, force: bool = False,
                  file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration of a new run (preset < file < command line), or of the run in ``run_dir`` to resume
    (its own settings; only the schedule and the machinery may change). The folder is checked first."""
    import torch

    folder = RunFolder(run_dir)
    folder.check(resume=resume, force=force)
    if resume:
        saved = folder.resume_checkpoint().raw["training"]["config"]
        return config_for_resume(saved, file_values, cli_values)
    device = (cli_values or {}).get("device") or (file_values or {}).get("device") or "auto"
    return resolve_config(file_values, cli_values, cuda_available=device != "cpu" and torch.cuda.is_available())


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
