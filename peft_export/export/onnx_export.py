"""PyTorch -> ONNX for the encoder and the TensorRT-friendly decoder, with the new (``dynamo=True``) exporter.

Why this exporter: the legacy TorchScript exporter silently produces a wrong TinyViT (LiteMedSAM) encoder, and
freezes sizes taken from dummy inputs (see the project's export notes). ``torch.onnx.export(..., dynamo=True)``
traces with ``torch.export`` (symbolic batch and point counts) and emits opset >= 18.

Tracing is slow on a CPU (tens of seconds to minutes per graph), and every merged checkpoint of one model has the
same module tree: only the weights differ. So a traced graph is kept in memory as a *template* (exported
without the exporter's optimiser, where every initializer is exactly one parameter or buffer, named by its
state-dict key) and re-used for a module whose structure fingerprint matches, by substituting the weights by
name. The optimiser (constant folding, as the exporter itself runs it) runs afterwards on the rebound graph.
Every export is then checked numerically against PyTorch by the parity gate, template or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from peft_export.errors import PeftExportError, first_line
from peft_export.export import DEFAULT_OPSET, MIN_OPSET
from peft_export.memo import Memo

log = logging.getLogger(__name__)

_TEMPLATE_MAX_BYTES = 512 * 2**20  # larger graphs are not kept (vit_l/vit_h: one export per process anyway)
# traced graphs (serialized, with the names of their weight initializers) by module fingerprint: a module of the
# same structure is exported again by substituting its weights
TEMPLATES = Memo("onnx_export.templates", limit=6)


class ExportFailedError(PeftExportError):
    """The PyTorch exporter could not convert a graph."""


@dataclass
class Traced:
    model: onnx.ModelProto
    reused: bool  # weights substituted into a template traced earlier in this process
    seconds: float


def _simple(v) -> bool:
    if isinstance(v, (bool, int, float, str, type(None))):
        return True
    if isinstance(v, (tuple, list)):
        return all(_simple(x) for x in v)
    return False


def fingerprint(module: nn.Module, *parts) -> str:
    """Structure of ``module``: module types, their plain attributes, parameter/buffer names, shapes, dtypes,
    and plain tensor attributes (values). Equal fingerprints trace to the same graph up to weight values."""
    h = hashlib.sha256()
    h.update(repr(parts).encode())
    for name, m in module.named_modules(remove_duplicate=False):
        h.update(f"|{name}:{type(m).__module__}.{type(m).__qualname__}".encode())
        for k, v in sorted(vars(m).items()):
            if k.startswith("_") or k == "training":
                continue
            if _simple(v):
                h.update(f";{k}={v!r}".encode())
            elif isinstance(v, torch.Tensor):
                h.update(f";{k}:{tuple(v.shape)}:{v.dtype}".encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for name, t in _state(module).items():
        h.update(f"|{name}:{tuple(t.shape)}:{t.dtype}".encode())
    return h.hexdigest()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _rebind(template: bytes, state_names: frozenset[str], module: nn.Module) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.ParseFromString(template)
    state = _state(module)
    for init in proto.graph.initializer:
        if init.name not in state_names:
            continue  # a constant of the architecture (lifted tensor), same for every module of this structure
        t = state[init.name].detach().cpu().contiguous()
        arr = t.numpy()
        if tuple(init.dims) != arr.shape or onnx.helper.tensor_dtype_to_np_dtype(init.data_type) != arr.dtype:
            raise ExportFailedError(f"template initializer {init.name} does not fit the module (internal error)")
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return proto


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress on stdout (which carries --json results) and warns a lot: silence both."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield buf


def trace(module: nn.Module, args: tuple, *, input_names: list[str], output_names: list[str],
          dynamic_shapes=None, opset: int = DEFAULT_OPSET, key: str = "") -> Traced:
    """Export ``module`` (eval, fp32) to an unoptimised ONNX graph, or re-use a template of the same structure."""
    import time

    if opset < MIN_OPSET:
        raise PeftExportError(f"opset {opset} is too old: the exporter needs >= {MIN_OPSET}")
    t0 = time.perf_counter()
    fp = fingerprint(module, key, opset, input_names, output_names, repr(dynamic_shapes),
                     [(tuple(a.shape), str(a.dtype)) for a in args])
    hit = TEMPLATES.get(fp)
    if hit is not None:
        proto = _rebind(hit[0], hit[1], module)
        return Traced(proto, True, time.perf_counter() - t0)
    with _quiet() as buf:
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=False,
                                        external_data=False, verbose=False, report=False)
        except Exception as exc:  # the exporter raises many types; one line for the user
            log.debug(buf.getvalue())
            raise ExportFailedError(f"torch.onnx.export failed for {type(module).__name__}: {first_line(exc)}") \
                from exc
    proto = program.model_proto
    state = _state(module)
    names = frozenset(i.name for i in proto.graph.initializer if i.name in state)
    size = sum(len(i.raw_data) for i in proto.graph.initializer)
    if size <= _TEMPLATE_MAX_BYTES:
        TEMPLATES.put(fp, (proto.SerializeToString(), names))
    return Traced(proto, False, time.perf_counter() - t0)


OPTIMIZED = Memo("onnx_export.optimized", limit=4)  # optimised graphs by input sha256 (same byte limit as templates)


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter's own optimisation (onnxscript constant folding + standard-op fusions), on a rebound graph.

    Deterministic, so the result for identical input bytes is kept (a few graphs): exporting one model at
    several precisions, or models that share a decoder, optimises each distinct graph once. Always returns a
    fresh ``ModelProto`` (callers may modify it)."""
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    raw = model.SerializeToString()
    key = hashlib.sha256(raw).hexdigest()
    hit = OPTIMIZED.get(key)
    if hit is not None:
        out = onnx.ModelProto()
        out.ParseFromString(hit)
        return out
    irm = ir.serde.deserialize_model(model)
    with _quiet():
        onnxscript.optimizer.optimize_ir(irm)
        onnxscript.rewriter.onnx_fusions.fuse(irm)
    out = ir.serde.serialize_model(irm)
    if len(raw) <= _TEMPLATE_MAX_BYTES:
        OPTIMIZED.put(key, out.SerializeToString())
    return out


# ---- the two traced graphs -----------------------------------------------------------------------------

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_embeddings"]
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
DECODER_OUTPUTS = ["low_res_masks", "iou_predictions"]


ENCODER_MAX_BATCH = 4096  # the symbolic batch axis' upper bound (any realistic batch of tiles)


def trace_encoder(sam, opset: int = DEFAULT_OPSET) -> Traced:
    """image (B, 3, S, S) float32 -> image_embeddings (B, C, h, w), with a dynamic batch axis B: the runtime
    embeds the tiles of a large image in batches (the parity gate checks batch 1 and batch 2)."""
    enc = sam.image_encoder.eval()
    s = int(sam.image_encoder.img_size)
    x = torch.zeros(2, 3, s, s)  # example batch 2: neither 0 nor 1, so that nothing specialises on it
    b = torch.export.Dim("B", min=1, max=ENCODER_MAX_BATCH)
    return trace(enc, (x,), input_names=ENCODER_INPUTS, output_names=ENCODER_OUTPUTS, dynamic_shapes=({0: b},),
                 opset=opset, key="encoder")


def trace_decoder_lowres(sam, opset: int = DEFAULT_OPSET) -> Traced:
    """PromptDecoder with a dynamic number of prompts B and points N: all four low-res masks and IoUs."""
    from peft_export.models.prompt_decoder import PromptDecoder  # lazy: pulls PIL, segment_anything, torchvision

    dec = PromptDecoder(sam).eval()
    c = sam.prompt_encoder.embed_dim
    h, w = sam.prompt_encoder.image_embedding_size
    s = dec.img_size
    # example values: B=2, N=3 (neither 0 nor 1, and different, so that nothing specialises on them)
    args = (torch.zeros(1, c, h, w), torch.tensor([[[10.0, 12.0], [0.5 * s, 0.6 * s], [0.0, 0.0]]] * 2),
            torch.tensor([[2.0, 3.0, -1.0], [1.0, 0.0, -1.0]]), torch.zeros(2, 1, 4 * h, 4 * w), torch.zeros(2))
    b = torch.export.Dim("B", min=1, max=65536)
    n = torch.export.Dim("N", min=1, max=4096)
    dynamic = ({}, {0: b, 1: n}, {0: b, 1: n}, {0: b}, {0: b})
    return trace(dec, args, input_names=DECODER_INPUTS, output_names=DECODER_OUTPUTS, dynamic_shapes=dynamic,
                 opset=opset, key="decoder_lowres")


def torch_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": str(torch.__version__)}
    for dist in ("onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "onnxslim"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    out["python"] = sys.version.split()[0]
    out["numpy"] = np.__version__
    return out
