"""Prompt encoding + mask decoding as one tensor function, shared by training, evaluation and ONNX export.

Prompts use Meta's ONNX convention so that every backend computes the same thing:
``point_coords`` (B, N, 2) in model-input pixels, ``point_labels`` (B, N) with 1 = positive point,
0 = negative point, 2/3 = top-left/bottom-right box corner, -1 = padding. A prompt without a box needs one
padding point (0, 0)/-1 appended (:func:`peft_export.prompts.pad_points` does that), exactly as segment_anything's
``PromptEncoder`` does for points-only prompts.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn


class PromptDecoder(nn.Module):
    """(image_embeddings, point_coords, point_labels, mask_input, has_mask_input) -> (all 4 masks, 4 IoUs).

    ``image_embeddings`` is (1, C, h, w) (repeated for every prompt) or (B, C, h, w) (one per prompt).
    Returns low-res logits (B, 4, 4h, 4w) and predicted IoUs (B, 4); index 0 is SAM's single-mask output,
    1..3 its multimask outputs.
    """

    def __init__(self, sam: Sam):
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.img_size = int(sam.prompt_encoder.input_image_size[0])

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe_layer = self.prompt_encoder.pe_layer
        coords = (coords + 0.5) / self.img_size
        emb = pe_layer._pe_encoding(coords)  # (B, N, C)
        labels = labels.unsqueeze(-1).to(emb.dtype)
        pe = self.prompt_encoder
        emb = emb * (labels != -1)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i)
        return emb

    def embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        mask_emb = pe.mask_downscaling(mask_input)
        has = has_mask_input.reshape(-1, 1, 1, 1).to(mask_emb.dtype)
        return has * mask_emb + (1 - has) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_masks(mask_input, has_mask_input)
        if dense.shape[0] != sparse.shape[0]:
            dense = dense.expand(sparse.shape[0], -1, -1, -1)
        image_pe = self.prompt_encoder.get_dense_pe()
        if image_embeddings.shape[0] == sparse.shape[0] and sparse.shape[0] != 1:
            return self._decode_per_prompt(image_embeddings, image_pe, sparse, dense)
        return self.mask_decoder.predict_masks(image_embeddings, image_pe, sparse, dense)

    def _decode_per_prompt(self, emb, image_pe, sparse, dense):
        # predict_masks repeats the embedding per prompt; with one embedding per prompt, fold the batch in.
        md = self.mask_decoder
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = emb + dense
        pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1: 1 + md.num_mask_tokens, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        up = md.output_upscaling(src)
        hyper = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                             for i in range(md.num_mask_tokens)], dim=1)
        b, c, h, w = up.shape
        masks = (hyper @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, md.iou_prediction_head(iou_token_out)
