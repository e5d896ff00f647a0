"""TensorRT backend: runs an export folder's ``encoder.engine`` + ``decoder.engine`` (torch-free).

Engines come from ``peft-export build-engine OUT_DIR`` (:mod:`peft_export.export.tensorrt`), which also writes
``engine.json``: the TensorRT version, GPU model and compute capability the engines were built for, their sha256,
the optimisation profiles and the parity figures measured against ONNX Runtime. A TensorRT engine only runs on
the GPU model and TensorRT version it was built with, so opening one elsewhere is refused with a message that
says what to rebuild.

CUDA and TensorRT themselves (lazy imports, feature detection, the GPU): :mod:`peft_export.runtime.tensorrt_env`.
The engines run with TensorRT 10's name-based tensor API (``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``), which TensorRT 11 keeps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.data.samples import sha256_file
from peft_export.errors import (
    DataError,
    MissingDependencyError,
    PeftExportError,
    UsageError,
    VerificationError,
)
from peft_export.manifest import Manifest, read_json_document, read_manifest
from peft_export.paths import member_path
from peft_export.runtime import tensorrt_env
from peft_export.runtime.backend import mask_prompt_inputs, no_instance_decoder
from peft_export.runtime.onnx_backend import manifest_info
from peft_export.runtime.tensorrt_env import cuda_call, make_logger

log = logging.getLogger(__name__)

ENGINE_META = "engine.json"
ENGINE_FORMAT = "peft-export-tensorrt"
ENGINE_FORMAT_VERSION = 1
# role -> (engine file, the ONNX role in the manifest it is built from)
ENGINES = {"encoder": ("encoder.engine", "encoder"), "decoder": ("decoder.engine", "decoder_lowres")}
# built when the export has the graph (issue 14); the runtime runs instance_decoder.onnx with ONNX Runtime for now
OPTIONAL_ENGINES = {"instance_decoder": ("instance_decoder.engine", "instance_decoder")}
ALL_ENGINES = {**ENGINES, **OPTIONAL_ENGINES}
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")


# ---- engine.json ---------------------------------------------------------------------------------------

def read_engine_meta(out_dir: str | os.PathLike, manifest: Manifest | None = None, *,
                     verify_files: bool = True) -> dict[str, Any]:
    """Read ``OUT_DIR/engine.json``; check the engine files' sha256 and that they were built from this export."""
    out_dir = Path(out_dir)
    path = out_dir / ENGINE_META
    if not path.is_file():
        raise DataError(f"{out_dir} has no TensorRT engines ({ENGINE_META} is missing): build them on this machine "
                        f"with `peft-export build-engine {out_dir}`")
    meta = read_json_document(path, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, "engine description")
    engines = meta.get("engines")
    missing = [k for k in ("tensorrt_version", "gpu", "precision") if k not in meta]
    if not isinstance(engines, dict) or not set(ENGINES) <= set(engines) <= set(ALL_ENGINES) or missing:
        raise DataError(f"{path} is incomplete (needs engines {', '.join(ENGINES)} and tensorrt_version, gpu, "
                        "precision); rebuild with `peft-export build-engine --force`")
    for role, entry in engines.items():
        p = member_path(out_dir, entry.get("path") if isinstance(entry, dict) else None, f"the {role} engine")
        if not p.is_file():
            raise DataError(f"{out_dir}: {entry['path']} ({role} engine) listed in {ENGINE_META} is missing; rebuild "
                            f"with `peft-export build-engine {out_dir} --force`")
        if verify_files and sha256_file(p) != entry.get("sha256"):
            raise VerificationError(f"{p} does not match its sha256 in {ENGINE_META} (modified or corrupt); rebuild "
                                    f"with `peft-export build-engine {out_dir} --force`")
        if manifest is not None:
            onnx_role = ALL_ENGINES[role][1]
            src = manifest.files.get(onnx_role, {})
            if entry.get("onnx_sha256") != src.get("sha256"):
                raise DataError(f"{out_dir}: {entry['path']} was built from a different {src.get('path', onnx_role)} "
                                f"than the one in this export; rebuild with `peft-export build-engine {out_dir} "
                                "--force`")
    return meta


def check_engine_compatible(meta: dict[str, Any], tensorrt_version: str, gpu: dict[str, Any],
                            out_dir: str | os.PathLike = ".") -> None:
    """Refuse engines built for another GPU model or another TensorRT version (they would not deserialize, or
    would run with tactics chosen for different hardware)."""
    built_gpu = meta.get("gpu") or {}
    problems = []
    if str(meta.get("tensorrt_version")) != str(tensorrt_version):
        problems.append(f"TensorRT {meta.get('tensorrt_version')} (this machine has TensorRT {tensorrt_version})")
    if (built_gpu.get("name") != gpu.get("name")
            or str(built_gpu.get("compute_capability")) != str(gpu.get("compute_capability"))):
        problems.append(f"{built_gpu.get('name')} (compute capability {built_gpu.get('compute_capability')}; this "
                        f"machine has {gpu.get('name')}, compute capability {gpu.get('compute_capability')})")
    if problems:
        files = " and ".join(e["path"] for e in meta["engines"].values())
        raise UsageError(f"{out_dir}: {files} were built for {' and '.join(problems)}; TensorRT engines only run on "
                         f"the GPU model and TensorRT version they were built with: rebuild both here with "
                         f"`peft-export build-engine {out_dir} --force`")


# ---- one engine ----------------------------------------------------------------------------------------

class EngineRunner:
    """One deserialized engine with its execution context, CUDA stream and (grow-only) device buffers.

    ``run({input name: array})`` -> {output name: array}, through TensorRT's name-based tensor API.
    """

    def __init__(self, trt, cudart, plan, label: str, logger=None):
        self.trt, self.cudart, self.label = trt, cudart, label
        self.logger = logger or make_logger(trt, label)
        self._buffers: dict[str, tuple[int, int]] = {}
        self._stream = None
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            why = self.logger.last_error("corrupt, or built by another TensorRT version")
            raise DataError(f"{label}: TensorRT cannot load this engine ({why}); rebuild it with "
                            "`peft-export build-engine --force`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PeftExportError(f"{label}: TensorRT could not create an execution context "
                                  f"({self.logger.last_error('out of GPU memory?')})")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode_in = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode_in]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        for n in self.inputs:
            if any(int(d) < 0 for d in self.engine.get_tensor_shape(n)):
                mn, opt, mx = self.engine.get_tensor_profile_shape(n, 0)
                self.profile[n] = (tuple(int(d) for d in mn), tuple(int(d) for d in opt), tuple(int(d) for d in mx))
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if nbytes > size or not ptr:
            if ptr:
                cuda_call(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
                self._buffers.pop(name)
            ptr = int(cuda_call(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._buffers[name] = (ptr, max(nbytes, 1))
        return ptr

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, ctx = self.cudart, self.context
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise UsageError(f"{self.label}: missing input {missing[0]!r}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []  # host arrays must live until the stream is synchronised
        for n in self.inputs:
            arr = np.ascontiguousarray(feed[n], dtype=self.dtypes[n])
            if not ctx.set_input_shape(n, tuple(int(d) for d in arr.shape)):
                raise UsageError(f"{self.label}: input {n} of shape {tuple(arr.shape)} is outside what the engine was "
                                 f"built for ({self._describe(n)}); rebuild with other profile options")
            ptr = self._device(n, arr.nbytes)
            cuda_call(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream),
                      "cudaMemcpyAsync (to GPU)")
            ctx.set_tensor_address(n, ptr)
            keep.append(arr)
        results = {}
        for n in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise PeftExportError(f"{self.label}: TensorRT could not infer the shape of output {n} ({shape})")
            host = np.empty(shape, self.dtypes[n])
            ctx.set_tensor_address(n, self._device(n, host.nbytes))
            results[n] = host
        if not ctx.execute_async_v3(int(self._stream)):
            raise PeftExportError(f"{self.label}: TensorRT inference failed ({self.logger.last_error()})")
        for n, host in results.items():
            if host.nbytes:
                cuda_call(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[n][0], host.nbytes, d2h,
                                                         self._stream), "cudaMemcpyAsync (from GPU)")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        del keep
        return results

    def _describe(self, name: str) -> str:
        if name in self.profile:
            mn, _, mx = self.profile[name]
            return f"{'x'.join(map(str, mn))} to {'x'.join(map(str, mx))}"
        return "x".join(str(int(d)) for d in self.engine.get_tensor_shape(name))

    def close(self) -> None:
        """Free the GPU buffers and the stream (also done when the object is garbage-collected)."""
        cudart = self.cudart
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        # context before engine before runtime
        for attr in ("context", "engine", "runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


# ---- the backend ---------------------------------------------------------------------------------------

class TensorRTBackend:
    """Implements :class:`peft_export.runtime.backend.Backend` over ``encoder.engine`` + ``decoder.engine``.

    Prompt batches larger than the decoder profile's maximum are split into chunks (and a chunk smaller than its
    minimum is padded with copies of its last prompt, which are dropped again); a prompt with more or fewer points
    than the profile allows is refused with the option to rebuild with.
    """

    name = "tensorrt"

    @classmethod
    def unavailable(cls, folder: Path, manifest: Manifest) -> str | None:
        if not (Path(folder) / ENGINE_META).is_file():
            return f"no TensorRT engines in {folder} (build them with `peft-export build-engine {folder}`)"
        try:
            tensorrt_env.import_tensorrt()
            tensorrt_env.import_cudart()
        except MissingDependencyError as exc:
            return str(exc)
        return None

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, options) -> TensorRTBackend:
        return cls(folder, manifest=manifest)

    def __init__(self, out_dir: str | os.PathLike, *, manifest: Manifest | None = None, device: int = 0,
                 verify_files: bool = True):
        self.out_dir = Path(out_dir)
        self.manifest = manifest or read_manifest(self.out_dir, verify_files=False)
        m = self.manifest
        self.meta = read_engine_meta(self.out_dir, m, verify_files=verify_files)
        env = tensorrt_env.environment(device)
        trt, cudart = env["trt"], env["cudart"]
        check_engine_compatible(self.meta, env["capabilities"]["version"], env["gpu"], self.out_dir)
        self.gpu = env["gpu"]
        runners = {}
        try:
            for role, (fname, _) in ENGINES.items():
                plan = member_path(self.out_dir, self.meta["engines"][role]["path"], f"the {role} engine").read_bytes()
                runners[role] = EngineRunner(trt, cudart, plan, fname)
        except BaseException:
            for r in runners.values():
                r.close()
            raise
        self.encoder, self.decoder = runners["encoder"], runners["decoder"]
        self._instance = None  # instance_decoder.onnx with ONNX Runtime (CUDA), loaded when first used
        if len(self.encoder.inputs) != 1:
            raise DataError(f"{self.out_dir}: encoder.engine should have one input, has {self.encoder.inputs}")
        self._enc_input = self.encoder.inputs[0]
        self._enc_output = "image_embeddings" if "image_embeddings" in self.encoder.outputs else self.encoder.outputs[0]
        enc_prof = self.encoder.profile.get(self._enc_input)
        baked = bool(m.baked_preprocessing)
        absent = [n for n in (*DECODER_INPUTS, *DECODER_OUTPUTS) if n not in (*self.decoder.inputs,
                                                                              *self.decoder.outputs)]
        if absent:
            raise DataError(f"{self.out_dir}: decoder.engine lacks {absent[0]!r}: it must be built from "
                            "decoder_lowres.onnx")
        prof = self.decoder.profile.get("point_coords")
        if prof is None:  # a fully static decoder
            shape = tuple(int(d) for d in self.decoder.engine.get_tensor_shape("point_coords"))
            prof = (shape, shape, shape)
        self.batch_range = (prof[0][0], prof[2][0])
        self.points_range = (prof[0][1], prof[2][1])
        # images per encoder call: the profile's batch range (engines of batch-axis exports), else 1
        self.info = manifest_info(m, self.name, str(self.out_dir),
                                  max_batch=1 if baked or enc_prof is None else int(enc_prof[2][0]), on_gpu=True,
                                  precision=self.meta.get("precision") or m.precision,
                                  details={"gpu": self.gpu.get("name"), "tensorrt": self.meta.get("tensorrt_version")})

    def embed(self, x: np.ndarray) -> np.ndarray:
        """``x``: preprocessed (B, 3, S, S) float32 images (run in chunks of the engine profile's largest batch),
        or for a baked graph the resized uint8 image."""
        if self.info.baked_preprocessing:
            out = self.encoder.run({self._enc_input: np.ascontiguousarray(x, np.uint8)})[self._enc_output]
            return out.astype(np.float32, copy=False)
        x = np.ascontiguousarray(x, np.float32)
        step = self.info.max_batch
        outs = [self.encoder.run({self._enc_input: x[s: s + step]})[self._enc_output] for s in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def decode(self, embedding, coords, labels, mask_input=None):
        coords = np.asarray(coords, np.float32)
        labels = np.asarray(labels, np.float32)
        b, n = coords.shape[:2]
        lo, hi = self.points_range
        if not lo <= n <= hi:
            raise UsageError(f"a prompt with {n} points (padding included) does not fit decoder.engine, built for "
                             f"{lo} to {hi} points; rebuild with `peft-export build-engine {self.out_dir} "
                             f"--{'max' if n > hi else 'min'}-points {n} --force`")
        mask_input, has = mask_prompt_inputs(b, mask_input, self.info.mask_input_size)
        emb = np.ascontiguousarray(embedding, np.float32)
        bmin, bmax = self.batch_range
        lows, ious = [], []
        for s in range(0, b, bmax):
            parts = [coords[s: s + bmax], labels[s: s + bmax], mask_input[s: s + bmax], has[s: s + bmax]]
            k = len(parts[0])
            if k < bmin:  # pad with copies of the last prompt (prompts are independent), dropped below
                parts = [np.concatenate([p, np.repeat(p[-1:], bmin - k, axis=0)]) for p in parts]
            out = self.decoder.run({"image_embeddings": emb, "point_coords": parts[0], "point_labels": parts[1],
                                    "mask_input": parts[2], "has_mask_input": parts[3]})
            lows.append(out["low_res_masks"][:k].astype(np.float32, copy=False))
            ious.append(out["iou_predictions"][:k].astype(np.float32, copy=False))
        return np.concatenate(lows), np.concatenate(ious)

    def instance_maps(self, embedding: np.ndarray) -> np.ndarray:
        """The instance decoder runs its ONNX graph with ONNX Runtime (CUDA where it can): its engine is not used
        yet."""
        if not self.info.instance_decoder:
            raise no_instance_decoder(self.info)
        if self._instance is None:
            from peft_export.runtime.onnx_backend import _import_ort, default_providers, ort_session

            self._instance = ort_session(self.manifest.path_of(self.out_dir, "instance_decoder"),
                                         default_providers(_import_ort()))
        return self._instance.run(["instance_maps"], {
            "image_embeddings": np.ascontiguousarray(embedding, np.float32)})[0]

    def close(self) -> None:
        for r in (getattr(self, "encoder", None), getattr(self, "decoder", None)):  # a half-built backend too
            if r is not None:
                r.close()
