"""``BackendInfo``: what a runtime backend is and what actually ran (torch-free).

Shaped like the record of the runtime contract (issue 21) so that backends written against it port mechanically:
when ``peft_export.runtime.backend`` gains ``BackendInfo``, this module becomes an import of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from peft_export.imaging import PreprocessSpec


@dataclass(frozen=True)
class BackendInfo:
    name: str  # registry name: onnxruntime | openvino | tensorrt | torch
    model: str  # model entry (lite_medsam, vit_b, ...)
    source: str  # folder / package / checkpoint it was opened from
    preprocess: PreprocessSpec
    multimask: bool
    embedding_shape: tuple  # (C, h, w)
    mask_input_size: tuple  # (4h, 4w)
    baked_preprocessing: bool = False
    max_batch: int | None = 1  # images per encoder call (None: any)
    on_gpu: bool = False
    precision: str = "fp32"  # what the graphs store: fp32 | fp16 | int8
    compute: str = "fp32"  # what actually ran, e.g. OpenVINO's inference precision f32 | bf16
    instance_decoder: bool = False
    encoder_sha256: str | None = None
    details: dict = field(default_factory=dict)  # backend specifics for summaries (CPU flags, cache dir, ...)

    def summary(self) -> dict:
        """The JSON-able part for run summaries: backend, stored precision, compute precision, details."""
        return {"backend": self.name, "precision": self.precision, "compute": self.compute,
                **{k: v for k, v in asdict(self).items() if k == "details"}}
