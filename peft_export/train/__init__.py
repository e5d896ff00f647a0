"""Interactive SAM finetuning (the study's recipe) with PEFT placement, resumable, with a frozen-trunk cache.

    from peft_export.train import configure_run, finetune
    cfg = configure_run("runs/lora_late4", cli_values={"model": "lite_medsam", "peft": "lora", "blocks": "late:4",
                                                       "epochs": 6})
    summary = finetune(cfg, "runs/lora_late4")
"""

from peft_export.train.config import TrainConfig, config_for_resume, read_config_file, resolve_config
from peft_export.train.loop import Events, TrainingError, TrainingInterrupted
from peft_export.train.run_folder import RunFolder, configure_run
from peft_export.train.trainer import Trainer, finetune

__all__ = [
    "Events",
    "RunFolder",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "config_for_resume",
    "configure_run",
    "finetune",
    "read_config_file",
    "resolve_config",
]
