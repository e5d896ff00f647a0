"""Benchmark pages, one per ``docs/bench_*.json``, rendered from the JSON at site build time.

Every figure on these pages is read from the JSON (tables) or drawn from it (plots, with the same functions that
``peft-export benchmark`` uses, ``peft_export.bench.plots``); none is typed by hand. Provenance: the machine the
JSON records (CPU, cores, GPU, versions), and the commit and date that last changed the file (``git log``; the
JSONs do not record them). A new ``docs/bench_NAME.json`` gets a page (and a nav entry) with no change here: a
known ``kind`` gets its tables and plot, any other JSON a table of its values.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docs_cli import cell

# How each JSON was made where it does not say so itself (the command lines from the README's sections).
COMMANDS = {
    "bench_train_lite_medsam": "python benchmarks/train_cost.py --models lite_medsam",
    "bench_train_vit_b": "python benchmarks/train_cost.py --models vit_b --placements all,late:1 --steps 1",
    "bench_study_lite_medsam": (
        "OMP_NUM_THREADS=1 peft-export benchmark study --model lite_medsam --data sample:dsb2018 "
        "--methods lora,late_ft,ssf,fact,attention --placements all,late:50%,late:1 --budget 6 "
        "--objects-per-image 4 --memory-steps 1 -o study/"),
    "bench_int8_cpu": "python benchmarks/int8_cpu.py demo_run/best.pt",
    "bench_ais_vs_grid": "python benchmarks/ais_vs_grid.py ais_onnx --repeats 1",
    "bench_apg_merge_main_job": "python benchmarks/ais_vs_grid.py demo_run/onnx --no-grid --mosaic --repeats 1",
}


@dataclass
class BenchPage:
    stem: str
    title: str
    markdown: str
    images: dict[str, bytes] = field(default_factory=dict)  # file name (next to the page) -> PNG
    cpu: str = ""
    recorded: str = ""

    @property
    def uri(self) -> str:
        return f"benchmarks/{self.stem}.md"


def bench_files(docs_dir: Path) -> list[Path]:
    return sorted(docs_dir.glob("bench_*.json"))


def _git(root: Path, path: Path) -> str:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %ad", "--date=short", "--", str(path)], cwd=root,
                             capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=root, capture_output=True,
                               text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not recorded (no git here)"
    text = out.stdout.strip()
    if not text:
        return "not committed yet"
    commit, date = text.split(" ", 1)
    return f"commit `{commit}`, {date}" + (" (changed since)" if dirty else "")


def _fmt(v: Any, spec: str = "{:.3f}") -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return spec.format(v) if isinstance(v, float) else f"{v:,}"
    return str(v)


def _cell(v: Any) -> str:
    return cell(v)


def _machine(data: dict) -> dict[str, str]:
    """CPU, cores, GPU, versions: whatever the JSON records."""
    m = data.get("machine") or {}
    cpu = data.get("cpu", m.get("cpu"))
    out: dict[str, str] = {}
    if isinstance(cpu, dict):
        out["CPU"] = f"{cpu.get('model', '?')} ({cpu.get('machine', '')}; flags {', '.join(cpu.get('flags', []))}; " \
                     f"int8 class {cpu.get('int8_class', '?')})"
    elif cpu:
        out["CPU"] = str(cpu)
    else:
        out["CPU"] = "not recorded"
    if "cpu_count" in m:
        out["cores"] = str(m["cpu_count"])
    if "memory_gib" in m:
        out["memory"] = f"{m['memory_gib']} GiB"
    out["GPU"] = ", ".join(m["gpus"]) if m.get("gpus") else ("none" if "gpus" in m else "not recorded (CPU run)")
    if m.get("versions"):
        out["versions"] = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    if "malloc_tuning" in m:
        out["malloc tuning"] = "on" if m["malloc_tuning"] else "off (allocator defaults)"
    return out


def _png(plot, results: dict) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plot.png"
        plot(path, results)
        return path.read_bytes()


# ---- one renderer per kind ---------------------------------------------------------------------------------------

def _train(stem: str, d: dict, out: list[str], images: dict[str, bytes]) -> str:
    from peft_export.bench.plots import plot_train

    s = d["settings"]
    out += [f"{s.get('steps')} timed step(s) after {s.get('warmup')} warm-up, batch {s.get('batch_size')}, "
            f"{s.get('objects_per_image')} objects/image, device {s.get('device')}, weights: {s.get('checkpoint')}; "
            f"baseline: {s.get('baseline', 'lora all')} (prompt encoder + mask decoder train in every case).", "",
            "| case | blocks | trainable encoder params | step (s) | × base | peak memory (MiB) | × base | "
            "training memory (MiB) | × base |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in d["cases"]:
        if "skipped" in r:
            out.append(f"| {r['case']} | skipped: {_cell(r['skipped'])} | | | | | | | |")
            continue
        out.append("| " + " | ".join([
            r["case"], str(r.get("blocks", "")), _fmt(r.get("trainable_encoder_params")),
            _fmt(r.get("step_median_s"), "{:.2f}"), _fmt(r.get("step_vs_baseline"), "{:.2f}"),
            _fmt(r.get("peak_memory_mib"), "{:.0f}"), _fmt(r.get("memory_vs_baseline"), "{:.2f}"),
            _fmt(r.get("train_memory_mib"), "{:.0f}"), _fmt(r.get("train_memory_vs_baseline"), "{:.2f}")]) + " |")
    images[f"{stem}.png"] = _png(plot_train, d)
    out += ["", f"![{s.get('model')} training cost vs placement]({stem}.png)"]
    return f"Training cost: {s.get('model')}, {', '.join(s.get('methods', []))}"


def _study(stem: str, d: dict, out: list[str], images: dict[str, bytes]) -> str:
    from peft_export.bench.plots import plot_study
    from peft_export.bench.study_results import markdown_table

    s, rec = d["settings"], d.get("recommendation") or {}
    out += [markdown_table(d), ""]
    if rec.get("finetune"):
        out += ["The command that trains the recommended case (from the JSON):", "", "```bash", rec["finetune"],
                "```", ""]
    images[f"{stem}.png"] = _png(plot_study, d)
    out += [f"![{s.get('model')} study: quality against cost]({stem}.png)", ""]
    spreads = d.get("spreads") or {}
    if spreads:
        out += ["**Spread** of each figure across methods and across placements (mean over groups):", "",
                "| figure | across methods | across placements | kind |", "|---|--:|--:|---|"]
        for k, v in spreads.items():
            out.append(f"| {k} | {_fmt(v.get('across_methods'))} | {_fmt(v.get('across_placements'))} | "
                       f"{v.get('kind', '')} |")
        out.append("")
    vs = d.get("versus_all") or []
    if vs:
        keys = [k for k in vs[0] if k not in ("case", "vs")]
        out += ["**Each late placement against its method's all-block case:**", "",
                "| case | vs | " + " | ".join(keys) + " |", "|---|---|" + "--:|" * len(keys)]
        for r in vs:
            out.append(f"| {r['case']} | {r['vs']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return f"Study: {s.get('model')} on {s.get('data')}"


def _int8(stem: str, d: dict, out: list[str], images: dict[str, bytes]) -> str:
    names = list(d.get("median_ms", {}))
    out += [f"Encoder latency, median of {d.get('runs')} interleaved runs, ONNX Runtime on the CPU above:", "",
            "| export | median (ms) | / fp32 | int8 nodes | box IoU vs fp32 (min) | point IoU vs fp32 (min) |",
            "|---|--:|--:|--:|--:|--:|"]
    for n in names:
        q = (d.get("quality_vs_fp32_heldout") or {}).get(n, {})
        i8 = (d.get("int8") or {}).get(n, {})
        nodes = f"{i8['quantized_nodes']} of {i8['candidates']}" if "quantized_nodes" in i8 else "–"
        box = f"{q['box']['mean_iou']:.3f} ({q['box']['min_iou']:.3f})" if "box" in q else "–"
        point = f"{q['point']['mean_iou']:.3f} ({q['point']['min_iou']:.3f})" if "point" in q else "–"
        out.append(f"| {n} | {_fmt(d['median_ms'][n], '{:.1f}')} | {_fmt(d['ratio_to_fp32'].get(n), '{:.2f}')}× | "
                   f"{nodes} | {box} | {point} |")
    objects = {v.get("box", {}).get("objects") for v in (d.get("quality_vs_fp32_heldout") or {}).values()}
    out += ["", f"Quality: int8 export against the fp32 export on the held-out tile and its flips/rotations "
            f"({', '.join(str(o) for o in objects if o)} objects), one box and one point per nucleus.", ""]
    if d.get("int8"):
        out += ["**The export's own gate** (held-out gate images):", "",
                "| export | gate value | threshold | box mean (min) | point mean (min) | gate images | export s |",
                "|---|--:|--:|--:|--:|--:|--:|"]
        for n, i8 in d["int8"].items():
            g = i8.get("gate", {})
            out.append(f"| {n} | {_fmt(g.get('gate_value'))} | {_fmt(g.get('threshold'), '{:.2f}')} | "
                       f"{_fmt(g.get('box_mean_iou'))} ({_fmt(g.get('box_min_iou'))}) | "
                       f"{_fmt(g.get('point_mean_iou'))} ({_fmt(g.get('point_min_iou'))}) | {_fmt(g.get('images'))} | "
                       f"{_fmt(i8.get('export_seconds'), '{:.0f}')} |")
        out.append("")
    if d.get("profile"):
        out += ["**Where the encoder's time goes** (ONNX Runtime's profiler; top operators by share):", "",
                "| export | ms/run (profiled) | float ops % | int8 ops % | Q/DQ % | top operators |",
                "|---|--:|--:|--:|--:|---|"]
        for n, p in d["profile"].items():
            top = ", ".join(f"{k} {v}" for k, v in list(p.get("share_percent", {}).items())[:5])
            out.append(f"| {n} | {_fmt(p.get('ms_per_run'), '{:.0f}')} | {_fmt(p.get('float_ops_percent'), '{:.1f}')}"
                       f" | {_fmt(p.get('int8_ops_percent'), '{:.1f}')} | {_fmt(p.get('q_dq_percent'), '{:.1f}')} | "
                       f"{top} |")
    images[f"{stem}.png"] = _bars(names, [d["ratio_to_fp32"].get(n) for n in names], "encoder latency / fp32",
                                  f"int8 on {(d.get('cpu') or {}).get('model', 'the CPU')}")
    out += ["", f"![encoder latency relative to fp32]({stem}.png)"]
    return "int8 on the CPU"


def _ais(stem: str, d: dict, out: list[str], images: dict[str, bytes]) -> str:
    best = d.get("grid_best_thresholds")
    out += [f"Export `{d.get('export')}`, {d.get('repeats')} repeat(s), backend {d.get('backend', 'onnxruntime')} "
            f"({d.get('compute', 'fp32')})" + (f"; the grid's best thresholds {best} were chosen on the evaluation "
                                               "image itself (an upper bound for the grid)" if best else "") + ".", "",
            "| image | method | mSA | F1 @0.5 | precision | recall | objects (pred / true) | s / image |",
            "|---|---|--:|--:|--:|--:|--:|--:|"]
    labels, values = [], []
    for image in ("heldout_tile", "whole_image", "mosaic_1024"):
        block = d.get(image) or {}
        for method in ("apg", "apg_box", "apg_score", "ais", "grid_default", "grid_best"):
            r = block.get(method)
            if not r:
                continue
            out.append(f"| {image.replace('_', ' ')} | {method.replace('_', ' ')} | {_fmt(r.get('msa'))} | "
                       f"{_fmt(r.get('f1'))} | {_fmt(r.get('precision'))} | {_fmt(r.get('recall'))} | "
                       f"{_fmt(r.get('objects_pred'), '{:.0f}')} / {_fmt(r.get('objects_true'), '{:.0f}')} | "
                       f"{_fmt(r.get('seconds'), '{:.1f}')} |")
            labels.append(f"{image.replace('_', ' ')}: {method.replace('_', ' ')}")
            values.append(r.get("msa"))
        if "msa_gain_vs_grid_default" in block:  # the former two-way run
            out.append(f"| {image.replace('_', ' ')} | AIS gain | +{_fmt(block.get('msa_gain_vs_grid_default'))} vs "
                       f"default grid, +{_fmt(block.get('msa_gain_vs_grid_best'))} vs best | | | | | "
                       f"{_fmt(block.get('speedup_vs_grid_default'), '{:.1f}')}× / "
                       f"{_fmt(block.get('speedup_vs_grid_best'), '{:.1f}')}× faster |")
    sweep = d.get("grid_sweep") or []
    if sweep:
        out += ["", "**The grid's threshold sweep** (mSA on the held-out tile):", "",
                "| pred IoU thresh | stability thresh | mSA |", "|--:|--:|--:|"]
        out += [f"| {r.get('pred_iou_thresh')} | {r.get('stability_thresh')} | {_fmt(r.get('msa'))} |" for r in sweep]
    tvo = d.get("torch_vs_onnx_heldout") or {}
    if tvo:
        out += ["", "**PyTorch vs this backend** on the held-out tile (object-matched IoU of the labels):", "",
                "| method | matched IoU | objects (backend / PyTorch) |", "|---|--:|--:|"]
        out += [f"| {m} | {_fmt(r.get('matched_iou'))} | {r.get('objects_onnx')} / {r.get('objects_torch')} |"
                for m, r in tvo.items()]
    images[f"{stem}.png"] = _bars(labels, values, "mSA", f"Automatic segmentation on {d.get('cpu', 'the CPU')}")
    out += ["", f"![mSA per method]({stem}.png)"]
    return "Automatic segmentation: APG, AIS and the point grid"


def _cpu_backends(stem: str, d: dict, out: list[str], images: dict[str, bytes]) -> str:
    out += [f"Encoder latency at batch 1, interleaved rounds per model ({d.get('rounds')} rounds; see the runs below), "
            "ratio to ONNX Runtime fp32 from the same rounds; quality: the case's encoder + the fp32 decoder vs the "
            "fp32 chain, one box and one point per labelled object of the held-out tile.", "",
            "| model | case | median s (min) | × ORT fp32 | peak RSS added MiB | box IoU (min) | point IoU (min) |",
            "|---|---|--:|--:|--:|--:|--:|"]
    labels, values = [], []
    for model, m in (d.get("models") or {}).items():
        for case, r in (m.get("cases") or {}).items():
            q = r.get("quality") or {}
            box = f"{_fmt(q['box_mean_iou'])} ({_fmt(q.get('box_min_iou'), '{:.2f}')})" if "box_mean_iou" in q else "–"
            point = (f"{_fmt(q['point_mean_iou'])} ({_fmt(q.get('point_min_iou'), '{:.2f}')})"
                     if "point_mean_iou" in q else "–")
            out.append(f"| {model} | {case} | {_fmt(r.get('median_s'), '{:.2f}')} ({_fmt(r.get('min_s'), '{:.2f}')}) | "
                       f"{_fmt(r.get('ratio_to_ort_fp32'), '{:.2f}')} | {_fmt(r.get('peak_rss_added_mib'), '{:.0f}')} "
                       f"| {box} | {point} |")
            labels.append(f"{model}: {case}")
            values.append(r.get("ratio_to_ort_fp32"))
        for case, why in (m.get("skipped") or {}).items():
            out.append(f"| {model} | {case} | skipped: {_cell(why)} | | | | |")
    runs = d.get("runs") or []
    if runs:
        out += ["", "**Runs**:", ""] + [f"- {', '.join(r.get('models', []))}: `{r.get('command')}`"
                                         + (f" ({r['note']})" if r.get("note") else "") for r in runs]
    images[f"{stem}.png"] = _bars(labels, values, "encoder latency / ONNX Runtime fp32",
                                  f"CPU backends on {(d.get('cpu') or {}).get('model', 'the CPU')}")
    out += ["", f"![encoder latency relative to ONNX Runtime fp32]({stem}.png)"]
    return "CPU backends: ONNX Runtime, OpenVINO f32 / bf16 / int8"


def _generic(stem: str, d: dict, out: list[str], images: dict[str, bytes]) -> str:
    out += ["| key | value |", "|---|---|"]

    def walk(v, key):
        if isinstance(v, dict):
            for k, w in v.items():
                walk(w, f"{key}.{k}" if key else k)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, w in enumerate(v):
                walk(w, f"{key}[{i}]")
        else:
            out.append(f"| `{key}` | {_cell(json.dumps(v) if not isinstance(v, str) else v)} |")

    walk(d, "")
    return stem.removeprefix("bench_").replace("_", " ")


def _bars(labels: list[str], values: list, xlabel: str, title: str) -> bytes:
    from peft_export.bench.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(labels), 2) + 1.2))
    ax.barh(range(len(labels)), [v if v is not None else 0 for v in values], color="#4c72b0")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bars.png"
        fig.savefig(path, dpi=110, format="png")
        plt.close(fig)
        return path.read_bytes()


def _kind(d: dict) -> str:
    if d.get("kind") in ("train", "study"):
        return d["kind"]
    if "median_ms" in d and "ratio_to_fp32" in d:
        return "int8"
    if "heldout_tile" in d and "whole_image" in d:
        return "ais"
    if isinstance(d.get("models"), dict) and all("cases" in m for m in d["models"].values()):
        return "cpu_backends"
    return "generic"


RENDER = {"train": _train, "study": _study, "int8": _int8, "ais": _ais, "cpu_backends": _cpu_backends,
          "generic": _generic}


def render(root: Path, path: Path) -> BenchPage:
    d = json.loads(path.read_text())
    stem = path.stem
    body: list[str] = []
    images: dict[str, bytes] = {}
    title = RENDER[_kind(d)](stem, d, body, images)
    machine, recorded = _machine(d), _git(root, path)
    head = [f"# {title}", "",
            "!!! note \"Generated\"",
            f"    Rendered from [`docs/{path.name}`](../{path.name}) when the site is built (`tools/docs_bench.py`);",
            "    no figure on this page is typed by hand.", "",
            "| provenance | |", "|---|---|",
            f"| file | `docs/{path.name}` |",
            f"| recorded | {recorded} |"]
    head += [f"| {k} | {_cell(v)} |" for k, v in machine.items()]
    if stem in COMMANDS:
        head += [f"| command | `{COMMANDS[stem]}` (from the README; the JSON does not record it) |"]
    cpu = machine["CPU"].split(" (")[0] + (f", {machine['cores']} cores" if "cores" in machine else "")
    return BenchPage(stem, title, "\n".join([*head, "", *body]) + "\n", images, cpu, recorded)


def index_page(pages: list[BenchPage]) -> str:
    lines = ["# Benchmarks", "",
             "Each page is rendered from one `docs/bench_*.json` when the site is built. Every figure was measured on",
             "the machine its page names (CPU model, cores, GPU if any); ratios within one run are what to compare,",
             "absolute times are those of that machine. How to measure on your own machine: the `benchmark`",
             "commands ([CLI reference](../reference/cli.md#benchmark-train)) and the scripts in `benchmarks/`.",
             "Design notes on what the figures mean: [design notes](../design-notes.md).", "",
             "| page | CPU | recorded |", "|---|---|---|"]
    for p in pages:
        lines.append(f"| [{p.title}]({p.stem}.md) | {p.cpu} | {p.recorded} |")
    return "\n".join(lines) + "\n"
