"""One ONNX graph for a package: the image encoder alone, or encoder + instance decoder composed.

The instance decoder's contract (``instance_decoder.onnx`` of an export): input ``image_embeddings``
(B, C, h, w) float32 -> output ``instance_maps`` (B, 3, S, S) float32, the sigmoid maps foreground / centre
distance / boundary distance at the model input size S. The encoder's output is ``image_embeddings``.
:func:`compose_instance_graph` wires the first into the second with ``onnx.compose`` (decoder names prefixed,
so nothing collides) and keeps ``instance_maps`` as the only output.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose

from peft_export.errors import DataError, first_line

EMBEDDING = "image_embeddings"
INSTANCE_MAPS = "instance_maps"
DECODER_PREFIX = "instance_decoder/"
EXTERNAL_DATA_BYTES = 1800 * 2**20  # as the exporter: above this a graph keeps its weights in a .data side file


def load_graph(path: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf / external-data errors come in several types
        raise DataError(f"cannot read ONNX graph {path}: {first_line(exc)}") from None


def opset_of(model: onnx.ModelProto) -> int:
    return max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _names(values) -> list[str]:
    return [v.name for v in values]


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits]


def check_contract(encoder: onnx.ModelProto, decoder: onnx.ModelProto) -> None:
    """The I/O the composition relies on; a DataError line naming what differs."""
    if EMBEDDING not in _names(encoder.graph.output):
        raise DataError(f"encoder.onnx has no output {EMBEDDING!r} (outputs: {_names(encoder.graph.output)})")
    if _graph_inputs(decoder) != [EMBEDDING]:
        raise DataError(f"instance_decoder.onnx must take exactly one input {EMBEDDING!r}, "
                        f"it takes {_graph_inputs(decoder)}")
    if INSTANCE_MAPS not in _names(decoder.graph.output):
        raise DataError(f"instance_decoder.onnx has no output {INSTANCE_MAPS!r} "
                        f"(outputs: {_names(decoder.graph.output)})")


def _align_opsets(encoder: onnx.ModelProto, decoder: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder converted to the encoder's default-domain opset when they differ (merge needs one opset)."""
    target = opset_of(encoder)
    if opset_of(decoder) == target:
        return decoder
    from onnx import version_converter

    try:
        return version_converter.convert_version(decoder, target)
    except Exception as exc:
        raise DataError(f"the instance decoder (opset {opset_of(decoder)}) cannot be converted to the encoder's "
                        f"opset {target}: {first_line(exc)}; re-export both with one --opset") from None


def compose_instance_graph(encoder: onnx.ModelProto, decoder: onnx.ModelProto) -> onnx.ModelProto:
    """encoder (image -> image_embeddings) + instance decoder (image_embeddings -> instance_maps) as one graph
    image -> instance_maps. The inputs are not modified."""
    check_contract(encoder, decoder)
    decoder = _align_opsets(encoder, decoder)
    ir = max(encoder.ir_version, decoder.ir_version)
    enc = onnx.ModelProto()
    enc.CopyFrom(encoder)
    dec = compose.add_prefix(decoder, DECODER_PREFIX, rename_outputs=False)
    enc.ir_version = dec.ir_version = ir
    try:
        merged = compose.merge_models(enc, dec, io_map=[(EMBEDDING, DECODER_PREFIX + EMBEDDING)],
                                      outputs=[INSTANCE_MAPS], doc_string=_DOC, producer_name="peft-export",
                                      name="sam_encoder_instance_decoder")
    except Exception as exc:  # onnx.compose raises ValueError for opset/name conflicts
        raise DataError(f"cannot compose encoder.onnx and instance_decoder.onnx: {first_line(exc)}") from None
    return merged


_DOC = ("SAM image encoder followed by the automatic-instance-segmentation decoder: image -> instance_maps "
        "(foreground, centre distance, boundary distance; sigmoid). Composed by peft-export from an export "
        "folder's encoder.onnx and instance_decoder.onnx.")


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(i.raw_data) for i in model.graph.initializer)


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save ``model`` at ``path``; with a ``.data`` side file when its weights pass the 2 GB protobuf limit."""
    if weight_bytes(model) > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]
