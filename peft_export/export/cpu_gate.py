"""The CPU gate: reduced-precision OpenVINO runs of an export's encoder, accepted only when they reproduce the fp32
chain (torch-free; ``peft-export cpu-gate EXPORT``).

Why a separate step and not ``export --precision``: bf16 is not a property of the graph but of the CPU that runs
it (OpenVINO computes bf16 on AVX512-BF16/AMX CPUs from the same fp32 ``encoder.onnx``), so the gate must run on a
CPU with bf16, which the export machine (often a GPU workstation) may lack; it needs no PyTorch, so it runs on the
microscope PC itself, on an export made anywhere; and it leaves the export's files and sha256s untouched: it writes
``cpu_gate.json`` beside them (like ``build-engine``'s ``engine.json``), keyed by the encoder's sha256, and the
OpenVINO backend reads it (``precision="auto"`` takes the fastest option that passed; an explicit reduced precision
that did not pass is refused).

The gate (the int8 export gate's rule and machinery, :mod:`peft_export.export.quantize`): on held-out images
(:mod:`peft_export.export.calibration`: the checkpoint's validation data, else the DSB2018 held-out tile and its
flips/rotations), one box and one point prompt per labelled object, the candidate encoder + the fp32 decoder vs the
fp32 encoder + the same decoder (ONNX Runtime); passes when box AND point mean mask IoU >= the threshold (0.97).
For an export with an instance decoder, automatic segmentation is gated too, as the int8 export gate does: the
instance labels (AIS: the candidate's embedding -> the fp32 instance decoder -> the seeded watershed) vs the fp32
chain's, object-matched IoU averaged over the gate images, must reach the same threshold.

Candidates:

- ``bf16``: the whole encoder with ``INFERENCE_PRECISION_HINT=bf16``.
- ``bf16-mixed``: the encoder cut in two at a tensor that is the only value crossing the cut (between blocks), one
  side in f32 and the other in bf16: binary searches over the cut points (f32 tail, f32 head) find the split with
  the smallest f32 share that passes.
  (Per-op f32 inside one bf16 model through rt_info had no effect on the CPU plugin: two compiled models do.)
- ``int8``: NNCF post-training quantization of the encoder (:mod:`peft_export.export.nncf_int8`), its most
  sensitive MatMul/Conv kept float until the gate passes; saved as OpenVINO IR beside the export.

Each candidate's encoder latency is measured against OpenVINO f32 (interleaved rounds) and recorded, so that
``auto`` can pick the fastest passing option.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.data.io import atomic_write
from peft_export.errors import UsageError
from peft_export.export.calibration import calibration_sets
from peft_export.export.nncf_int8 import gate_int8
from peft_export.export.options import CpuGateOptions
from peft_export.export.quantize import GateFigures, _Chain, _reference, gate_figures
from peft_export.imaging import upscale_masks
from peft_export.manifest import Manifest, read_manifest
from peft_export.metrics import matched_iou
from peft_export.runtime.cpu import cpu_features
from peft_export.runtime.instances import maps_to_instances
from peft_export.runtime.onnx_backend import ort_session
from peft_export.runtime.openvino_backend import (
    GATE_FILE,
    GATE_FORMAT,
    GATE_FORMAT_VERSION,
    _static_batch,
    bf16_capable,
    import_openvino,
    shared_core,
    split_model,
)

log = logging.getLogger(__name__)

# ---- chains ----------------------------------------------------------------------------------------------

class EncoderChain:
    """Any encoder callable + the fp32 decoder session: what the int8 gate's ``gate_figures`` takes. The embeddings
    it computed are kept (``seen``, in order) for the instance figures."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], decoder, mask_size: tuple[int, int]):
        self.encode, self.decoder, self.mask_size = encode, decoder, mask_size
        self.seen: list[np.ndarray] = []

    def embed(self, x: np.ndarray) -> np.ndarray:
        emb = np.asarray(self.encode(np.ascontiguousarray(x)), np.float32)
        self.seen.append(emb)
        return emb

    def decode(self, embedding, coords, labels, mask_input=None):
        return _Chain.decode(self, embedding, coords, labels, mask_input)


def compiled_encoder(compiled: list) -> Callable[[np.ndarray], np.ndarray]:
    def run(x):
        out = x
        for c in compiled:
            out = c(out)[0]
        return out

    return run


class InstanceReference:
    """The fp32 chain's instance labels (AIS at its defaults) on the gate images, and the candidate's to match."""

    def __init__(self, session, ref):
        self.session, self.feeds = session, ref.feeds
        self.labels = [self.labels_of(e, prepared) for e, (_, prepared) in zip(ref.embeddings, ref.feeds)]

    def labels_of(self, embedding: np.ndarray, prepared) -> np.ndarray:
        """AIS labels at the gate image's size (``prepared``: its ModelInput geometry)."""
        maps = self.session.run(["instance_maps"], {"image_embeddings": np.asarray(embedding, np.float32)})[0]
        return maps_to_instances(upscale_masks(maps[0], prepared.img_size, prepared.resized_hw, prepared.original_hw))

    def matched(self, embeddings: list[np.ndarray]) -> list[float]:
        """Object-matched IoU of the labels from ``embeddings`` (one per gate image) vs the fp32 labels."""
        return [matched_iou(self.labels_of(e, prepared), want)
                for e, (_, prepared), want in zip(embeddings, self.feeds, self.labels)]


@dataclass
class CpuFigures:
    """The int8 gate's box / point figures and, with an instance decoder, the instance labels' matched IoU (mean and
    min over the gate images); the gate value is the smallest of the gated means."""

    base: GateFigures
    instance_mean: float | None = None
    instance_min: float | None = None

    def __getattr__(self, name):  # box_mean, point_mean, ... (only called for names not found on self)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def value(self) -> float:
        return self.base.value if self.instance_mean is None else min(self.base.value, self.instance_mean)

    def to_dict(self) -> dict:
        d = self.base.to_dict()
        if self.instance_mean is not None:
            d.update(instance_matched_iou=self.instance_mean, instance_min_matched_iou=self.instance_min)
        return {**d, "gate_value": self.value}


@dataclass
class GateContext:
    out_dir: Path
    manifest: Manifest
    core: Any
    decoder: Any  # ORT session of decoder_lowres.onnx
    ref: Any  # quantize._Reference
    sets: Any  # CalibrationSets
    threshold: float
    say: Callable[[str], None]
    instance: InstanceReference | None = None  # exports with an instance decoder

    def chain(self, compiled: list) -> EncoderChain:
        return EncoderChain(compiled_encoder(compiled), self.decoder, tuple(self.manifest.mask_input_size))

    def figures(self, compiled: list) -> CpuFigures:
        chain = self.chain(compiled)
        fig = gate_figures(chain, self.ref)
        if self.instance is None:
            return CpuFigures(fig)
        ious = self.instance.matched(chain.seen)
        return CpuFigures(fig, float(np.mean(ious)), float(np.min(ious)))

    def entry(self, figures, **extra) -> dict:
        """The gate record's entry for ``figures`` against this gate's threshold."""
        return entry(figures, self.threshold, **extra)

    def compile(self, model, precision: str):
        return self.core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_PRECISION_HINT": precision})

    def encoder_model(self):
        """The fp32 encoder as an ``ov.Model``, batch fixed to 1 and shape sub-graphs folded (what the cuts and
        NNCF work on)."""
        from openvino.passes import ConstantFolding, Manager

        model = self.core.read_model(str(self.manifest.path_of(self.out_dir, "encoder")))
        if not self.manifest.baked_preprocessing:
            _static_batch(model)
        mgr = Manager()
        mgr.register_pass(ConstantFolding())
        mgr.run_passes(model)
        return model


def entry(figures, threshold: float, **extra) -> dict:
    d = figures.to_dict()
    return {**d, "threshold": threshold, "passed": bool(figures.value >= threshold), **extra}


def latency_ratios(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict]:
    """Median and min seconds of each callable, interleaved round by round; ratio to ``f32``."""
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = float(np.median(times["f32"]))
    return {k: {"median_s": float(np.median(v)), "min_s": float(np.min(v)),
                "latency_ratio": float(np.median(v)) / base} for k, v in times.items()}


# ---- cut points (bf16-mixed) -----------------------------------------------------------------------------

def cut_points(model) -> list[dict]:
    """Tensors that are the only value crossing a cut of the (batch-1, constant-folded) graph, in order, with the
    share of the graph's operations after them (``tail``: what would run f32)."""
    ops = list(model.get_ordered_ops())
    pos = {o.get_friendly_name(): i for i, o in enumerate(ops)}
    spans = []
    for i, op in enumerate(ops):
        if op.get_type_name() in ("Constant", "Result"):
            continue
        for out in op.outputs():
            users = [pos[t.get_node().get_friendly_name()] for t in out.get_target_inputs()]
            spans.append((i, max(users) if users else i, out))
    live = np.zeros(len(ops) + 1, int)
    for start, end, _ in spans:
        live[start:end] += 1
    compute = [i for i, o in enumerate(ops) if o.get_type_name() not in ("Constant", "Result", "Parameter")]
    out = []
    for start, end, value in spans:
        names = sorted(value.get_names())
        if end > start and names and value.get_node().get_type_name() != "Parameter" and (live[start:end] == 1).all():
            tail = sum(1 for k in compute if k > start) / len(compute)
            out.append({"tensor": names[0], "op": value.get_node().get_type_name(), "tail": round(tail, 4)})
    return out


def spaced(cuts: list[dict], step: float = 0.04) -> list[dict]:
    """Cut points at least ``step`` of the graph apart (the search needs block-level granularity, not every op)."""
    out: list[dict] = []
    for c in cuts:
        if not out or out[-1]["tail"] - c["tail"] >= step:
            out.append(c)
    return out


def gate_mixed(ctx: GateContext, bf16_figures, rounds: int) -> dict:
    """bf16 with one f32 part: the encoder cut at a single-tensor cut point, one side f32 and the other bf16.

    Two directions: ``tail`` (bf16 trunk, f32 from the cut on) and ``head`` (f32 up to the cut, bf16 after it);
    where bf16 hurts depends on the model (on zero-shot LiteMedSAM the early high-resolution stages, not the neck).
    Both are probed at the middle cut; the better one is binary-searched (the gate assumed monotone in the f32
    share) for the passing split with the smallest f32 share of the operations."""
    if bf16_figures is not None and bf16_figures.value >= ctx.threshold:
        return {"passed": False, "skipped": True, "reason": "not needed: bf16 of the whole encoder passes the gate"}
    cuts = spaced(cut_points(ctx.encoder_model()))
    if not cuts:
        return {"passed": False, "reason": "no single-tensor cut point in this encoder"}
    trials: dict[tuple[str, int], Any] = {}

    def f32_share(side: str, k: int) -> float:
        return cuts[k]["tail"] if side == "tail" else 1 - cuts[k]["tail"]

    def trial(side: str, k: int):
        head, tail = split_model(ctx.encoder_model(), cuts[k]["tensor"])
        if not ctx.manifest.baked_preprocessing:
            _static_batch(tail)
        first, second = ("bf16", "f32") if side == "tail" else ("f32", "bf16")
        compiled = [ctx.compile(head, first), ctx.compile(tail, second)]
        fig = ctx.figures(compiled)
        trials[(side, k)] = (fig, compiled)
        ctx.say(f"bf16-mixed: f32 {side} at {cuts[k]['tensor']} ({f32_share(side, k):.0%} of the ops f32) -> gate "
                f"{fig.value:.4f}")
        return fig

    # probe both directions at the middle cut, then binary-search the better side only (each trial is a full gate)
    mid_cut = len(cuts) // 2
    probes = {side: trial(side, mid_cut).value for side in ("tail", "head")}
    side = max(probes, key=probes.get)
    order = list(range(len(cuts))) if side == "tail" else list(reversed(range(len(cuts))))
    lo, hi = -1, len(order)  # order[lo] passes (-1: everything f32), order[hi] fails (len: nothing f32)
    pos = order.index(mid_cut)
    if probes[side] >= ctx.threshold:
        lo = max(lo, pos)
    else:
        hi = pos
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (trials.get((side, order[mid])) or (trial(side, order[mid]),))[0].value >= ctx.threshold:
            lo = mid
        else:
            hi = mid
    passing = [(f32_share(side, order[lo]), side, order[lo])] if lo >= 0 else []
    search = [{"f32": side, "tensor": cuts[k]["tensor"], "f32_share": round(f32_share(side, k), 4),
               **trials[(side, k)][0].to_dict()} for side, k in sorted(trials)]
    if not passing:
        best = max(trials.values(), key=lambda t: t[0].value)[0] if trials else None
        return {"passed": False, "reason": "no split passes the gate", "search": search,
                **({"best_gate_value": best.value} if best else {})}
    share, side, k = min(passing)
    if (side, k) not in trials:
        trial(side, k)
    fig, compiled = trials[(side, k)]
    return {**entry(fig, ctx.threshold), "split": {**cuts[k], "f32": side, "f32_share": round(share, 4)},
            "search": search, "_compiled": compiled}


# ---- the gate --------------------------------------------------------------------------------------------

def run_cpu_gate(out_dir: str | Path, options: CpuGateOptions | None = None, *,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Gate the requested precisions on this CPU; write ``OUT_DIR/cpu_gate.json``; return the record."""
    options = options or CpuGateOptions()
    say = progress or (lambda msg: None)
    ov = import_openvino()
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    if m.precision != "fp32":
        raise UsageError(f"the CPU gate reduces an fp32 export; {out_dir} is {m.precision}")
    t0 = time.perf_counter()
    sets = calibration_sets(options.calibration, training_data=m.source.get("training_data"),
                            calibration_images=options.calibration_images, gate_images=options.gate_images)
    dec = ort_session(m.path_of(out_dir, "decoder_lowres"))
    mask = tuple(m.mask_input_size)
    fp32 = _Chain(ort_session(m.path_of(out_dir, "encoder")), dec, mask)
    say(f"fp32 reference on {len(sets.gate)} held-out gate input(s)")
    ref = _reference(fp32, sets, m.preprocess_spec, bool(m.baked_preprocessing), bool(m.multimask),
                     options.gate_objects)
    core = shared_core()
    instance = None
    if "instance_decoder" in m.files:
        say("fp32 reference: instance labels (AIS)")
        instance = InstanceReference(ort_session(m.path_of(out_dir, "instance_decoder")), ref)
    ctx = GateContext(out_dir, m, core, dec, ref, sets, options.iou, say, instance)
    bf16_ok = bf16_capable(core)
    f32 = [ctx.compile(ctx.encoder_model(), "f32")]
    x = ref.feeds[0][0]
    timed = {"f32": lambda: compiled_encoder(f32)(x)}
    results: dict[str, dict] = {}
    bf16_fig = None
    for name in options.precisions:
        if name.startswith("bf16") and not bf16_ok:
            results[name] = {"passed": False, "skipped": True,
                             "reason": "this CPU has no bf16 arithmetic (AVX512-BF16 or AMX)"}
            say(f"{name}: skipped, this CPU has no bf16 arithmetic")
            continue
        if name == "bf16":
            compiled = [ctx.compile(ctx.encoder_model(), "bf16")]
            bf16_fig = ctx.figures(compiled)
            results[name] = {**entry(bf16_fig, options.iou), "_compiled": compiled}
            inst = "" if bf16_fig.instance_mean is None else f", instance {bf16_fig.instance_mean:.4f}"
            say(f"bf16: gate {bf16_fig.value:.4f} (box {bf16_fig.box_mean:.4f}, point {bf16_fig.point_mean:.4f}{inst})")
        elif name == "bf16-mixed":
            results[name] = gate_mixed(ctx, bf16_fig, options.rounds)
        elif name == "int8":
            results[name] = gate_int8(ctx, options)
    for name, r in results.items():
        if r.get("passed") and "_compiled" in r:
            timed[name] = (lambda c=r["_compiled"]: compiled_encoder(c)(x))
    say(f"latency: {options.rounds} interleaved round(s)")
    lat = latency_ratios(timed, options.rounds)
    for name, r in results.items():
        r.pop("_compiled", None)
        if name in lat:
            r.update(lat[name])
    features = cpu_features()
    record = {
        "format": GATE_FORMAT, "format_version": GATE_FORMAT_VERSION,
        "encoder_sha256": m.files["encoder"]["sha256"], "model": m.model, "threshold": options.iou,
        "rule": "box AND point mean mask IoU of the candidate encoder + fp32 decoder vs the fp32 encoder + the "
                "same decoder (ONNX Runtime), one prompt per labelled object, on held-out gate images"
                + (", AND the instance labels' object-matched IoU (AIS) vs the fp32 chain's" if instance else ""),
        "gate": {**sets.describe(), "objects_per_image": options.gate_objects},
        "cpu": {k: features[k] for k in ("model", "machine", "kind", "flags", "bf16")}, "openvino": ov.__version__,
        "f32_latency": lat["f32"], "precisions": results,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    previous = _previous(out_dir, record)
    if previous:  # other precisions gated before on the same encoder, threshold and CPU kind: kept
        record["precisions"] = {**previous, **results}
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out_dir / GATE_FILE, lambda tmp: tmp.write_text(text))
    return record


def _previous(out_dir: Path, record: dict) -> dict:
    path = out_dir / GATE_FILE
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = (old.get("encoder_sha256") == record["encoder_sha256"] and old.get("threshold") == record["threshold"]
            and (old.get("cpu") or {}).get("kind") == record["cpu"]["kind"])
    return dict(old.get("precisions") or {}) if same else {}
