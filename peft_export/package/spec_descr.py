"""The bioimage.io description (``bioimageio.spec`` model 0.5) of a package staged in a folder.

Only this module and :func:`peft_export.package.bioimageio.validate_package` import bioimageio.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.errors import UsageError, first_line
from peft_export.manifest import Manifest
from peft_export.package import content, docs
from peft_export.package.readme import render_readme

CHANNELS_RGB = ("red", "green", "blue")
INSTANCE_CHANNELS = ("foreground", "center_distance", "boundary_distance")


@dataclass
class Facts:
    """What the builder learnt while staging, for the description and the README."""

    name: str
    license: str
    batch: int | None  # 1, or None for a dynamic batch axis
    preprocessing: list[dict]  # the spec's steps as plain dicts (id + kwargs)
    preprocessing_text: list[str]
    postprocessing: dict
    test_image: str
    test_image_name: str
    readme_facts: docs.ReadmeFacts

    def readme(self, own_check: dict | None) -> docs.ReadmeFacts:
        return replace(self.readme_facts, own_check=own_check or {})


def _batch_of(manifest: Manifest) -> int | None:
    dims = (manifest.files["encoder"].get("inputs") or [{}])[0].get("shape") or []
    if manifest.baked_preprocessing or not dims:
        return 1
    return 1 if dims[0] == 1 else None


def preprocessing_steps(manifest: Manifest) -> tuple[list[dict], list[str]]:
    """The model's preprocessing as the spec's steps (and in words). Baked exports: none (in the graph)."""
    spec = manifest.preprocess_spec
    if manifest.baked_preprocessing:
        return [], [f"none declared: the graph takes the uint8 image on a 0-255 scale and normalises it itself "
                    f"({spec.mode} mode, baked in at export)"]
    rng = {"id": "scale_range", "kwargs": {"axes": ["channel", "y", "x"], "min_percentile": 0.0,
                                           "max_percentile": 100.0}}
    if spec.mode == "minmax":
        return [rng], ["`scale_range` over channel, y, x (percentiles 0 and 100): each tile min-max scaled to "
                       "[0, 1] by its own range (the model's preprocessing, as LiteMedSAM's)"]
    zmuv = {"id": "fixed_zero_mean_unit_variance",
            "kwargs": {"axis": "channel", "mean": list(spec.pixel_mean), "std": list(spec.pixel_std)}}
    return [rng, {"id": "scale_linear", "kwargs": {"gain": 255.0}}, zmuv], [
        "`scale_range` over channel, y, x (percentiles 0 and 100): min-max to [0, 1]",
        "`scale_linear` gain 255: SAM's 0-255 scale",
        f"`fixed_zero_mean_unit_variance` along channel: SAM's pixel mean {list(spec.pixel_mean)} and std "
        f"{list(spec.pixel_std)}"]


def instance_settings(manifest: Manifest) -> dict:
    """The instance decoder's post-processing defaults the export recorded (else the runtime's defaults)."""
    extra = (manifest.extra or {}).get("instance_decoder") or {}
    recorded = extra.get("postprocessing") or extra.get("defaults") or {}
    try:
        from peft_export.runtime.instances import InstanceOptions

        return InstanceOptions.from_dict(recorded).to_dict()
    except ImportError:
        return dict(recorded)


def _pictures(stage: Path, kind: str, square: np.ndarray, expected: np.ndarray, embedding: np.ndarray,
              post: dict, prompted: np.ndarray | None) -> None:
    """sample_input.png / sample_output.png (8-bit pictures of the test tensors, for people) and cover.png."""
    content.save_png(stage / "sample_input.png", content.gray_u8(square))
    if kind == "instance":
        pca = None
        content.save_png(stage / "sample_output.png",
                         (np.clip(expected[0], 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0))
    else:
        pca = content.embedding_pca(embedding)
        content.save_png(stage / "sample_output.png", pca)
    content.save_png(stage / "cover.png", content.cover_image(square, kind, expected, pca, post, prompted=prompted))


def write_files(stage: Path, manifest: Manifest, kind: str, square: np.ndarray, test_input: np.ndarray,
                expected: np.ndarray, embedding: np.ndarray, sample: content.SampleImage, options,
                prompted: np.ndarray | None = None) -> Facts:
    """Test tensors, sample pictures, cover and a first README in ``stage``; what the description needs."""
    np.save(stage / "test_input.npy", test_input)
    np.save(stage / "test_output.npy", expected.astype(np.float32))
    post = instance_settings(manifest) if kind == "instance" else {}
    _pictures(stage, kind, square, expected, embedding, post, prompted)
    pre, pre_text = preprocessing_steps(manifest)
    name = options.name or docs.default_name(manifest, kind)
    lic = options.license or docs.default_license(manifest.model)
    readme = docs.ReadmeFacts(
        name=name, kind=kind, manifest=manifest,
        input_axes="y, x, channel; uint8" if manifest.baked_preprocessing else "batch, channel, y, x; float32",
        input_shape=list(test_input.shape), output_shape=list(expected.shape), preprocessing=pre_text,
        test_image=sample.description, own_check={}, weights_file="model.onnx" if kind == "instance" else
        "encoder.onnx", postprocessing=post, cites=docs.citations(manifest, kind, sample.name),
        license=f"{lic} ({docs.LICENSE_NOTES.get(manifest.model, 'random test weights')})",
        validated=bool(options.validate_package))
    (stage / "README.md").write_text(render_readme(readme))
    return Facts(name, lic, _batch_of(manifest), pre, pre_text, post, sample.description, sample.name, readme)


def _axes(v: Any, manifest: Manifest, kind: str, facts: Facts):
    s = manifest.preprocess_spec.img_size
    batch = v.BatchAxis(size=facts.batch)
    rgb = v.ChannelAxis(channel_names=[v.Identifier(c) for c in CHANNELS_RGB])
    if manifest.baked_preprocessing:
        ins = [v.SpaceInputAxis(id=v.AxisId("y"), size=s), v.SpaceInputAxis(id=v.AxisId("x"), size=s), rgb]
    else:
        ins = [batch, rgb, v.SpaceInputAxis(id=v.AxisId("y"), size=s), v.SpaceInputAxis(id=v.AxisId("x"), size=s)]
    out_batch = v.BatchAxis(size=1 if manifest.baked_preprocessing else facts.batch)
    if kind == "instance":
        names = [v.Identifier(c) for c in INSTANCE_CHANNELS]
        return ins, [out_batch, v.ChannelAxis(channel_names=names), v.SpaceOutputAxis(id=v.AxisId("y"), size=s),
                     v.SpaceOutputAxis(id=v.AxisId("x"), size=s)]
    c, h, w = manifest.embedding
    names = [v.Identifier(f"embedding_{i:03d}") for i in range(c)]
    return ins, [out_batch, v.ChannelAxis(channel_names=names),
                 v.SpaceOutputAxis(id=v.AxisId("y"), size=h, scale=s / h),
                 v.SpaceOutputAxis(id=v.AxisId("x"), size=w, scale=s / w)]


def _preprocessing(v: Any, steps: list[dict]) -> list:
    out = []
    for step in steps:
        kw = dict(step["kwargs"])
        if step["id"] == "scale_range":
            kw["axes"] = [v.AxisId(a) for a in kw["axes"]]
            out.append(v.ScaleRangeDescr(kwargs=v.ScaleRangeKwargs(**kw)))
        elif step["id"] == "scale_linear":
            out.append(v.ScaleLinearDescr(kwargs=v.ScaleLinearKwargs(**kw)))
        elif step["id"] == "fixed_zero_mean_unit_variance":
            kw["axis"] = v.AxisId(kw["axis"])
            out.append(v.FixedZeroMeanUnitVarianceDescr(kwargs=v.FixedZeroMeanUnitVarianceAlongAxisKwargs(**kw)))
    return out


def _tensors(v: Any, stage: Path, manifest: Manifest, kind: str, facts: Facts):
    ins, outs = _axes(v, manifest, kind, facts)
    baked = manifest.baked_preprocessing
    inp = v.InputTensorDescr(
        id=v.TensorId("image"), axes=ins,
        description="image tile, grayscale as 3 equal channels" + ("; uint8 0-255" if baked else ""),
        data=v.IntervalOrRatioDataDescr(type="uint8" if baked else "float32"),
        test_tensor=v.FileDescr(source=stage / "test_input.npy"),
        sample_tensor=v.FileDescr(source=stage / "sample_input.png"),
        preprocessing=_preprocessing(v, facts.preprocessing))
    out_id, out_text = (("instance_maps", "foreground, centre distance, boundary distance (sigmoid)")
                        if kind == "instance" else ("image_embeddings", "SAM image embedding"))
    out = v.OutputTensorDescr(
        id=v.TensorId(out_id), axes=outs, description=out_text,
        data=v.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0) if kind == "instance" else (None, None)),
        test_tensor=v.FileDescr(source=stage / "test_output.npy"),
        sample_tensor=v.FileDescr(source=stage / "sample_output.png"))
    return inp, out


def _config(manifest: Manifest, kind: str, facts: Facts, n_params: int) -> dict:
    src = manifest.source or {}
    arch = "SAM ViT" if manifest.model.startswith("vit") and manifest.model != "vit_t" else "TinyViT (SAM)"
    return {
        "bioimageio": {
            "architecture_type": arch,
            "architecture_description": f"{docs.pretty_model(manifest.model)} image encoder"
            + (" + micro-sam-style instance decoder (UNETR without skips)" if kind == "instance" else ""),
            "task": "instance segmentation" if kind == "instance" else "image embedding for promptable segmentation",
            "model_parameter_count": int(n_params),
            "training": {"training_preprocessing": "; ".join(facts.preprocessing_text),
                         "peft": docs.peft_summary(manifest), "training_data": docs.training_record(manifest)},
        },
        "peft_export": {
            "kind": kind, "model": manifest.model, "input_size": manifest.preprocess_spec.img_size,
            "preprocess": manifest.preprocess, "baked_preprocessing": manifest.baked_preprocessing,
            "precision": manifest.precision, "embedding": manifest.embedding, "multimask": manifest.multimask,
            "instance_postprocessing": facts.postprocessing or None,
            "verified": manifest.verified, "parity_passed": (manifest.parity or {}).get("passed"),
            "peft": src.get("peft"), "merged": src.get("merged"),
            "export_files": {r: e.get("sha256") for r, e in manifest.files.items()},
        },
    }


def _n_params(graph: list[Path]) -> int:
    import onnx

    model = onnx.load(str(graph[0]), load_external_data=True)
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


# the description's fields that come from the user's options (a bad value is theirs to fix)
USER_FIELDS = {("ModelDescr", "name"): "--name", ("ModelDescr", "license"): "--license",
               ("ModelDescr", "tags"): "--tag", ("Author", "name"): "--author",
               ("Author", "github_user"): "--github-user"}


@contextmanager
def _user_errors(options):
    """bioimageio.spec's refusals of option values as one line naming the option (UsageError); a GitHub user it
    cannot look up (no network) likewise. Anything else is ours and propagates."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as exc:
        err = exc.errors()[0]
        option = USER_FIELDS.get((exc.title, str(err["loc"][0]) if err["loc"] else ""))
        if option is None:
            raise
        msg = err["msg"].split(" [")[0][:200]
        if option == "--license":
            msg = "not an SPDX licence identifier (e.g. Apache-2.0, MIT, CC-BY-4.0)"
        elif "_has_no_slash" in msg:
            msg = "no '/' or '\\' allowed"
        raise UsageError(f"{option} {err.get('input')!r} is refused by bioimageio.spec: {msg}") from None
    except Exception as exc:
        if not type(exc).__module__.startswith(("httpx", "httpcore")):
            raise
        raise UsageError(f"cannot check --github-user {options.github_user!r}: bioimageio.spec looks it up on "
                         f"api.github.com, which is not reachable ({first_line(exc)}); connect to the internet or "
                         "leave --github-user out (the zoo then asks for a maintainer at upload)") from None


def model_description(stage: Path, manifest: Manifest, kind: str, graph: list[Path], attachments: list[Path],
                      facts: Facts, options):
    """The ModelDescr of the staged folder (bioimageio.spec validates it here: a bad field raises; one the user's
    options gave is a UsageError naming the option)."""
    from bioimageio.spec.generic.v0_3 import Author, CiteEntry
    from bioimageio.spec.model import v0_5 as v

    inp, out = _tensors(v, stage, manifest, kind, facts)
    external = v.FileDescr(source=graph[1]) if len(graph) > 1 else None
    with _user_errors(options):
        authors = [Author(name=n, github_user=options.github_user if i == 0 else None)
                   for i, n in enumerate(options.authors)]
        return v.ModelDescr(
            name=facts.name, description=docs.description(manifest, kind), authors=authors,
            cite=[CiteEntry(text=t, doi=d) for t, d in facts.readme_facts.cites],
            license=facts.license, tags=docs.tags(manifest, kind, tuple(options.tags)),
            documentation=v.FileDescr(source=stage / "README.md"), covers=[v.FileDescr(source=stage / "cover.png")],
            attachments=[v.FileDescr(source=p) for p in attachments], inputs=[inp], outputs=[out],
            weights=v.WeightsDescr(onnx=v.OnnxWeightsDescr(source=graph[0], opset_version=manifest.opset,
                                                           external_data=external)),
            config=_config(manifest, kind, facts, _n_params(graph)))


def save_rdf(descr, stage: Path) -> Path:
    from bioimageio.spec import save_bioimageio_package_as_folder

    return save_bioimageio_package_as_folder(descr, output_path=stage)
