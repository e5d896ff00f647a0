"""PyTorch implementation of the :class:`peft_export.runtime.backend.Backend` protocol."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam

from peft_export.imaging import PreprocessSpec
from peft_export.models.prompt_decoder import PromptDecoder
from peft_export.runtime.backend import BackendInfo, mask_prompt_inputs, no_instance_decoder


class TorchBackend:
    """The runtime's backend contract over a PyTorch SAM model (evaluation of checkpoints, validation)."""

    def __init__(self, model: Sam, preprocess: PreprocessSpec, device: str | torch.device = "cpu",
                 multimask: bool = True, instance_decoder: torch.nn.Module | None = None, *, name: str = "model",
                 source: str = "", precision: str = "fp32"):
        self.model = model.eval().to(device)
        # models/instance_decoder.py, optional (its train/eval mode is left as it is: validation during training)
        self.instance_decoder = None if instance_decoder is None else instance_decoder.to(device)
        self.device = torch.device(device)
        self.decoder = PromptDecoder(self.model)
        c, h, w = model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size
        self.info = BackendInfo(
            name="torch", model=name, source=source, preprocess=preprocess, multimask=multimask,
            embedding_shape=(c, h, w), mask_input_size=(4 * h, 4 * w), max_batch=None,
            on_gpu=self.device.type == "cuda", instance_decoder=instance_decoder is not None, precision=precision,
            compute=precision, details={"device": str(self.device)})

    @torch.inference_mode()
    def embed(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        return self.model.image_encoder(t).float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, embedding, coords, labels, mask_input=None):
        emb = torch.from_numpy(np.ascontiguousarray(embedding, np.float32)).to(self.device)
        c = torch.from_numpy(np.ascontiguousarray(coords, np.float32)).to(self.device)
        lab = torch.from_numpy(np.ascontiguousarray(labels, np.float32)).to(self.device)
        b = c.shape[0]
        size = self.info.mask_input_size
        m, has = (torch.from_numpy(a).to(self.device) for a in mask_prompt_inputs(b, mask_input, size))
        masks, iou = self.decoder(emb, c, lab, m, has)
        return masks.float().cpu().numpy(), iou.float().cpu().numpy()

    @torch.inference_mode()
    def instance_maps(self, embedding: np.ndarray) -> np.ndarray:
        """Image embedding (B, C, h, w) -> the instance decoder's (B, 3, S, S) maps (eval mode)."""
        if self.instance_decoder is None:
            raise no_instance_decoder(self.info)
        was_training = self.instance_decoder.training
        self.instance_decoder.eval()
        try:
            emb = torch.from_numpy(np.ascontiguousarray(embedding, np.float32)).to(self.device)
            return self.instance_decoder(emb).float().cpu().numpy()
        finally:
            self.instance_decoder.train(was_training)
