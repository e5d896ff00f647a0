"""``peft-export evaluate --auto``: automatic segmentation scored without prompts (issue 14's instance metrics).

The logic is :func:`peft_export.runtime.evaluate.evaluate_instances`; this module prints it.
"""

from __future__ import annotations

import time

from rich.table import Table

from peft_export.errors import DataError
from peft_export_cli import common


def evaluate_auto(backend, desc: dict, pairs, data: str, split: str, auto, tiling, batch_size: int | None,
                  json_out: bool, quiet: bool, t0: float) -> None:
    from peft_export.runtime.evaluate import evaluate_instances

    with common.progress_bar("evaluating", pairs.count(), enabled=not (quiet or json_out)) as bar:
        res = evaluate_instances(backend, pairs, auto, tiling=tiling, batch_size=batch_size, progress=bar.advance)
    if not quiet:
        common.info(f"note: {res['why']}")
        if res.get("advice"):
            common.warn(res["advice"])
    per_image = res.pop("per_image")
    report = {**desc, "data": data, "split": split, "settings": {"auto": auto.to_dict(), "tiling": tiling.to_dict()},
              "images": len(per_image), "auto": res, "per_image": per_image,
              "skipped": pairs.failed, "empty": pairs.empty, "seconds": round(time.perf_counter() - t0, 2)}
    if json_out:
        common.print_json(report)
    else:
        how = {"instance": "instance decoder + watershed (AIS)", "apg": "instance decoder seeds as point prompts "
               "(APG)"}.get(res["method"], "point grid")
        table = Table(title=f"{desc['model']} on {data} ({split}, {len(per_image)} images, {desc['backend']}, "
                            f"automatic: {how})")
        for col in ("mSA", "precision", "recall", "F1 @0.5", "objects (pred / true)", "s / image"):
            table.add_column(col, justify="right")
        secs = sum(r["seconds_embedding"] + r["seconds_after_embedding"] for r in per_image) / max(1, len(per_image))
        table.add_row(f"{res['msa']:.3f}", f"{res['precision']:.3f}", f"{res['recall']:.3f}", f"{res['f1']:.3f}",
                      f"{res['objects_pred']} / {res['objects_true']}", f"{secs:.2f}")
        common.out.print(table)
    if pairs.failed:
        first = pairs.failed[0]
        raise DataError(f"{len(pairs.failed)} input(s) skipped (listed in the report): first: {first['input']}: "
                        f"{first['error']}")
