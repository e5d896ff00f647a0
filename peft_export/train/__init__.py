"""Interactive SAM finetuning (the study's recipe) with PEFT placement, resumable, with a frozen-trunk cache.

    from peft_export.train import configure_run, finetune
    cfg = configure_run("runs/lora_late4", cli_values={"model": "lite_medsam", "peft": "lora", "blocks": "late:4",
                                                       "epochs": 6})
    summary = finetune(cfg, "runs/lora_late4")

Importing this package does not import torch: the names below load their modules on first use, so the
torch-free option declarations (:mod:`peft_export.train.config`) serve the CLI without PyTorch.
"""

from __future__ import annotations

from peft_export.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "TrainConfig": "config", "TrainOptions": "config", "config_for_resume": "config", "read_config_file": "config",
    "resolve_config": "config",
    "Events": "loop", "TrainingError": "loop", "TrainingInterrupted": "loop",
    "RunFolder": "run_folder", "configure_run": "run_folder",
    "Trainer": "trainer", "finetune": "trainer",
})
