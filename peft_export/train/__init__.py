"""Interactive SAM finetuning (the study's recipe) with PEFT placement, resumable, with a frozen-trunk cache.

    from peft_export.train import finetune, resolve_config
    cfg = resolve_config(cli_values={"model": "lite_medsam", "peft": "lora", "blocks": "late:4", "epochs": 6})
    summary = finetune(cfg, "runs/lora_late4")
"""

from peft_export.train.config import TrainConfig, config_for_resume, read_config_file, resolve_config
from peft_export.train.trainer import Events, Trainer, TrainingError, TrainingInterrupted, finetune

__all__ = [
    "Events",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "config_for_resume",
    "finetune",
    "read_config_file",
    "resolve_config",
]
