"""``peft-export evaluate --auto``: automatic segmentation scored without prompts (issue 14's instance metrics).

The logic is :func:`peft_export.runtime.instances.evaluate_instances`; this module prints it.
"""

from __future__ import annotations

import time

from rich.table import Table

from peft_export_cli import common


def evaluate_auto(backend, desc: dict, pairs, data: str, split: str, method: str, tiling, batch_size: int,
                  json_out: bool, quiet: bool, t0: float, options=None) -> None:
    from peft_export.errors import DataError
    from peft_export.runtime.auto import AutoConfig
    from peft_export.runtime.instances import evaluate_instances
    from peft_export.runtime.strategy import Configs, choose

    method = choose(backend, method).method
    configs = Configs.from_options(options, AutoConfig())
    with common.progress_bar("evaluating", pairs.count(), enabled=not (quiet or json_out)) as bar:
        res = evaluate_instances(backend, pairs, method=method, tiling=tiling, batch_size=batch_size,
                                 progress=bar.advance, configs=configs)
    per_image = res.pop("per_image")
    report = {**desc, "data": data, "split": split, "images": len(per_image), "auto": res, "per_image": per_image,
              "skipped": pairs.failed, "empty": pairs.empty, "seconds": round(time.perf_counter() - t0, 2)}
    if json_out:
        common.print_json(report)
    else:
        how = {"instance": "instance decoder + watershed (AIS)", "apg": "instance decoder seeds as point prompts "
               "(APG)"}.get(method, "point grid")
        table = Table(title=f"{desc['model']} on {data} ({split}, {len(per_image)} images, {desc['backend']}, "
                            f"automatic: {how})")
        for col in ("mSA", "precision", "recall", "F1 @0.5", "objects (pred / true)", "s / image"):
            table.add_column(col, justify="right")
        secs = sum(r["seconds_embedding"] + r["seconds_after_embedding"] for r in per_image) / max(1, len(per_image))
        table.add_row(f"{res['msa']:.3f}", f"{res['precision']:.3f}", f"{res['recall']:.3f}", f"{res['f1']:.3f}",
                      f"{res['objects_pred']} / {res['objects_true']}", f"{secs:.2f}")
        common.out.print(table)
    if not quiet:
        common.info(f"note: automatic segmentation: {res['reason']}")
        if res.get("advice"):
            common.warn(res["advice"])
    if pairs.failed:
        first = pairs.failed[0]
        raise DataError(f"{len(pairs.failed)} input(s) skipped (listed in the report): first: {first['input']}: "
                        f"{first['error']}")
