"""bioimage.io model packages (``bioimageio.spec`` model format 0.5) from peft-export export folders.

    from peft_export.package import PackageOptions, build_package
    result = build_package("lora_onnx/", "model.zip", PackageOptions(authors=["Ada Lovelace"]))

The package holds one ONNX graph: the automatic-instance-segmentation path (encoder + instance decoder composed,
image -> foreground / centre-distance / boundary-distance maps) when the export has an instance decoder, else the
image encoder (image -> embedding; the prompt decoders are attached). Also: the preprocessing as the spec's own
steps, test input/output tensors (the real DSB2018 tile by default; the expected output computed by the export
folder's runtime from its separate graphs), sample pictures, a cover, README, citations, licence, the training
record, and the export manifest as an attachment.

Gates, in order (nothing is written unless all pass): the export was verified (or ``allow_unverified``); the
package's own graph + declared preprocessing reproduce the expected output (:mod:`peft_export.runtime.package`,
max |diff| <= 1e-4 + 1e-4 * max|ref|); ``bioimageio.core``'s test of the model (format and reproduction of the
test outputs) passes, when ``validate``. The zip is built next to OUTPUT and renamed into place.

A PyTorch (``pytorch_state_dict``) weights entry is not offered: the spec needs an architecture for it — a Python
source file shipped in the package or a callable from an installed library — and SAM's encoder with its
LayerNorm(eps=1e-6) cannot be configured from YAML kwargs of segment_anything's classes, while TinyViT
(LiteMedSAM) and the instance decoder exist only in peft-export's code: either way the package would need our code
and torch, which is what ONNX weights avoid.
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.errors import MissingDependencyError, UsageError, VerificationError
from peft_export.files import clean_stale, crash_point, move_into_place, scratch_dir
from peft_export.manifest import MANIFEST_NAME, Manifest, read_manifest
from peft_export.package import compose, content, spec_descr
from peft_export.package.options import PackageOptions
from peft_export.package.readme import render_readme
from peft_export.paths import refuse_inputs
from peft_export.runtime import watershed_op
from peft_export.runtime.instances import InstanceOptions, maps_to_instances
from peft_export.runtime.package import MANIFEST_ATTACHMENT, PackageModel

INSTALL = "pip install 'peft-export[bioimageio]'"
ATOL = RTOL = 1e-4  # the package's graph vs the export's separate graphs (fp32 arithmetic, same operations)
WARNING_SEVERITY = 30  # bioimageio.spec: 20 info, 30 warning, 35 alert
STORED_SUFFIXES = (".onnx", ".data")  # float weights barely compress: stored, so tools read them without inflating


@dataclass
class PackageResult:
    path: Path
    kind: str  # "instance" or "encoder"
    name: str
    files: list[str]
    own_check: dict[str, Any]
    validation: dict[str, Any] | None
    seconds: dict[str, float]

    def to_dict(self) -> dict:
        return {"package": str(self.path), "kind": self.kind, "name": self.name, "files": self.files,
                "own_check": self.own_check, "validation": self.validation, "seconds": self.seconds}


def require_spec():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"bioimageio.spec is not installed: {INSTALL}") from None


def package_kind(manifest: Manifest) -> str:
    return "instance" if "instance_decoder" in manifest.files else "encoder"


def check_request(export_dir: Path, output: Path, options: PackageOptions) -> Manifest:
    """Everything that can be refused before any work, one line each."""
    if output.suffix.lower() != ".zip":
        raise UsageError(f"the package must be a .zip file, got {output.name}")
    refuse_inputs([output], [export_dir, options.test_image], replaces=True)
    if output.exists() and not options.force:
        raise UsageError(f"output {output} already exists; pass --force to overwrite it")
    if output.is_dir():
        raise UsageError(f"output {output} is a folder; give a .zip file path")
    if not options.authors:
        raise UsageError("a package names its authors (the people to contact): pass --author 'Your Name'")
    manifest = read_manifest(export_dir)
    if not manifest.verified and not options.allow_unverified:
        raise VerificationError(f"{export_dir} was exported without its parity check (verified: false); re-export it "
                                "without --no-verify, or pass --allow-unverified to package it anyway (the README "
                                "will say so)")
    return manifest


def _stage_graph(export_dir: Path, manifest: Manifest, kind: str, stage: Path) -> list[Path]:
    """The package's graph file(s) in ``stage``: the composed graph, or a copy of the encoder (+ .data)."""
    if kind == "instance":
        enc = compose.load_graph(manifest.path_of(export_dir, "encoder"))
        dec = compose.load_graph(manifest.path_of(export_dir, "instance_decoder"))
        return compose.save_graph(compose.compose_instance_graph(enc, dec), stage / "model.onnx")
    paths = [manifest.path_of(export_dir, "encoder")]
    if "encoder_data" in manifest.files:
        paths.append(manifest.path_of(export_dir, "encoder_data"))
    for p in paths:
        shutil.copy2(p, stage / p.name)
    return [stage / p.name for p in paths]


def _stage_attachments(export_dir: Path, manifest: Manifest, kind: str, stage: Path) -> list[Path]:
    out = [stage / MANIFEST_ATTACHMENT]
    shutil.copy2(export_dir / MANIFEST_NAME, out[0])
    if kind == "encoder":  # the prompt decoders: the unzipped package is also an export folder for prompting
        for role in ("decoder", "decoder_lowres"):
            p = manifest.path_of(export_dir, role)
            shutil.copy2(p, stage / p.name)
            out.append(stage / p.name)
    return out


def _own_check(stage: Path, test_input: np.ndarray, expected: np.ndarray,
               expected_post: np.ndarray | None = None) -> dict[str, Any]:
    """The package (its rdf, graph and declared preprocessing, read by the torch-free runtime) on the test input
    vs the export's own answer; for instance packages also the runtime's watershed with the settings the package
    declares for its post-processing step (on the export's maps) vs the test output's instance ids."""
    pkg = PackageModel(stage)
    got = pkg.run(test_input)
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    limit = ATOL + RTOL * float(np.max(np.abs(expected)))
    result = {"max_abs_diff": diff, "limit": limit, "passed": bool(got.shape == expected.shape and diff <= limit)}
    if not result["passed"]:
        raise VerificationError(f"the package's graph does not reproduce the export: max |diff| {diff:.3g} > "
                                f"{limit:.3g} (shape {got.shape} vs {expected.shape}); nothing written")
    if expected_post is not None:
        # on the export's maps, which the test output came from: the graph's own maps are held to them just above,
        # and on maps that differ by float noise (another graph partition, thread timing) a watershed may break a
        # tie the other way, which says nothing about the declared settings
        labels = maps_to_instances(expected[0], InstanceOptions.from_dict(pkg.instance_settings()))
        same = bool(np.array_equal(labels, expected_post[0, 0].astype(np.int32)))
        result.update(postprocessing_objects=int(labels.max()), postprocessing_equal=same)
        if not same:
            raise VerificationError("the package's declared post-processing does not reproduce the export's "
                                    "instances on the test input; nothing written")
    return result


def _stage_postprocessing(manifest: Manifest, kind: str, stage: Path, expected: np.ndarray) -> np.ndarray:
    """Instance packages: the watershed as the spec's custom post-processing step (its self-contained source file
    staged beside the graph); returns the test output after that step (channel 0: instance ids)."""
    if kind != "instance":
        return expected
    shutil.copy2(watershed_op.__file__, stage / spec_descr.POSTPROCESS_FILE)
    return watershed_op.instance_watershed(**spec_descr.instance_settings(manifest))(expected)


def zip_folder(folder: Path, zip_path: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name in names:
            stored = name.endswith(STORED_SUFFIXES)
            zf.write(folder / name, name, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                     compresslevel=None if stored else 6)
    return names


def validate_package(path: str | os.PathLike, devices: list[str] | None = None) -> dict[str, Any]:
    """``bioimageio.core``'s test of the model description (format + reproduction of the test outputs + runs at
    the declared sizes) -> status, each check, its warnings (severity warning and alert) and notes (info), the
    printed report. ONNX Runtime on CPU unless ``devices`` says."""
    try:
        from bioimageio.core import test_model
    except ImportError:
        raise MissingDependencyError(f"bioimageio.core is not installed (needed to validate): {INSTALL}") from None
    summary = test_model(str(path), devices=devices or ["CPUExecutionProvider"])
    checks, warnings, notes, errors = [], [], [], []
    for d in summary.details:
        checks.append({"name": d.name, "status": d.status})
        errors += [f"{_loc(e.loc)}{e.msg}" for e in d.errors]
        for w in d.warnings:
            (warnings if w.severity >= WARNING_SEVERITY else notes).append(f"{_loc(w.loc)}{w.msg}")
    return {"status": summary.status, "format_version": summary.format_version, "checks": checks,
            "warnings": warnings, "notes": notes, "errors": errors, "report": summary.format()}


def _loc(loc) -> str:
    return f"{'.'.join(map(str, loc))}: " if loc else ""


def build_package(export_dir: str | os.PathLike, output: str | os.PathLike, options: PackageOptions | None = None,
                  *, progress=None) -> PackageResult:
    """Build, check and write the package; see the module docstring. ``progress(message)`` reports each step."""
    options = options or PackageOptions()
    export_dir, output = Path(export_dir), Path(output)
    say = progress or (lambda msg: None)
    manifest = check_request(export_dir, output, options)
    require_spec()
    sample = content.load_test_image(options.test_image)  # a missing sample fails before any work
    kind, seconds = package_kind(manifest), {}
    clean_stale(output.parent)  # what a killed run left beside OUTPUT
    with scratch_dir(output) as tmp:  # beside OUTPUT: the finished zip is renamed into place
        stage = tmp / "package"
        stage.mkdir()
        t0 = time.perf_counter()
        say("composing the graph" if kind == "instance" else "copying the encoder graph")
        graph = _stage_graph(export_dir, manifest, kind, stage)
        attachments = _stage_attachments(export_dir, manifest, kind, stage)
        say("test tensors from the export's runtime")
        square = content.square_input(sample.image, manifest.preprocess_spec.img_size, name=sample.name)
        test_input = content.make_test_input(square, manifest.baked_preprocessing)
        expected, embedding = content.reference_output(export_dir, manifest, test_input, kind)
        test_output = _stage_postprocessing(manifest, kind, stage, expected)  # instance ids in channel 0
        prompted = (content.prompted_labels(export_dir, manifest, square, sample.labels) if kind == "encoder"
                    else None)  # the cover: the attached decoder on box prompts of the sample's objects
        facts = spec_descr.write_files(stage, manifest, kind, square, test_input, expected, embedding, sample,
                                       options, prompted, test_output=test_output)
        descr = spec_descr.model_description(stage, manifest, kind, graph, attachments, facts, options)
        spec_descr.save_rdf(descr, stage)
        seconds["build"] = round(time.perf_counter() - t0, 3)
        say("checking the package reproduces the export")
        own = _own_check(stage, test_input, expected, test_output if kind == "instance" else None)
        (stage / "README.md").write_text(render_readme(facts.readme(own)))  # with the check's figures
        descr = spec_descr.model_description(stage, manifest, kind, graph, attachments, facts, options)
        spec_descr.save_rdf(descr, stage)
        tmp_zip = tmp / output.name
        files = zip_folder(stage, tmp_zip)
        crash_point(f"zipped {output.name}")
        validation = None
        if options.validate_package:
            say("bioimageio.core: testing the package")
            t0 = time.perf_counter()
            validation = validate_package(tmp_zip)
            seconds["validate"] = round(time.perf_counter() - t0, 3)
            if validation["status"] != "passed":
                first = (validation["errors"] or ["see the report"])[0]
                raise VerificationError(f"bioimageio.core's test of the package failed: {first}; nothing written")
        move_into_place(tmp_zip, output)
    return PackageResult(output, kind, facts.name, files, own, validation, seconds)
