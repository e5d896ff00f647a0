"""bioimage.io model packages (issue 15): built from real exports, validated by bioimageio.core itself, run back
by the torch-free runtime against the export folder they came from, and refused on bad input.

Until exports carry the real instance decoder, the instance path is tested with a synthetic one made here: a small
ONNX graph with the instance decoder's I/O contract (``image_embeddings`` (B, C, h, w) -> ``instance_maps``
(B, 3, S, S), sigmoid), added to a copy of an export folder with its manifest entry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    import bioimageio.core
    import bioimageio.spec
except ImportError:  # pragma: no cover - the README's test command installs the extra
    pytest.skip("needs the bioimageio extra: pip install -e '.[bioimageio]'", allow_module_level=True)

from peft_export.errors import DataError
from peft_export.package import PackageOptions, build_package
from peft_export.package.compose import compose_instance_graph, load_graph
from peft_export.runtime.package import PackageModel

AUTHORS = ["peft-export tests"]
# the only warning bioimageio.core gives our packages, and why: no GitHub account is invented for the zoo
EXPLAINED_WARNINGS = ("Missing `maintainers` or any author in `authors` with a specified `github_user` name.",)
REPRODUCE = "Reproduce test outputs from test inputs (onnx)"
WATERSHED = {"foreground_threshold": 0.5, "center_distance_threshold": 0.5, "boundary_distance_threshold": 0.5,
             "foreground_smoothing": 1.0, "distance_smoothing": 1.6, "min_size": 0}


def synthetic_instance_decoder(c: int, h: int, w: int, s: int, opset: int, seed: int = 0):
    """image_embeddings (B, C, h, w) -> instance_maps (B, 3, S, S): 1x1 conv, bilinear upsampling, sigmoid."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.normal(0, 1, (3, c, 1, 1)) / np.sqrt(c)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.5, 3).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1, 1, s / h, s / w], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["image_embeddings", "w", "b"], ["logits"]),
             helper.make_node("Resize", ["logits", "", "scales"], ["up"], mode="linear"),
             helper.make_node("Sigmoid", ["up"], ["instance_maps"])]
    graph = helper.make_graph(
        nodes, "synthetic_instance_decoder",
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, ["B", c, h, w])],
        [helper.make_tensor_value_info("instance_maps", TensorProto.FLOAT, ["B", 3, s, s])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def add_instance_decoder(src: Path, dst: Path, decoder=None) -> Path:
    """A copy of export folder ``src`` with ``instance_decoder.onnx`` and its manifest entry (as the exporter
    writes them)."""
    import onnx

    from peft_export.export.graphs import describe_io
    from peft_export.manifest import file_entry, read_manifest, write_manifest

    shutil.copytree(src, dst)
    m = read_manifest(dst)
    c, h, w = m.embedding
    decoder = decoder or synthetic_instance_decoder(c, h, w, m.preprocess_spec.img_size, m.opset)
    path = dst / "instance_decoder.onnx"
    onnx.save(decoder, path)
    ins, outs = describe_io(decoder)
    m.files["instance_decoder"] = file_entry(path, inputs=ins, outputs=outs)
    m.extra["instance_decoder"] = {  # as export/instance.py records it (micro-sam's watershed defaults)
        "channels": ["foreground", "center_distance", "boundary_distance"], "output_size": m.preprocess_spec.img_size,
        "postprocessing": {"method": "seeded watershed (micro-sam AIS)", **WATERSHED}}
    write_manifest(dst, m)
    return dst


def _rdf(zip_path: Path) -> dict:
    import yaml

    with zipfile.ZipFile(zip_path) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def _export_maps(export_dir: Path, image: np.ndarray) -> np.ndarray:
    """The export folder's instance maps at the image size: its encoder, then its instance decoder (ONNX Runtime),
    cropped and resized like masks."""
    from peft_export.imaging import upscale_masks
    from peft_export.runtime.backend import prepare_input
    from peft_export.runtime.onnx_backend import OnnxBackend, ort_session

    be = OnnxBackend(export_dir)
    x, prep = prepare_input(be, image)
    dec = ort_session(export_dir / "instance_decoder.onnx")
    maps = dec.run(None, {"image_embeddings": be.embed(x)})[0][0]
    return upscale_masks(maps, prep.img_size, prep.resized_hw, prep.original_hw)


@pytest.fixture(scope="module")
def tiny_instance_export(tiny_export, tmp_path_factory) -> Path:
    return add_instance_decoder(tiny_export.out_dir, tmp_path_factory.mktemp("tiny_inst") / "onnx")


@pytest.fixture(scope="module")
def tiny_instance_package(tiny_instance_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_pkg") / "tiny_instance.zip"
    return build_package(tiny_instance_export, out, PackageOptions(authors=AUTHORS))


@pytest.fixture(scope="module")
def lite_encoder_package(lite_export_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("lite_pkg") / "lite_encoder.zip"
    return build_package(lite_export_fp32.out_dir, out, PackageOptions(authors=AUTHORS, tags=("lora-test",)))


def _assert_validated(result) -> None:
    v = result.validation
    assert v["status"] == "passed", v["report"]
    assert {c["name"]: c["status"] for c in v["checks"]}[REPRODUCE] == "passed"
    assert all(c["status"] == "passed" for c in v["checks"]), v["checks"]
    assert not v["errors"]
    assert set(v["warnings"]) <= set(EXPLAINED_WARNINGS), v["warnings"]


# ---- the instance path (composition) -------------------------------------------------------------------------

def test_composed_graph_is_encoder_then_instance_decoder(tiny_instance_export):
    from peft_export.runtime.onnx_backend import ort_session

    enc = load_graph(tiny_instance_export / "encoder.onnx")
    dec = load_graph(tiny_instance_export / "instance_decoder.onnx")
    merged = compose_instance_graph(enc, dec)
    assert [i.name for i in merged.graph.input] == ["image"]
    assert [o.name for o in merged.graph.output] == ["instance_maps"]
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 256, 256)).astype(np.float32)
    emb = ort_session(enc).run(None, {"image": x})[0]
    want = ort_session(dec).run(None, {"image_embeddings": emb})[0]
    got = ort_session(merged).run(None, {"image": x})[0]
    assert got.shape == want.shape == (1, 3, 256, 256)
    assert np.max(np.abs(got - want)) <= 1e-5


def test_composition_refuses_a_decoder_with_another_contract(tiny_instance_export):
    c, h, w = 64, 16, 16
    enc = load_graph(tiny_instance_export / "encoder.onnx")
    wrong = synthetic_instance_decoder(c, h, w, 256, 20)
    wrong.graph.input[0].name = "features"
    wrong.graph.node[0].input[0] = "features"
    with pytest.raises(DataError, match="exactly one input 'image_embeddings'"):
        compose_instance_graph(enc, wrong)
    renamed = synthetic_instance_decoder(c, h, w, 256, 20)
    renamed.graph.output[0].name = "maps"
    renamed.graph.node[-1].output[0] = "maps"
    with pytest.raises(DataError, match="no output 'instance_maps'"):
        compose_instance_graph(enc, renamed)


def test_tiny_instance_package_passes_bioimageio_core(tiny_instance_package):
    _assert_validated(tiny_instance_package)
    rdf = _rdf(tiny_instance_package.path)
    assert rdf["format_version"] == bioimageio.spec.model.v0_5.ModelDescr.implemented_format_version
    assert rdf["weights"]["onnx"]["source"] == "model.onnx" and set(rdf["weights"]) == {"onnx"}
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    steps = [s["id"] for s in inp["preprocessing"] if s["id"] != "ensure_dtype"]
    assert steps == ["scale_range", "scale_linear", "fixed_zero_mean_unit_variance"]  # vit_tiny: SAM's recipe
    assert out["id"] == "instance_maps"  # after the custom post-processing step: instance ids in channel 0
    assert [a.get("channel_names") for a in out["axes"] if a["type"] == "channel"] == [
        ["instance_ids", "center_distance", "boundary_distance"]]
    (step,) = [s for s in out["postprocessing"] if s["id"] != "ensure_dtype"]  # the spec appends ensure_dtype
    assert (step["id"], step["callable"], step["source"]) == ("custom", "instance_watershed", "instance_watershed.py")
    assert step["kwargs"]["center_distance_threshold"] == 0.5
    assert rdf["config"]["peft_export"]["kind"] == "instance" and rdf["license"] == "MIT"
    dois = {c["doi"] for c in rdf["cite"]}
    assert {"10.48550/arXiv.2502.00418", "10.48550/arXiv.2304.02643", "10.1038/s41592-024-02580-4"} <= dois
    with zipfile.ZipFile(tiny_instance_package.path) as zf:
        readme = zf.read("README.md").decode()
        assert "watershed" in readme and "center_distance_threshold" in readme
        assert "encoder.onnx" not in zf.namelist() and "decoder.onnx" not in zf.namelist()
        from io import BytesIO

        from PIL import Image

        cover = Image.open(BytesIO(zf.read("cover.png")))
        assert cover.size == (512, 256) and zf.getinfo("cover.png").file_size < 500_000


def _declared(pkg: PackageModel, square: np.ndarray) -> np.ndarray:
    """What a bioimage.io tool computes: the package's declared preprocessing + its graph, on an S x S image."""
    from peft_export.imaging import as_rgb

    return pkg.run(pkg.tensor_from_image(as_rgb(square)))[0]


def _runtime_maps(source, image: np.ndarray) -> np.ndarray:
    """The maps the runtime computes for an export folder or a package (the instance strategy's maps)."""
    from peft_export.runtime.instances import image_maps
    from peft_export.runtime.segmenter import Segmenter

    seg = Segmenter(source)
    seg.set_image(image)
    return image_maps(seg)


def test_instance_package_gives_the_export_folders_maps(tiny_instance_package, tiny_instance_export, dsb_val):
    """Round trip: the package's graph, run from the zip with its declared preprocessing (as bioimage.io tools
    do) and through the torch-free runtime, gives the export folder's maps (its two graphs, one after the other)."""
    from peft_export.runtime.backends import open_model
    from peft_export.runtime.package import InstancePackageBackend
    from peft_export.runtime.segmenter import Segmenter

    tile = dsb_val[0].image  # 256 x 256: the graph's input size, no resizing
    want = _export_maps(tiny_instance_export, tile)
    assert want.shape == (3, *tile.shape)
    assert np.max(np.abs(_declared(PackageModel(tiny_instance_package.path), tile) - want)) <= 1e-4
    be = open_model(tiny_instance_package.path)  # what Segmenter and predict open for a .zip
    assert isinstance(be, InstancePackageBackend) and be.info.instance_decoder and not be.info.prompt_decoder
    with pytest.raises(Exception, match="no prompt decoder"):
        be.decode(None, None, None)
    assert np.max(np.abs(_runtime_maps(tiny_instance_package.path, tile) - want)) <= 1e-4
    from peft_export.runtime.instances import maps_to_instances

    seg = Segmenter(tiny_instance_package.path)
    seg.set_image(tile)
    labels = seg.segment()  # the instance path of predict --auto, on the package
    assert np.array_equal(labels, maps_to_instances(want)) and labels.max() > 0


def test_package_with_the_real_instance_decoder_graph(tiny_export, tmp_path):
    """The instance decoder the exporter writes (peft_export.export.instance: micro-sam's UNETR decoder traced with
    torch.export; random weights here), composed and validated like the synthetic one."""
    instance = pytest.importorskip("peft_export.export.instance", reason="the instance decoder has not landed")
    from peft_export.manifest import read_manifest
    from peft_export.models.instance_decoder import InstanceDecoder, InstanceDecoderConfig, levels_for

    m = read_manifest(tiny_export.out_dir)
    c, h, w = m.embedding
    s = m.preprocess_spec.img_size
    decoder = InstanceDecoder(InstanceDecoderConfig(c, levels_for(s, h), features=8))
    graph = instance.trace(decoder, (c, h, w), m.opset).model
    export = add_instance_decoder(tiny_export.out_dir, tmp_path / "onnx", decoder=graph)
    result = build_package(export, tmp_path / "real.zip", PackageOptions(authors=AUTHORS))
    _assert_validated(result)
    assert result.kind == "instance" and result.own_check["max_abs_diff"] <= result.own_check["limit"]
    tile = np.random.default_rng(1).random((200, 256)).astype(np.float32)
    assert np.max(np.abs(_runtime_maps(result.path, tile) - _export_maps(export, tile))) <= 1e-4


def test_instance_output_through_bioimageio_core(tiny_instance_package, dsb_val, tmp_path):
    """bioimageio.core runs the package (graph + its custom post-processing step, the shipped source file) on the
    DSB2018 tile: channel 0 holds the same instances as peft-export's runtime on the package (object-matched IoU
    1.0), channels 1-2 the distance maps; the test output's instance ids are those too."""
    from bioimageio.core import create_prediction_pipeline, load_description
    from bioimageio.core.digest_spec import get_test_input_sample

    from peft_export.metrics import matched_iou
    from peft_export.runtime.instances import InstanceOptions, maps_to_instances

    pkg = PackageModel(tiny_instance_package.path)
    descr = load_description(str(tiny_instance_package.path))
    sample = get_test_input_sample(descr)
    with create_prediction_pipeline(descr, devices=["CPUExecutionProvider"]) as pipeline:
        out = pipeline.predict_sample_without_blocking(sample)
    (tensor,) = out.members.values()
    got = tensor.data.values
    maps = pkg.run(np.load(_extract(tiny_instance_package.path, "test_input.npy")))
    ours = maps_to_instances(maps[0], InstanceOptions.from_dict(pkg.instance_settings()))
    assert got.shape == maps.shape and ours.max() > 0
    assert np.array_equal(got[0, 0].astype(np.int32), ours) and matched_iou(got[0, 0].astype(np.int32), ours) == 1
    assert np.max(np.abs(got[0, 1:] - maps[0, 1:])) <= 1e-5
    expected = np.load(_extract(tiny_instance_package.path, "test_output.npy"))
    assert np.array_equal(expected[0, 0].astype(np.int32), ours)
    assert tiny_instance_package.own_check["postprocessing_equal"]


def test_package_without_postprocessing_is_refused(run_cli, tiny_instance_package, dsb_val, tmp_path):
    """An instance package whose rdf declares no post-processing step (an older peft-export's): predict --auto on
    it is one line and writes nothing; --method apg on an instance package (no prompt decoder) too."""
    import tifffile
    import yaml

    folder = tmp_path / "old_pkg"
    with zipfile.ZipFile(tiny_instance_package.path) as zf:
        zf.extractall(folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    rdf["outputs"][0].pop("postprocessing")
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    img = tmp_path / "tile.tif"
    tifffile.imwrite(img, dsb_val[0].image)
    out = tmp_path / "labels.tif"
    for pkg, args, message in ((folder, (), "carries no post-processing step"),
                               (tiny_instance_package.path, ("--method", "apg"), "needs a prompt decoder")):
        code, _, err = run_cli("predict", str(pkg), str(img), "--auto", *args, "-o", str(out))
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code, _, err = run_cli("predict", str(tiny_instance_package.path), str(img), "--auto", "-o", str(out))
    assert code == 0 and out.exists() and "seeded watershed" in err, err


# ---- the encoder path (LiteMedSAM, real weights) -----------------------------------------------------------

def test_lite_encoder_package_passes_bioimageio_core(lite_encoder_package):
    _assert_validated(lite_encoder_package)
    rdf = _rdf(lite_encoder_package.path)
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    assert [s["id"] for s in inp["preprocessing"] if s["id"] != "ensure_dtype"] == ["scale_range"]
    assert out["id"] == "image_embeddings" and rdf["weights"]["onnx"]["source"] == "encoder.onnx"
    assert {a["source"] for a in rdf["attachments"]} == {"peft_export_manifest.json", "decoder.onnx",
                                                         "decoder_lowres.onnx"}
    assert rdf["license"] == "Apache-2.0" and "lora-test" in rdf["tags"] and "lora" in rdf["tags"]
    assert "10.1038/s41467-024-44824-z" in {c["doi"] for c in rdf["cite"]}  # MedSAM, for LiteMedSAM
    assert "lora" in rdf["description"] and "Not recorded" in rdf["config"]["bioimageio"]["training"][
        "training_data"]  # the test checkpoint has no training-data record
    test_in = np.load(_extract(lite_encoder_package.path, "test_input.npy"))
    from peft_export.data.dataset import dsb2018_tiles

    assert np.array_equal(test_in[0, 0], dsb2018_tiles("val")[0].image.astype(np.float32))  # the real tile
    from PIL import Image

    cover = np.asarray(Image.open(_extract(lite_encoder_package.path, "cover.png")))
    assert cover.shape == (256, 512, 3)  # the tile | its objects segmented by box prompts (tinted, white borders)
    white = (cover == 255).all(axis=-1)  # object borders; the plain tile only has its brightest pixel(s) white
    assert white[:, 256:].sum() > 500 and white[:, :256].sum() < 20


def _extract(zip_path: Path, name: str) -> Path:
    out = zip_path.parent / f"_{name}"
    with zipfile.ZipFile(zip_path) as zf:
        out.write_bytes(zf.read(name))
    return out


def test_lite_encoder_package_prompts_and_embeds_like_the_export(lite_encoder_package, lite_export_fp32, dsb_val):
    from peft_export.runtime.onnx_backend import OnnxBackend
    from peft_export.runtime.segmenter import Segmenter

    sample = dsb_val[0]
    ids = [i for i in np.unique(sample.labels) if i][:8]
    boxes = []
    for i in ids:
        ys, xs = np.nonzero(sample.labels == i)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    be = OnnxBackend(lite_export_fp32.out_dir)
    ref, seg = Segmenter(be), Segmenter(lite_encoder_package.path)
    ref.set_image(sample.image)
    seg.set_image(sample.image)
    a, b = ref.predict(boxes=boxes), seg.predict(boxes=boxes)
    assert np.max(np.abs(a.low_res - b.low_res)) <= 1e-4 and np.array_equal(a.masks, b.masks)
    # the package's own preprocessing (rdf steps) vs the export runtime's
    from peft_export.runtime.backend import prepare_input

    want = be.embed(prepare_input(be, sample.image)[0])[0]
    assert np.max(np.abs(_declared(PackageModel(lite_encoder_package.path), sample.image) - want)) <= 1e-4


def test_package_runtime_imports_neither_torch_nor_bioimageio(tiny_instance_package, dsb_val, tmp_path):
    np.save(tmp_path / "tile.npy", dsb_val[0].image)
    code = f"""
import sys, numpy as np
from peft_export.runtime import Segmenter
seg = Segmenter({str(tiny_instance_package.path)!r})
seg.set_image(np.load({str(tmp_path / 'tile.npy')!r}))
labels = seg.segment()
assert labels.shape == (256, 256) and labels.max() > 0, labels.shape
bad = [m for m in ("torch", "bioimageio", "onnx") if m in sys.modules]
assert not bad, bad
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_corrupt_package_is_refused(tiny_instance_package, tmp_path):
    folder = tmp_path / "pkg"
    with zipfile.ZipFile(tiny_instance_package.path) as zf:
        zf.extractall(folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its sha256"):
        PackageModel(folder)


# ---- the CLI, and bad input -------------------------------------------------------------------------------

def test_cli_packages_validates_and_refuses_to_overwrite(run_cli, tiny_export, tmp_path):
    out = tmp_path / "tiny.zip"
    code, stdout, err = run_cli("package", str(tiny_export.out_dir), "-o", str(out), "--author", AUTHORS[0],
                                "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["kind"] == "encoder" and data["validation"]["status"] == "passed"
    assert data["own_check"]["passed"] and "maintainers" in err  # the explained warning is printed, with why
    assert "GitHub account" in err
    before = out.read_bytes()
    code, _, err = run_cli("package", str(tiny_export.out_dir), "-o", str(out), "--author", AUTHORS[0])
    assert code == 2 and "already exists" in err and "--force" in err
    assert out.read_bytes() == before
    code, _, err = run_cli("package", str(tiny_export.out_dir), "-o", str(out), "--author", AUTHORS[0], "--force",
                           "--no-validate", "--name", "Tiny encoder again")
    assert code == 0, err
    assert _rdf(out)["name"] == "Tiny encoder again"


def test_cli_predict_runs_an_encoder_package_like_its_export(run_cli, tiny_export, dsb_val, tmp_path):
    """Round trip through the CLI: `predict model.zip` with box prompts writes the export folder's labels."""
    import tifffile

    pkg = tmp_path / "tiny.zip"
    code, _, err = run_cli("package", str(tiny_export.out_dir), "-o", str(pkg), "--author", AUTHORS[0],
                           "--no-validate")
    assert code == 0, err
    sample = dsb_val[0]
    tifffile.imwrite(tmp_path / "tile.tif", sample.image)
    ids = [i for i in np.unique(sample.labels) if i][:5]
    boxes = [[int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
             for ys, xs in (np.nonzero(sample.labels == i) for i in ids)]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    labels = {}
    for what, model in (("package", pkg), ("export", tiny_export.out_dir)):
        code, _, err = run_cli("predict", str(model), str(tmp_path / "tile.tif"), "--boxes",
                               str(tmp_path / "boxes.json"), "-o", str(tmp_path / f"{what}.tif"))
        assert code == 0, err
        labels[what] = tifffile.imread(tmp_path / f"{what}.tif")
    assert labels["package"].shape == sample.image.shape
    assert np.array_equal(labels["package"], labels["export"])


def test_cli_refuses_an_unverified_export_unless_allowed(run_cli, tiny_export, tmp_path):
    from peft_export.manifest import read_manifest, write_manifest

    src = tmp_path / "unverified"
    shutil.copytree(tiny_export.out_dir, src)
    m = read_manifest(src)
    m.verified = False
    m.parity = {"verified": False, "reason": "exported with --no-verify"}
    write_manifest(src, m)
    out = tmp_path / "u.zip"
    code, _, err = run_cli("package", str(src), "-o", str(out), "--author", AUTHORS[0])
    assert code == 1 and "verified: false" in err and "--allow-unverified" in err and not out.exists()
    code, _, err = run_cli("package", str(src), "-o", str(out), "--author", AUTHORS[0], "--allow-unverified",
                           "--no-validate")
    assert code == 0, err
    with zipfile.ZipFile(out) as zf:
        assert "skipped its parity check" in zf.read("README.md").decode()


def test_cli_bad_input_one_line_each(run_cli, tiny_export, tmp_path, monkeypatch):
    exp = str(tiny_export.out_dir)
    out = str(tmp_path / "x.zip")
    code, _, err = run_cli("package", exp, "-o", out, "--author", "A", "--test-image", str(tmp_path / "nope.tif"))
    assert code == 1 and "image not found" in err
    code, _, err = run_cli("package", exp, "-o", out)
    assert code == 2 and "--author" in err
    code, _, err = run_cli("package", exp, "-o", str(tmp_path / "x.tar"), "--author", "A")
    assert code == 2 and ".zip" in err
    code, _, err = run_cli("package", str(tmp_path), "-o", out, "--author", "A")
    assert code == 1 and "manifest.json" in err
    from peft_export.data import dataset
    from peft_export.errors import MissingDependencyError

    def no_sample(split="val"):
        raise MissingDependencyError("package 'stardist' is not installed")

    code, _, err = run_cli("package", exp, "-o", out, "--author", "A", "--license", "Apache", "--no-validate")
    assert code == 2 and "--license 'Apache'" in err and "SPDX" in err
    code, _, err = run_cli("package", exp, "-o", out, "--author", "A/B", "--no-validate")
    assert code == 2 and "--author 'A/B'" in err
    import httpx

    def offline(*args, **kwargs):
        raise httpx.ConnectError("Name or service not known")

    monkeypatch.setattr(httpx, "get", offline)  # bioimageio.spec looks GitHub users up: no network
    code, _, err = run_cli("package", exp, "-o", out, "--author", "A", "--github-user", "someone-new", "--no-validate")
    assert code == 2 and "--github-user 'someone-new'" in err and "api.github.com" in err
    monkeypatch.setattr(dataset, "dsb2018_tiles", no_sample)  # the samples extra missing
    code, _, err = run_cli("package", exp, "-o", out, "--author", "A")
    assert code == 2 and "--test-image" in err and "samples" in err
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # the bioimageio extra missing
    code, _, err = run_cli("package", exp, "-o", out, "--author", "A")
    assert code == 2 and "peft-export[bioimageio]" in err
    assert not Path(out).exists() and not list(tmp_path.glob(".x.zip.*"))


def test_declared_post_processing_that_differs_from_the_exports_is_refused(inst_export, tmp_path, monkeypatch):
    """The package's own check: the watershed settings its rdf declares must give the test output's instances on the
    export's maps; settings that differ (here a stricter foreground threshold) are refused and nothing is written."""
    from peft_export.errors import VerificationError

    real = PackageModel.instance_settings
    monkeypatch.setattr(PackageModel, "instance_settings",
                        lambda self: {**real(self), "foreground_threshold": 0.9})
    out = tmp_path / "inst.zip"
    with pytest.raises(VerificationError, match="declared post-processing does not reproduce"):
        build_package(inst_export.out_dir, out, PackageOptions(authors=["Test"], validate_package=False))
    assert not out.exists() and not list(tmp_path.iterdir())
