"""``benchmark study`` results: ratios to a named baseline, the Pareto fronts, the recommendation, the table.

Recommendation rule: among the measured cases whose quality (``--metric``) is within ``--margin`` of the best
case's, the cheapest by ``--cost``; ties go to the shorter step time, then to the higher quality.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from peft_export.bench.common import machine_info, write_results
from peft_export.bench.plots import plot_study
from peft_export.data.io import atomic_write
from peft_export.errors import UsageError

METRICS = {"mean_iou": "mean of box and point mean IoU", "box_iou": "box mean IoU", "point_iou": "point mean IoU",
           "box_msa": "box mSA", "point_msa": "point mSA", "ais_msa": "instance segmentation (AIS) mSA"}
COSTS = {"peak_memory": ("peak_memory_mib", "peak memory"), "train_memory": ("train_memory_mib", "training memory"),
         "step_time": ("step_median_s", "step time"), "train_time": ("train_seconds", "training time")}
RATIOS = (("step_median_s", "step_vs_baseline"), ("peak_memory_mib", "memory_vs_baseline"),
          ("train_memory_mib", "train_memory_vs_baseline"), ("train_seconds", "train_time_vs_baseline"),
          ("trainable_params", "trainable_vs_baseline"))
SPREAD_KEYS = ("step_median_s", "peak_memory_mib", "train_memory_mib")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "skipped" not in r]


def pick_baseline(rows: list[dict], name: str | None) -> dict | None:
    """The named case (exact, else the first whose name contains it), LoRA on all blocks, or the first case."""
    if not rows:
        return None
    if name:
        hit = next((r for r in rows if r["case"] == name), None) or next((r for r in rows if name in r["case"]), None)
        if hit is None:
            raise UsageError(f"baseline {name!r} matches no measured case; cases: "
                             f"{', '.join(r['case'] for r in rows)}")
        return hit
    return next((r for r in rows if r["method"] == "lora" and r["placement"] == "all"), rows[0])


def recommend(rows: list[dict], metric: str, cost: str, margin: float) -> dict:
    """The cheapest case within ``margin`` of the best quality (see the module's rule)."""
    key, label = COSTS[cost]
    cands = [r for r in rows if _num(r.get(metric)) is not None and _num(r.get(key)) is not None]
    if not cands:
        return {"case": None, "text": f"no case has both {METRICS[metric]} and {label}: nothing to recommend"}
    best = max(cands, key=lambda r: r[metric])
    eligible = [r for r in cands if r[metric] >= best[metric] - margin - 1e-12]
    pick = min(eligible, key=lambda r: (r[key], _num(r.get("step_median_s")) or math.inf, -r[metric]))
    ratio = pick[key] / best[key] if best[key] else None
    gap = best[metric] - pick[metric]
    text = (f"{pick['case']}: {METRICS[metric]} {pick[metric]:.3f}, "
            + (f"{gap:.3f} below the best ({best['case']}, {best[metric]:.3f}), " if pick is not best
               else "the best quality, ")
            + f"within the margin {margin:g}, at the lowest {label}"
            + (f" ({ratio:.2f}x the best case's)" if ratio is not None and pick is not best else ""))
    return {"case": pick["case"], "method": pick["method"], "placement": pick["placement"], "metric": metric,
            "value": pick[metric], "best_case": best["case"], "best_value": best[metric], "margin": margin,
            "cost": cost, "cost_value": pick[key], "cost_vs_best": round(ratio, 3) if ratio is not None else None,
            "eligible": [r["case"] for r in eligible], "rule": f"cheapest by {label} among cases with {metric} >= "
            f"best - {margin:g}; ties: shorter step, then higher quality", "text": text,
            "finetune": pick.get("finetune")}


def pareto_front(rows: list[dict], metric: str, cost_key: str) -> list[str]:
    """Cases no other case beats on both quality (higher) and cost (lower)."""
    pts = [r for r in rows if _num(r.get(metric)) is not None and _num(r.get(cost_key)) is not None]
    front = []
    for r in pts:
        dominated = any(o is not r and o[metric] >= r[metric] and o[cost_key] <= r[cost_key]
                        and (o[metric] > r[metric] or o[cost_key] < r[cost_key]) for o in pts)
        if not dominated:
            front.append(r["case"])
    return front


def spreads(rows: list[dict], metric: str) -> dict:
    """Placement vs method: for each cost, the mean max/min ratio across methods at one placement and across
    placements for one method (quality: the mean max - min difference). Only groups with 2+ cases count."""
    out = {}
    for key in (*SPREAD_KEYS, metric):
        by_place: dict[str, list[float]] = {}
        by_method: dict[str, list[float]] = {}
        for r in rows:
            v = _num(r.get(key))
            if v is not None and (v > 0 or key == metric):
                by_place.setdefault(r["placement"], []).append(v)
                by_method.setdefault(r["method"], []).append(v)

        def mean_spread(groups, key=key):
            vals = [(max(g) - min(g)) if key == metric else max(g) / min(g) for g in groups.values() if len(g) > 1]
            return round(sum(vals) / len(vals), 3) if vals else None

        out[key] = {"across_methods": mean_spread(by_place), "across_placements": mean_spread(by_method),
                    "kind": "difference" if key == metric else "max/min ratio"}
    return out


def versus_all(rows: list[dict], metric: str) -> list[dict]:
    """Each method's other placements against its own all-block case: quality difference and cost ratios."""
    out = []
    for r in rows:
        ref = next((o for o in rows if o["method"] == r["method"] and o["placement"] == "all"), None)
        if ref is None or r is ref or _num(r.get(metric)) is None or _num(ref.get(metric)) is None:
            continue
        item = {"case": r["case"], "vs": ref["case"], f"{metric}_difference": round(r[metric] - ref[metric], 4)}
        for key in SPREAD_KEYS:
            if _num(r.get(key)) and _num(ref.get(key)):
                item[f"{key}_ratio"] = round(r[key] / ref[key], 3)
        out.append(item)
    return out


def assemble(rows: list[dict], s, *, resumed_cases: int = 0) -> dict:
    """results.json's content from the case rows (adds mean_iou, ratios, Pareto flags, recommendation)."""
    done = measured(rows)
    for r in done:
        if _num(r.get("box_iou")) is not None and _num(r.get("point_iou")) is not None:
            r["mean_iou"] = round((r["box_iou"] + r["point_iou"]) / 2, 4)
    base = pick_baseline(done, s.baseline)
    for r in done:
        for key, ratio in RATIOS:
            if base is not None and _num(r.get(key)) is not None and _num(base.get(key)):
                r[ratio] = round(r[key] / base[key], 3)
        if base is not None and _num(r.get(s.metric)) is not None and _num(base.get(s.metric)) is not None:
            r[f"{s.metric}_vs_baseline"] = round(r[s.metric] - base[s.metric], 4)
    fronts = {name: pareto_front(done, s.metric, COSTS[name][0]) for name in ("train_memory", "step_time")}
    for r in done:
        r["pareto_train_memory"] = r["case"] in fronts["train_memory"]
        r["pareto_step_time"] = r["case"] in fronts["step_time"]
    return {"kind": "study", "version": 1, "machine": machine_info(),
            "settings": {**s.to_dict(), "metric_label": METRICS[s.metric], "cost_label": COSTS[s.cost][1],
                         "memory_kind": "cuda max_memory_allocated" if s.device == "cuda" else "peak RSS",
                         "baseline": base["case"] if base else None,
                         "order": "each case in fresh processes: memory alone, then training + validation"},
            "recommendation": recommend(done, s.metric, s.cost, s.margin),
            "pareto": fronts, "spreads": spreads(done, s.metric), "versus_all": versus_all(done, s.metric),
            "resumed_cases": resumed_cases, "cases": rows}


def _fmt(v: Any, spec: str = "{:.3f}") -> str:
    return "" if _num(v) is None else spec.format(v)


def markdown_table(results: dict) -> str:
    """The study table (Markdown): quality, cost and ratios to the baseline, one row per case."""
    s, m = results["settings"], results["machine"]
    ais = any("ais_msa" in r for r in results["cases"])
    head = ["case", "blocks", "enc. params", "box IoU", "point IoU", "box mSA", "point mSA", *(["AIS mSA"] if ais
            else []), f"Δ {s['metric']}", "step s", "×", "peak MiB", "×", "train MiB", "×", "min/case"]
    lines = [f"**{s['model']}** on {s['data']}, {s['budget']} per case (seed {s['seed']}, batch {s['batch_size']}, "
             f"{s['objects_per_image']} objects, {s['sub_iterations']} sub-iteration(s), lr {s['lr']:g}); "
             f"{m['cpu']}, {m['cpu_count']} cores" + (f", GPU {', '.join(m['gpus'])}" if m["gpus"] else "")
             + f"; memory: {s['memory_kind']}; baseline: {s['baseline']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["cases"]:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["case"], r.get("blocks", ""), f"{r.get('trainable_encoder_params', 0):,}",
                 *[_fmt(r.get(k)) for k in ("box_iou", "point_iou", "box_msa", "point_msa")],
                 *([_fmt(r.get("ais_msa"))] if ais else []), _fmt(r.get(f"{s['metric']}_vs_baseline"), "{:+.3f}"),
                 _fmt(r.get("step_median_s"), "{:.2f}"), _fmt(r.get("step_vs_baseline"), "{:.2f}"),
                 _fmt(r.get("peak_memory_mib"), "{:.0f}"), _fmt(r.get("memory_vs_baseline"), "{:.2f}"),
                 _fmt(r.get("train_memory_mib"), "{:.0f}"), _fmt(r.get("train_memory_vs_baseline"), "{:.2f}"),
                 _fmt(r.get("case_minutes"), "{:.1f}")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    rec = results["recommendation"]
    lines += ["", f"Recommendation ({rec.get('rule', '')}): **{rec['text']}**"]
    return "\n".join(lines) + "\n"


def write_study_results(out_dir: Path, results: dict) -> list[Path]:
    j, c = write_results(out_dir, results, results["cases"])
    table = atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(markdown_table(results)))
    return [j, c, table, plot_study(out_dir / "study.png", results)]
