"""Nothing lost, nothing half-written (issue 20): ``kill -9`` at random points of ``predict`` on a folder, ``embed``,
``merge-and-export`` and ``package`` (the next run gives what a clean run gives, no stray files), a full disk (one
``error:`` line with the path and the free space, the previous output intact), Ctrl-C (exit 130, ``interrupted``),
the user's umask, and what summaries record. Bad input, one line each: tests/test_bad_input.py.

The kill points: ``peft_export.files`` kills its own process (SIGKILL, exactly ``kill -9``) at the N-th place where
files on disk change when ``PEFT_EXPORT_TEST_CRASH_AT=N`` is set (``PEFT_EXPORT_TEST_CRASH_LOG`` lists those places);
N is drawn at random (seeded) from the places a clean run logged. Between two such places the disk does not change
except for the temporary file being written, so these are the states a ``kill -9`` can leave; one run per command
is also killed from outside at a random moment. Tiny random-weight models (tests/conftest.py) keep it fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from peft_export.files import CRASH_ENV, CRASH_LOG_ENV, clean_stale, stray_files
from peft_export.runtime.tiling import Tiling

KILLED = -signal.SIGKILL


def cli(*args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``peft-export ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "peft_export_cli.app", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def crash_env(at: int | None = None, log: Path | None = None) -> dict:
    env = {}
    if at is not None:
        env[CRASH_ENV] = str(at)
    if log is not None:
        env[CRASH_LOG_ENV] = str(log)
    return env


def crash_points(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.is_file() else []


def _image(shape, seed):
    rng = np.random.default_rng(seed)
    img = rng.normal(30, 5, shape)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    for _ in range(6):
        cy, cx, r = rng.uniform(0, shape[-2]), rng.uniform(0, shape[-1]), rng.uniform(6, 18)
        img[..., (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def plate(tmp_path):
    """Two 2D images (one tiled: 4 tiles of the tiny model's 256 px), a 2-plane z-stack in a sub-folder, boxes."""
    import tifffile

    root = tmp_path / "plate"
    (root / "well_b").mkdir(parents=True)
    tifffile.imwrite(root / "a.tif", _image((200, 240), 1))
    tifffile.imwrite(root / "b.tif", _image((300, 280), 2))
    tifffile.imwrite(root / "well_b" / "stack.tif", _image((2, 180, 200), 3), photometric="minisblack",
                     metadata={"axes": "ZYX"})
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[10, 10, 60, 60], [100, 120, 150, 170]]))
    return root, boxes


def _is_temp(p: Path) -> bool:
    from peft_export.files import parse_temp

    return parse_temp(p) is not None


def label_outputs(folder: Path) -> dict:
    """What a predict run left: label bytes and summaries (without timings and the output folder's own path)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(_is_temp(q) for q in (p, *p.parents)):
            continue
        rel = str(p.relative_to(folder))
        if p.suffix == ".json":
            doc = json.loads(p.read_text())
            out[rel] = {k: v for k, v in doc.items() if k not in ("seconds", "output", "overlay")}
        else:
            out[rel] = p.read_bytes()
    return out


def assert_no_half_outputs(folder: Path) -> None:
    """After a kill: every label file present is complete (a summary describes it, sha256 included); temporary
    files may remain (the next run removes them)."""
    from peft_export.data.samples import sha256_file

    for p in folder.rglob("*.tif"):
        if _is_temp(p):
            continue
        doc = json.loads(p.with_suffix(".json").read_text())
        assert doc["files"]["labels"]["sha256"] == sha256_file(p), p


# ---- the machinery, every crash point (no model: fast) ---------------------------------------------------------

_SCRIPT = """
import sys
from pathlib import Path
from peft_export.files import atomic_dir, atomic_write, together
root, what, version = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if what == "dir":
    with atomic_dir(root / "out") as tmp:
        for name in ("a.bin", "b.bin"):
            (tmp / name).write_text(version * 1000)
        atomic_write(tmp / "manifest.json", lambda p: p.write_text(version))
else:
    with together():
        atomic_write(root / "labels.tif", lambda p: p.write_text(version * 1000))
        atomic_write(root / "labels.json", lambda p: p.write_text(version))
"""


@pytest.mark.parametrize("what", ["dir", "files"])
def test_every_crash_point_leaves_the_old_or_the_new_output(tmp_path, what):
    """atomic_dir (export folders) and together (label + summary) killed at each of their crash points, over a
    previous output: the old output or the new one, complete, after the next run's clean-up; never a mixture or
    a partial file; no stray temporary files; a final run completes."""
    n = 0
    while True:
        n += 1
        root = tmp_path / f"case{n}"
        if what == "dir":
            (root / "out").mkdir(parents=True)
            for name in ("a.bin", "b.bin", "manifest.json"):
                (root / "out" / name).write_text("1" * (1000 if name != "manifest.json" else 1))
        else:
            root.mkdir()
            (root / "labels.tif").write_text("1" * 1000)
            (root / "labels.json").write_text("1")
        r = subprocess.run([sys.executable, "-c", _SCRIPT, str(root), what, "2"], capture_output=True, text=True,
                           env={**os.environ, CRASH_ENV: str(n)}, timeout=120)
        assert r.returncode in (0, KILLED), r.stderr
        clean_stale(root)  # what the next run does first (the killed process is gone)
        assert not stray_files(root), (n, stray_files(root))
        if what == "dir":
            files = {p.name: p.read_text() for p in (root / "out").iterdir()}
            assert set(files) == {"a.bin", "b.bin", "manifest.json"}, (n, files)
            assert len({v[0] for v in files.values()}) == 1, (n, files)  # all old or all new
        else:
            tif, js = root / "labels.tif", root / "labels.json"
            # the record lands first and the data it describes is cleared before it: a new record never sits
            # beside old data (a missing label file is "not done": redone by the next run)
            assert js.read_text() in ("1", "2"), n
            assert not tif.exists() or tif.read_text() == js.read_text() * 1000, (n, js.read_text())
        if r.returncode == 0:
            break
    assert n >= 5  # every place was hit once before the run got through


# ---- kill -9 at random points of real commands --------------------------------------------------------------------

def test_kill_9_during_a_folder_predict_then_resume_gives_the_clean_outputs(tiny_export, plate, tmp_path):
    root, boxes = plate
    args = ("predict", tiny_export.out_dir, root, "--boxes", boxes, "-q")
    log = tmp_path / "points.log"
    t0 = time.perf_counter()
    r = cli(*args, "-o", tmp_path / "ref", env=crash_env(None, log))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    reference = label_outputs(tmp_path / "ref")
    assert len([k for k in reference if k.endswith(".tif")]) == 3
    points = crash_points(log)
    assert len(points) >= 15, points
    rng = np.random.default_rng(2020)
    for n in sorted(rng.choice(np.arange(1, len(points) + 1), 3, replace=False)):
        out = tmp_path / f"killed_at_{n}"
        r = cli(*args, "-o", out, env=crash_env(int(n)))
        assert r.returncode == KILLED, (n, points[n - 1], r.stderr)
        assert_no_half_outputs(out)
        r = cli(*args, "-o", out, "--skip-existing")
        assert r.returncode == 0, (n, points[n - 1], r.stderr)
        assert label_outputs(out) == reference, (n, points[n - 1])
        assert not stray_files(out), (n, stray_files(out))
    # and once from outside, at a random moment of the run
    out = tmp_path / "killed_from_outside"
    p = subprocess.Popen([sys.executable, "-m", "peft_export_cli.app", *map(str, args), "-o", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(float(rng.uniform(0.3, 0.9)) * seconds)
    p.kill()
    p.wait(timeout=60)
    if out.exists():
        assert_no_half_outputs(out)
    r = cli(*args, "-o", out, "--skip-existing")
    assert r.returncode == 0, r.stderr
    assert label_outputs(out) == reference and not stray_files(out)


def _cache_contents(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.iterdir()):
        if _is_temp(p):
            continue
        if p.suffix == ".json":
            out[p.name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "created"}
        else:
            out[p.name] = p.read_bytes()
    return out


def test_kill_9_during_embed_then_rerun_gives_the_clean_cache(tiny_export, plate, tmp_path):
    root, _ = plate
    args = ("embed", tiny_export.out_dir, root, "-q")
    log = tmp_path / "points.log"
    r = cli(*args, "-o", tmp_path / "ref", env=crash_env(None, log))
    assert r.returncode == 0, r.stderr
    reference = _cache_contents(tmp_path / "ref")
    assert len([k for k in reference if k.endswith(".npy")]) == 4  # two images, two planes
    points = crash_points(log)
    rng = np.random.default_rng(7)
    for n in sorted(rng.choice(np.arange(1, len(points) + 1), 2, replace=False)):
        out = tmp_path / f"killed_at_{n}"
        r = cli(*args, "-o", out, env=crash_env(int(n)))
        assert r.returncode == KILLED, (n, points[n - 1], r.stderr)
        r = cli(*args, "-o", out, "--json")
        assert r.returncode == 0, (n, points[n - 1], r.stderr)
        assert _cache_contents(out) == reference, (n, points[n - 1])
        assert not stray_files(out)
        assert json.loads(r.stdout)["export"]["sha256"]  # the summary names the export


def test_kill_9_during_merge_and_export_keeps_the_previous_export_or_the_new_one(tiny_export, tmp_path, run_cli):
    """``merge-and-export --force`` over a previous export, killed at a random point of writing it: the previous
    export or the new one, never a mixture, and the next run (in-process here) writes the clean run's graphs with no
    stray files. (The same machinery at every one of its points: test_every_crash_point_leaves_....)"""
    from peft_export.manifest import read_manifest

    out = tmp_path / "exports" / "onnx"
    shutil.copytree(tiny_export.out_dir, out)
    (out / "previous.txt").write_text("the previous export")
    rng = np.random.default_rng(11)
    n = int(rng.integers(1, 8))  # created onnx/, manifest (created, written, replaced), written onnx/, moved aside,
    log = tmp_path / "points.log"  # renamed into place
    r = cli("merge-and-export", tiny_export.checkpoint, "-o", out, "--force", "-q", env=crash_env(n, log))
    points = crash_points(log)
    assert r.returncode == (KILLED if n <= len(points) else 0), (n, points, r.stderr[-2000:])
    assert len(points) == 7 or r.returncode == KILLED, points
    clean_stale(out.parent)  # what the next command writing there does first
    assert out.is_dir() and not stray_files(out.parent), (points, list(out.parent.iterdir()))
    read_manifest(out)  # complete (every sha256 checked): the previous export or the new one
    assert (out / "previous.txt").exists() == (r.returncode == KILLED and points[-1] != "renamed into place onnx")
    code, _, err = run_cli("merge-and-export", str(tiny_export.checkpoint), "-o", str(out), "--force", "--quiet")
    assert code == 0, err
    assert not stray_files(out.parent) and not (out / "previous.txt").exists()
    for name in ("encoder.onnx", "decoder.onnx", "decoder_lowres.onnx"):
        assert (out / name).read_bytes() == (tiny_export.out_dir / name).read_bytes(), name
    assert read_manifest(out).files == read_manifest(tiny_export.out_dir).files


def test_kill_9_during_merge_never_pairs_new_weights_with_the_old_sidecar(tiny_export, tmp_path):
    """``merge --force`` over a previous merge, killed where files are renamed into place: each sidecar beside its
    own weights or beside none (not there yet: the merge is redone), never new weights with the sidecar of another
    merge (loading reads the model name from it)."""
    out = tmp_path / "merged.pt"
    sidecar = tmp_path / "merged.pt.json"
    args = ("merge", tiny_export.checkpoint, "-o", out, "--force")

    def previous():
        out.write_bytes(b"previous weights")
        sidecar.write_text('{"previous": true}')

    previous()
    log = tmp_path / "points.log"
    r = cli(*args, env=crash_env(None, log))
    assert r.returncode == 0, r.stderr
    points = crash_points(log)
    renames = [n for n, name in enumerate(points, 1) if not name.startswith(("created", "written"))]
    assert renames, points
    for n in renames:
        previous()
        r = cli(*args, env=crash_env(n))
        assert r.returncode == KILLED, (n, points[n - 1], r.stderr[-2000:])
        weights = out.read_bytes() if out.exists() else None  # None: not there (yet), the merge is redone
        if '"previous"' in sidecar.read_text():
            assert weights in (b"previous weights", None), (n, points[n - 1])
        else:
            assert weights != b"previous weights", (n, points[n - 1])
    clean_stale(tmp_path)
    assert not stray_files(tmp_path)


def test_kill_9_during_package_then_rerun_gives_the_clean_package(tiny_export, tmp_path):
    pytest.importorskip("bioimageio.spec", reason="needs the bioimageio extra: pip install -e '.[bioimageio]'")
    args = ("package", tiny_export.out_dir, "--author", "peft-export tests", "--no-validate", "-q")
    log = tmp_path / "points.log"
    ref = tmp_path / "ref" / "model.zip"
    r = cli(*args, "-o", ref, env=crash_env(None, log))
    assert r.returncode == 0, r.stderr
    points = crash_points(log)
    assert len(points) == 3, points  # scratch folder made, zip written, zip renamed into place

    def members(path):
        with zipfile.ZipFile(path) as zf:
            return {i.filename: zf.read(i) for i in zf.infolist()}

    rng = np.random.default_rng(5)
    for n in sorted(rng.choice([1, 2, 3], 2, replace=False)):
        out = tmp_path / f"killed_at_{n}" / "model.zip"
        out.parent.mkdir()
        r = cli(*args, "-o", out, env=crash_env(int(n)))
        assert r.returncode == KILLED, (n, r.stderr)
        if out.exists():  # killed after the rename: the package is complete
            assert members(out) == members(ref)
        r = cli(*args, "-o", out, "--force")
        assert r.returncode == 0, r.stderr
        assert members(out) == members(ref) and not stray_files(out.parent), list(out.parent.iterdir())


def test_an_unzipped_package_left_by_a_killed_process_is_removed_by_the_next_one(tmp_path):
    """Opened .zip packages are unzipped into a per-user temporary folder under recognisable names: what a process
    killed while it had one open left behind goes when the next package is opened."""
    from peft_export.runtime.package import _extract, unzip_root

    pkg = tmp_path / "model.zip"
    with zipfile.ZipFile(pkg, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\n")
    script = ("import os, sys\nfrom pathlib import Path\nfrom peft_export.runtime.package import _extract\n"
              "print(_extract(Path(sys.argv[1])), flush=True)\nos.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", script, str(pkg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == KILLED, r.stderr
    left = Path(r.stdout.strip())
    assert left.parent == unzip_root() and (left / "rdf.yaml").is_file()
    mine = _extract(pkg)  # the next open cleans first
    try:
        assert not left.exists() and (mine / "rdf.yaml").is_file()
    finally:
        shutil.rmtree(mine)


# ---- a full disk -----------------------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_error_line(err: str, target) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot write {target}: No space left on device ("), lines[0]
    assert " free on " in lines[0] and "Traceback" not in err
    return lines[0]


def test_full_disk_during_predict_keeps_the_previous_outputs(tiny_export, plate, tmp_path, run_cli, monkeypatch):
    import tifffile

    root, boxes = plate
    out = tmp_path / "labels"
    args = ("predict", str(tiny_export.out_dir), str(root), "--boxes", str(boxes), "-o", str(out), "-q")
    code, _, err = run_cli(*args)
    assert code == 0, err
    before = label_outputs(out)

    def full(path, *a, **k):  # a writer that fills the disk half-way
        Path(path).write_bytes(b"II*\0" + b"\0" * 100)
        _enospc()

    monkeypatch.setattr(tifffile, "imwrite", full)
    code, _, err = run_cli(*args, "--force")
    assert code == 1
    _one_error_line(err, out / "a.tif")
    assert label_outputs(out) == before and not stray_files(out)


def test_full_disk_during_embed_and_export_and_package(tiny_export, plate, tmp_path, run_cli, monkeypatch):
    root, _ = plate
    cache = tmp_path / "cache"
    monkeypatch.setattr(np, "save", _enospc)
    code, _, err = run_cli("embed", str(tiny_export.out_dir), str(root / "a.tif"), "-o", str(cache), "-q")
    assert code == 1
    (line,) = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert re.match(rf"error: cannot write {re.escape(str(cache))}/[0-9a-f]+\.npy: No space left on device \(.* free "
                    "on ", line), err
    assert not stray_files(cache) and not list(cache.glob("*.npy"))
    monkeypatch.undo()

    from peft_export.export import exporter

    out = tmp_path / "onnx"
    shutil.copytree(tiny_export.out_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(exporter, "_save", _enospc)
    code, _, err = run_cli("merge-and-export", str(tiny_export.checkpoint), "-o", str(out), "--force", "--quiet")
    assert code == 1
    _one_error_line(err, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not stray_files(tmp_path)

    pytest.importorskip("bioimageio.spec")
    from peft_export.package import bioimageio

    pkg = tmp_path / "model.zip"
    pkg.write_bytes(b"the previous package")
    monkeypatch.setattr(bioimageio, "zip_folder", _enospc)
    code, _, err = run_cli("package", str(tiny_export.out_dir), "-o", str(pkg), "--author", "A", "--no-validate",
                           "--force", "-q")
    assert code == 1
    _one_error_line(err, pkg)
    assert pkg.read_bytes() == b"the previous package" and not stray_files(tmp_path)


def test_full_disk_during_merge_is_one_line_and_keeps_the_previous_output(tiny_export, tmp_path, run_cli,
                                                                          monkeypatch):
    """PyTorch's zip writer reports a full disk as a RuntimeError ('unexpected pos ...', measured on a 1.5 MiB
    tmpfs): merge (and every checkpoint writer) still gives one line with the path, the previous file intact."""
    import torch

    out = tmp_path / "merged.pt"
    out.write_bytes(b"the previous merge")

    def full(obj, f, *a, **k):  # what torch.save does on a full disk: part of the file, then a RuntimeError
        Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1486528 vs 1486416")

    monkeypatch.setattr(torch, "save", full)
    code, _, err = run_cli("merge", str(tiny_export.checkpoint), "-o", str(out), "--force")
    assert code == 1, err
    (line,) = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot write {out}: ") and " free on " in line, err
    assert "internal error" not in err
    assert out.read_bytes() == b"the previous merge" and not stray_files(tmp_path)


def test_an_os_error_anywhere_is_one_line_with_the_path_and_free_space(run_cli, monkeypatch, tmp_path):
    """The last resort in main(): an OSError no writer wrapped is still one line, not 'internal error'."""
    from peft_export.runtime import sources

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "x.tif"))

    monkeypatch.setattr(sources, "resolve_inputs", denied)
    code, _, err = run_cli("predict", str(tmp_path), str(tmp_path), "--auto", "-o", str(tmp_path / "o"))
    assert code == 1
    assert err.strip().startswith(f"error: {tmp_path / 'x.tif'}: Permission denied (") and "free on" in err
    assert "internal error" not in err and len(err.strip().splitlines()) == 1


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------

def _sigint_default() -> None:
    """In the child before exec: SIGINT at its default, so that Python turns it into KeyboardInterrupt. A pytest
    started in the background (`cmd &` in a script, as CI may do) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(args, ready, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, "-m", "peft_export_cli.app", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    t0 = time.time()
    while not ready() and p.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_ctrl_c_exits_130_with_interrupted_and_leaves_complete_outputs_only(tiny_export, plate, tmp_path, command):
    import tifffile

    root, boxes = plate
    more = root / "zz_more"  # more images: work left when the first outputs appear, so the Ctrl-C lands mid-run
    more.mkdir()
    for k in range(24):
        tifffile.imwrite(more / f"m{k:02d}.tif", _image((300, 280), 10 + k))
    out = tmp_path / "out"
    if command == "predict":
        args = ("predict", tiny_export.out_dir, root, "--boxes", boxes, "-o", out)
        ready = lambda: any(out.rglob("*.json"))  # noqa: E731
    else:
        args = ("embed", tiny_export.out_dir, root, "-o", out)
        ready = lambda: len(list(out.glob("*.json"))) >= 2  # noqa: E731
    r = _interrupt_when(args, ready)
    assert r.returncode == 130, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "interrupted"
    assert not stray_files(out)  # the file being written when Ctrl-C came was removed
    if command == "predict":
        assert_no_half_outputs(out)


def test_ctrl_c_is_exit_130_for_every_command(run_cli, monkeypatch, tmp_path):
    """typer turns KeyboardInterrupt into an exit code that it *returns* outside standalone mode (it used to be
    dropped: exit 0). Every registered command, interrupted as it starts, exits 130 with 'interrupted'."""
    import functools

    from peft_export_cli.app import app

    def interrupting(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            raise KeyboardInterrupt

        return wrapper

    commands = {}
    for group in [app, *(g.typer_instance for g in app.registered_groups)]:
        for info in group.registered_commands:
            monkeypatch.setattr(info, "callback", interrupting(info.callback))
            commands[info.name or info.callback.__name__] = group is not app
    x = str(tmp_path / "x")
    argv = {"finetune": ["--out", x], "merge": [x, "-o", x], "export": [x, "-o", x], "merge-and-export": [x, "-o", x],
            "build-engine": [x], "predict": [x, x, "--auto", "-o", x], "evaluate": [], "embed": [x, x, "-o", x],
            "package": [x, "-o", x], "info": [], "cpu-gate": [x], "infer": [x, "-o", x], "train": ["-o", x],
            "study": ["-o", x]}
    seen = 0
    for name, sub in commands.items():
        args = ["benchmark", name, *argv.get(name, [])] if sub else [name, *argv.get(name, [])]
        code, _, err = run_cli(*args)
        assert code == 130 and err.strip().endswith("interrupted"), (args, code, err)
        seen += 1
    assert seen >= 10


# ---- umask, provenance ---------------------------------------------------------------------------------------------

def test_outputs_get_the_users_umask(tiny_export, plate, tmp_path, run_cli):
    mask = os.umask(0)
    os.umask(mask)
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    assert stat.S_IMODE(tiny_export.out_dir.stat().st_mode) == want_dir  # mkdtemp made it 0700
    for p in tiny_export.out_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == want_file, p
    root, boxes = plate
    code, _, err = run_cli("predict", str(tiny_export.out_dir), str(root / "a.tif"), "--boxes", str(boxes), "-o",
                           str(tmp_path / "new" / "a.tif"))
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == want_dir
    for name in ("a.tif", "a.json"):
        assert stat.S_IMODE((tmp_path / "new" / name).stat().st_mode) == want_file


def test_summaries_record_the_export_and_the_settings(tiny_export, plate, tmp_path, run_cli):
    """Every output names the export (sha256 of its manifest) and the settings that made it; the export records
    the checkpoint's sha256; --skip-existing refuses outputs of another export (another manifest) or settings,
    and --force with it redoes them."""
    import hashlib

    from peft_export.data.samples import sha256_file
    from peft_export.manifest import read_manifest

    root, boxes = plate
    manifest_sha = hashlib.sha256((tiny_export.out_dir / "manifest.json").read_bytes()).hexdigest()
    out = tmp_path / "labels"
    code, stdout, err = run_cli("predict", str(tiny_export.out_dir), str(root), "--boxes", str(boxes), "-o", str(out),
                                "--json")
    assert code == 0, err
    for summary in json.loads(stdout)["images"]:
        assert summary["export"]["sha256"] == manifest_sha
        assert summary["settings"]["prompts"]["sha256"] == sha256_file(boxes)
        assert summary["settings"]["tiling"] == Tiling().to_dict()
    assert read_manifest(tiny_export.out_dir).source["checkpoint_sha256"] == sha256_file(tiny_export.checkpoint)
    code, stdout, err = run_cli("evaluate", str(tiny_export.out_dir), "--prompts", "box", "--json")
    assert code == 0 and json.loads(stdout)["export"]["sha256"] == manifest_sha, err
    assert json.loads(stdout)["settings"] == {"prompts": ["box"], "tiling": Tiling().to_dict()}

    other = tmp_path / "other_export"
    shutil.copytree(tiny_export.out_dir, other)
    doc = json.loads((other / "manifest.json").read_text())
    doc["created"] = "another export"
    (other / "manifest.json").write_text(json.dumps(doc))
    args = ("predict", str(other), str(root), "--boxes", str(boxes), "-o", str(out), "--skip-existing")
    code, _, err = run_cli(*args)
    assert code == 2 and "--skip-existing: 3 existing output(s) were made by another export" in err, err
    code, _, err = run_cli("predict", str(tiny_export.out_dir), str(root), "--boxes", str(boxes), "-o", str(out),
                           "--skip-existing", "--halo", "16", "--tile", "256")
    assert code == 2 and "other settings (tiling)" in err, err
    code, stdout, err = run_cli(*args, "--force", "--json")
    assert code == 0 and json.loads(stdout)["done"] == 3, err
    assert json.loads((out / "a.json").read_text())["export"]["source"] == str(other)


# ---- progress ------------------------------------------------------------------------------------------------------

def test_progress_over_the_tiles_of_one_image_and_resumed_runs(tiny_export, plate, tmp_path):
    """A large image reports its tiles as they are embedded (a progress row instead of '0/1' for minutes); a
    resumed run reports kept inputs apart (the progress bar takes them out of its total: the ETA counts work only)."""
    from peft_export.runtime.batch import PredictRequest, run_predict
    from peft_export.runtime.segmenter import Segmenter
    from peft_export.runtime.sources import resolve_inputs

    seg = Segmenter(tiny_export.out_dir, batch_size=2, backend="onnxruntime")  # OpenVINO embeds one tile a call
    calls = []
    seg.on_tiles = lambda k, n: calls.append((k, n))
    seg.set_image(_image((500, 700), 4))
    n = len(seg.plan.grid)
    assert n > 4 and sum(k for k, _ in calls) == n and {m for _, m in calls} == {n} and max(k for k, _ in calls) == 2

    root, boxes = plate
    inputs = resolve_inputs(root)
    events = []
    req = PredictRequest("boxes", boxes)
    run_predict(seg, inputs, tmp_path / "o", req, on_image=lambda i: events.append(("done", i.rel.name)))
    events.clear()
    (tmp_path / "o" / "b.tif").unlink()
    req = PredictRequest("boxes", boxes, skip_existing=True)
    run_predict(seg, inputs, tmp_path / "o", req, on_image=lambda i: events.append(("done", i.rel.name)),
                on_skip=lambda i: events.append(("skip", i.rel.name)))
    assert sorted(events) == [("done", "b.tif"), ("skip", "a.tif"), ("skip", "stack.tif")]

    from peft_export_cli import common

    with common.progress_bar("x", 5, enabled=True) as bar:  # the handle the CLI gives on_skip / on_tiles
        bar.skip(2)
        bar.tiles(1, 4)
        bar.advance()
        tasks = bar.progress.tasks
        assert tasks[0].total == 3 and tasks[0].completed == 1 and len(tasks) == 1  # the tiles row went with it
