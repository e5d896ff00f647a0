"""Helpers for the TensorRT tests: synthetic export folders and a SIMULATED TensorRT / cuda-python.

ORCHESTRATION ONLY: ``SimTRT``/``SimCuda`` stand in for the parts of the TensorRT Python API and cuda-python that
our code calls, as we read NVIDIA's documentation; they execute the ONNX graph with ONNX Runtime and keep
"device" memory in host buffers. They enforce what the documentation says our calls must respect (names, return
conventions, no precision builder flags on strongly typed networks, BuilderFlag.INT8 for a weakly typed Q/DQ
network on TensorRT 10, input shapes inside the profile) but they are not TensorRT: tests that use them check our
code's logic, never TensorRT's behaviour.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from peft_export.manifest import Manifest, file_entry, write_manifest
from peft_export.runtime import tensorrt_env as trt_env

S, C, H = 32, 8, 8  # synthetic export: input size, embedding channels, embedding side (masks 4H)
INSTALL = "pip install 'peft-export[tensorrt]'"


def listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))}


def one_line(err: str) -> bool:
    return len([ln for ln in err.splitlines() if ln.strip()]) == 1


# ---- a synthetic export folder (exact I/O signature of the real one; a simple, nontrivial graph) -----------

def encoder_graph(qdq: str | None = None):
    """AveragePool + 1x1 Conv; ``qdq``: None (float), or how the Conv's input and weights are quantized —
    "symmetric" (int8, zero points 0: what TensorRT builds), "uint8" (ONNX Runtime's CPU default: uint8
    activations, zero point 128), "int8-nonzero" (int8 activations, zero point 3), "dynamic" (MatMulInteger)."""
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    w = np.random.default_rng(0).normal(0, 0.05, (C, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4])]
    inits = {}
    if qdq is None:
        nodes.append(helper.make_node("Conv", ["pooled", "w"], ["image_embeddings"]))
        inits["w"] = w
    elif qdq == "dynamic":  # ONNX Runtime dynamic quantization: DynamicQuantizeLinear + ConvInteger
        w_scale = np.abs(w).max() / 127
        nodes += [helper.make_node("DynamicQuantizeLinear", ["pooled"], ["xq", "xs", "xz"]),
                  helper.make_node("ConvInteger", ["xq", "wq", "xz"], ["acc"]),
                  helper.make_node("Cast", ["acc"], ["accf"], to=f),
                  helper.make_node("Mul", ["xs", "ws"], ["scale"]),
                  helper.make_node("Mul", ["accf", "scale"], ["image_embeddings"])]
        inits.update(wq=np.round(w / w_scale).astype(np.uint8), ws=np.array(w_scale, np.float32))
    else:
        act_type, act_zp = {"symmetric": (np.int8, 0), "uint8": (np.uint8, 128), "int8-nonzero": (np.int8, 3)}[qdq]
        w_scale = (np.abs(w).reshape(C, -1).max(1) / 127).astype(np.float32)
        nodes += [helper.make_node("QuantizeLinear", ["pooled", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wdq"], axis=0),
                  helper.make_node("Conv", ["xdq", "wdq"], ["image_embeddings"])]
        inits.update(xs=np.array(0.02, np.float32), xz=np.array(act_zp, act_type),
                     wq=np.round(w / w_scale[:, None, None, None]).astype(np.int8), ws=w_scale,
                     wz=np.zeros(C, np.int8))
    return helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("image", f, [1, 3, S, S])],
                             [helper.make_tensor_value_info("image_embeddings", f, [1, C, H, H])],
                             [numpy_helper.from_array(v, k) for k, v in inits.items()])


def decoder_graph():
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    g = np.arange(4 * H, dtype=np.float32) * (S / (4 * H))
    init = {
        "gx": np.broadcast_to(g[None, :], (4 * H, 4 * H)).reshape(1, 1, 4 * H, 4 * H).copy(),
        "gy": np.broadcast_to(g[:, None], (4 * H, 4 * H)).reshape(1, 1, 4 * H, 4 * H).copy(),
        "shape4": np.array([-1, 1, 1, 1], np.int64), "scales": np.array([1, 1, 4, 4], np.float32),
        "axis1": np.array([1], np.int64), "radius": np.array(40.0, np.float32), "three": np.array(3.0, np.float32),
        "variants": np.array([1.0, 0.9, 1.1, 1.2], np.float32).reshape(1, 4, 1, 1),
        "iou_scale": np.array([[1.0, 0.9, 0.8, 0.7]], np.float32),
    }
    mk = helper.make_node
    nodes = [
        mk("ReduceMean", ["point_coords", "axis1"], ["pc"], keepdims=0),  # (B, 2)
        mk("Split", ["pc"], ["cx", "cy"], axis=1, num_outputs=2),
        mk("Reshape", ["cx", "shape4"], ["cx4"]), mk("Reshape", ["cy", "shape4"], ["cy4"]),
        mk("Sub", ["gx", "cx4"], ["dx"]), mk("Sub", ["gy", "cy4"], ["dy"]),
        mk("Mul", ["dx", "dx"], ["dx2"]), mk("Mul", ["dy", "dy"], ["dy2"]),
        mk("Add", ["dx2", "dy2"], ["d2"]), mk("Div", ["d2", "radius"], ["d2s"]),
        mk("Sub", ["three", "d2s"], ["blob"]),  # (B, 1, 4H, 4H): positive near the prompt
        mk("ReduceMean", ["image_embeddings", "axis1"], ["feat"], keepdims=1),
        mk("Resize", ["feat", "", "scales"], ["feat_up"], mode="nearest"),
        mk("Reshape", ["has_mask_input", "shape4"], ["has4"]), mk("Mul", ["mask_input", "has4"], ["prev"]),
        mk("Add", ["blob", "feat_up"], ["m1"]), mk("Add", ["m1", "prev"], ["m2"]),
        mk("Mul", ["m2", "variants"], ["low_res_masks"]),
        mk("ReduceMean", ["point_labels", "axis1"], ["lab"], keepdims=1), mk("Sigmoid", ["lab"], ["labs"]),
        mk("Mul", ["labs", "iou_scale"], ["iou_predictions"]),
    ]
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        nodes, "decoder_lowres",
        [vi("image_embeddings", f, [1, C, H, H]), vi("point_coords", f, ["B", "N", 2]),
         vi("point_labels", f, ["B", "N"]), vi("mask_input", f, ["B", 1, 4 * H, 4 * H]),
         vi("has_mask_input", f, ["B"])],
        [vi("low_res_masks", f, ["B", 4, 4 * H, 4 * H]), vi("iou_predictions", f, ["B", 4])],
        [numpy_helper.from_array(v, k) for k, v in init.items()])


def save_graph(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_synthetic_export(out: Path, precision: str = "fp32", qdq: str | None = None) -> Path:
    """An export folder with the real signature; ``qdq`` quantizes the encoder (see :func:`encoder_graph`)."""
    from peft_export.models.registry import get_spec

    out.mkdir(parents=True, exist_ok=True)
    save_graph(encoder_graph(qdq), out / "encoder.onnx")
    save_graph(decoder_graph(), out / "decoder_lowres.onnx")
    pre = get_spec("vit_tiny").preprocess.to_dict()
    pre["img_size"] = S
    files = {"encoder": file_entry(out / "encoder.onnx"), "decoder_lowres": file_entry(out / "decoder_lowres.onnx")}
    write_manifest(out, Manifest(model="synthetic", preprocess=pre, embedding=[C, H, H], mask_input_size=[4 * H, 4 * H],
                                 multimask=True, precision=precision, opset=18, files=files, verified=False))
    return out


# ---- simulation: ORCHESTRATION ONLY (see the module docstring) -------------------------------------------------

class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


class SimDims(tuple):
    pass


class SimLogger:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, *args):
        pass


class SimTRT:
    """``import tensorrt as trt`` stand-in. ``weak=False`` mimics TensorRT 11 (no BuilderFlag.FP16/INT8)."""

    def __init__(self, version="10.99.0-sim", weak=True, noise=0.0, noisy=("image_embeddings", "low_res_masks"),
                 strongly_typed=True):
        self.__version__ = version
        self.noise, self.noisy = noise, noisy  # an offset added to the outputs named in noisy
        flags = {"TF32": 1}
        if weak:
            flags.update(FP16=2, INT8=3)
        self.BuilderFlag = _Enum(**flags)
        # TensorRT 10: opt-in; TensorRT 11: deprecated and ignored; TensorRT 8: absent (EXPLICIT_BATCH instead)
        self.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5) if strongly_typed else _Enum(EXPLICIT_BATCH=0)
        self.MemoryPoolType = _Enum(WORKSPACE="workspace")
        self.TensorIOMode = _Enum(INPUT="in", OUTPUT="out")
        self.ILogger = SimLogger
        self.builds: list[dict] = []
        sim = self
        self.Builder = lambda logger: SimBuilder(sim, logger)
        self.OnnxParser = SimParser
        self.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda plan: _deserialize(plan, sim))

    @staticmethod
    def nptype(dtype):
        return dtype


class SimBuilder:
    def __init__(self, sim, logger):
        self.sim, self.logger = sim, logger

    def create_network(self, flags):
        return SimpleNamespace(flags=flags, onnx=None, qdq=False)

    def create_builder_config(self):
        return SimConfig(default_flags={1})  # TensorRT enables TF32 by default

    def create_optimization_profile(self):
        return SimProfile()

    def build_serialized_network(self, network, config):
        strong = network.flags & (1 << 5) or not hasattr(self.sim.BuilderFlag, "FP16")
        error = None
        if strong and config.flags & {2, 3}:  # precision builder flags on a strongly typed network
            error = "precision flags not allowed in strongly typed mode"
        elif not strong and network.qdq and 3 not in config.flags:  # TensorRT 10, weakly typed Q/DQ network
            error = "a weakly typed network with Q/DQ layers needs BuilderFlag.INT8"
        if error:
            self.logger.log(SimLogger.Severity.ERROR, error)
            return None
        desc = {"onnx": network.onnx, "flags": network.flags, "config_flags": sorted(config.flags),
                "workspace": config.workspace, "profile": config.profiles[0].shapes if config.profiles else {}}
        self.sim.builds.append(desc)
        if config.cache is not None:
            config.cache.data += b"+" + Path(network.onnx).name.encode()
        return json.dumps(desc).encode()


class SimParser:
    def __init__(self, network, logger):
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path):
        import onnx

        model = onnx.load(path)
        onnx.checker.check_model(model)
        self.network.onnx = path
        self.network.qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
        return True

    def get_error(self, i):
        return "no error"


def _deserialize(plan, sim):
    try:
        return SimEngine(json.loads(bytes(plan)), sim)
    except ValueError:
        return None


class SimConfig:
    def __init__(self, default_flags=()):
        self.flags, self.profiles, self.cache, self.workspace = set(default_flags), [], None, None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return SimpleNamespace(data=bytes(data), serialize=None)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        cache = self.cache
        return SimpleNamespace(serialize=lambda: cache.data)


class SimProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, mn, opt, mx):
        self.shapes[name] = [list(mn), list(opt), list(mx)]


_ORT_NP = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
           "tensor(uint8)": np.dtype(np.uint8)}


class SimEngine:
    def __init__(self, desc, sim):
        import onnxruntime as ort

        self.desc, self.sim = desc, sim
        self.session = ort.InferenceSession(desc["onnx"], providers=["CPUExecutionProvider"])
        self.io = {i.name: ("in", i) for i in self.session.get_inputs()}
        self.io.update({o.name: ("out", o) for o in self.session.get_outputs()})
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return _ORT_NP[self.io[name][1].type]

    def get_tensor_shape(self, name):
        return SimDims(d if isinstance(d, int) else -1 for d in self.io[name][1].shape)

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return [SimDims(s) for s in self.desc["profile"][name]]

    def create_execution_context(self):
        return SimContext(self)


class SimContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        static = self.engine.get_tensor_shape(name)
        if len(shape) != len(static):
            return False
        if name in self.engine.desc["profile"]:
            mn, _, mx = self.engine.desc["profile"][name]
            if not all(a <= s <= b for a, s, b in zip(mn, shape, mx)):
                return False
        elif tuple(shape) != tuple(static):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if self.engine.io[name][0] == "in":
            return SimDims(self.shapes.get(name, self.engine.get_tensor_shape(name)))
        symbols = {}
        for n, shape in self.shapes.items():
            for sym, v in zip(self.engine.io[n][1].shape, shape):
                if isinstance(sym, str):
                    symbols[sym] = v
        return SimDims(d if isinstance(d, int) else symbols.get(d, -1) for d in self.engine.io[name][1].shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        feed = {}
        for name, (mode, info) in self.engine.io.items():
            assert name in self.addresses, f"no address for {name}"
            if mode == "in":
                dtype = _ORT_NP[info.type]
                n = int(np.prod(self.shapes[name])) * dtype.itemsize
                buf = (ctypes.c_char * max(n, 1)).from_address(self.addresses[name])
                feed[name] = np.frombuffer(buf, dtype, count=n // dtype.itemsize).reshape(self.shapes[name]).copy()
        outs = self.engine.session.run(None, feed)
        for o, arr in zip(self.engine.session.get_outputs(), outs):
            if o.name in self.engine.sim.noisy:
                arr = np.ascontiguousarray(arr + self.engine.sim.noise, arr.dtype)
            assert tuple(arr.shape) == tuple(self.get_tensor_shape(o.name))
            ctypes.memmove(self.addresses[o.name], arr.ctypes.data, arr.nbytes)
        return True


class SimCuda:
    """``cuda.bindings.runtime`` stand-in: (error, value) tuples; "device" memory is host memory."""

    class cudaMemcpyKind:  # mirrors the real name
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self, name="NVIDIA SimGPU", cc=(8, 6), devices=1):
        self.name, self.cc, self.devices = name, cc, devices
        self.allocations: dict[int, ctypes.Array] = {}

    def cudaGetDeviceCount(self):
        return (0, self.devices) if self.devices else (100, 0)

    def cudaGetErrorName(self, err):
        return 0, {100: b"cudaErrorNoDevice", 35: b"cudaErrorInsufficientDriver"}.get(int(err), b"cudaErrorUnknown")

    def cudaDriverGetVersion(self):
        return 0, 12040 if self.devices else 0

    def cudaRuntimeGetVersion(self):
        return 0, 12040

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        return 0, SimpleNamespace(name=self.name.encode() + b"\x00\x00", major=self.cc[0], minor=self.cc[1],
                                  totalGlobalMem=8 << 30)

    def cudaMalloc(self, n):
        buf = (ctypes.c_char * n)()
        self.allocations[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        self.allocations.pop(int(ptr), None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        device = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        base = max((a for a in self.allocations if a <= device), default=None)
        assert base is not None and device + n <= base + len(self.allocations[base]), "copy outside an allocation"
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


def install_sim(monkeypatch) -> SimpleNamespace:
    """Replace TensorRT and cuda-python by the simulation; returns a namespace whose .trt/.cuda can be swapped."""
    ns = SimpleNamespace(trt=SimTRT(), cuda=SimCuda())
    monkeypatch.setattr(trt_env, "import_tensorrt", lambda: ns.trt)
    monkeypatch.setattr(trt_env, "import_cudart", lambda: ns.cuda)
    return ns
