"""PNG plots of benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from peft_export.data.io import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_infer(path: Path, results: dict) -> Path:
    """Horizontal bars: encoder and decoder median latency per case (skipped cases left out)."""
    plt = _plt()
    rows = [r for r in results["cases"] if "skipped" not in r]
    prompts = results["settings"]["prompts"]
    parts = [("encoder", "encoder"), ("decoder_1", "decoder, 1 prompt"), (f"decoder_{prompts}",
                                                                          f"decoder, {prompts} prompts")]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 0.5 * max(len(rows), 2) + 1.5), sharey=True)
    names = [r["case"] for r in rows]
    for ax, (key, title) in zip(axes, parts):
        vals = [r.get(f"{key}_median_ms", 0) for r in rows]
        ax.barh(range(len(rows)), vals, color="#4c72b0")
        ax.set_title(f"{title} (median ms)")
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    return _save(plt, fig, path, "inference latency", results["machine"])


def plot_train(path: Path, results: dict) -> Path:
    """Step time and peak memory vs placement, one line per method."""
    plt = _plt()
    rows = [r for r in results["cases"] if "skipped" not in r and r.get("step_median_s") is not None]
    placements = list(dict.fromkeys(r["placement"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        pts = {r["placement"]: r for r in rows if r["method"] == method}
        xs = [i for i, p in enumerate(placements) if p in pts]
        a1.plot(xs, [pts[placements[i]]["step_median_s"] for i in xs], marker="o", label=method)
        a2.plot(xs, [pts[placements[i]].get("peak_memory_mib") or float("nan") for i in xs], marker="o", label=method)
    for ax, title in ((a1, "step time (median s)"), (a2, "peak memory (MiB)")):
        ax.set_xticks(range(len(placements)), placements)
        ax.set_xlabel("placement (encoder blocks trained)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if methods:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no case was measured (all skipped)", ha="center", va="center", transform=ax.transAxes)
    return _save(plt, fig, path, f"{results['settings']['model']} training cost vs placement", results["machine"])


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_study(path: Path, results: dict) -> Path:
    """Quality vs training memory and vs step time: one point per case (colour: method, marker: placement), the
    Pareto front of each panel, the best-quality margin and the recommended case ringed."""
    plt = _plt()
    s, rec = results["settings"], results["recommendation"]
    metric = s["metric"]
    rows = [r for r in results["cases"] if "skipped" not in r and r.get(metric) is not None]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    placements = list(dict.fromkeys(r["placement"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, (key, label, front) in zip(axes, (("train_memory_mib", f"training memory (MiB, {s['memory_kind']})",
                                               "pareto_train_memory"),
                                              ("step_median_s", "training step time (median s)",
                                               "pareto_step_time"))):
        pts = [r for r in rows if r.get(key) is not None]
        for r in pts:
            ax.scatter(r[key], r[metric], color=colors[methods.index(r["method"]) % len(colors)],
                       marker=_MARKERS[placements.index(r["placement"]) % len(_MARKERS)], s=55, zorder=3)
            ax.annotate(r["case"], (r[key], r[metric]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        line = sorted((r for r in pts if r.get(front)), key=lambda r: r[key])
        if line:
            ax.step([r[key] for r in line], [r[metric] for r in line], where="post", color="0.5", lw=1,
                    ls="--", zorder=2, label="Pareto front")
        if rec.get("case"):
            ax.axhline(rec["best_value"] - rec["margin"], color="#c44e52", lw=0.8, ls=":",
                       label=f"best - margin ({rec['margin']:g})")
            for r in pts:
                if r["case"] == rec["case"]:
                    ax.scatter(r[key], r[metric], s=260, facecolors="none", edgecolors="#c44e52", lw=1.6,
                               zorder=4, label=f"recommended: {r['case']}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no case was measured", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel(s.get("metric_label", metric))
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], marker="o", ls="", label=m)
               for i, m in enumerate(methods)]
    handles += [plt.Line2D([], [], color="0.3", marker=_MARKERS[i % len(_MARKERS)], ls="", label=p)
                for i, p in enumerate(placements)]
    axes[0].legend(handles=handles, fontsize=7, loc="best", framealpha=0.8, title="method / placement",
                   title_fontsize=7)
    if rows:
        axes[1].legend(fontsize=7, loc="best", framealpha=0.8)
    title = f"{s['model']} on {s['data']}: quality vs cost, {s['budget']} per case"
    return _save(plt, fig, path, title, results["machine"])


def _save(plt, fig, path: Path, title: str, machine: dict) -> Path:
    """Title with the hardware it was measured on, then an atomic PNG write."""
    fig.suptitle(f"{title} — {machine['cpu']} ({machine['cpu_count']} cores)"
                 + (f", GPU {', '.join(machine['gpus'])}" if machine["gpus"] else ""), fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
