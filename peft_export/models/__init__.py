"""SAM model zoo: ``build_sam(name, checkpoint)`` for vit_b/l/h, vit_t (MobileSAM), lite_medsam, test models."""

from peft_export.models.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from peft_export.models.registry import (
    MODELS,
    ModelSpec,
    build_sam,
    embedding_shape,
    encoder_blocks,
    get_spec,
    model_family,
)

__all__ = [
    "MODELS",
    "Checkpoint",
    "ModelSpec",
    "build_sam",
    "embedding_shape",
    "encoder_blocks",
    "get_spec",
    "model_family",
    "read_checkpoint",
    "save_checkpoint",
]
