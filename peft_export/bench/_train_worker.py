"""Fresh-process worker: peak memory of one training case (payload as JSON on stdin, result as JSON line)."""

from __future__ import annotations

import json
import sys

from peft_export._malloc import tune_malloc


def main() -> None:
    tune_malloc()
    payload = json.loads(sys.stdin.read())
    from peft_export.bench.train import measure_case_memory

    print(json.dumps(measure_case_memory(payload["method"], payload["placement"], payload["settings"])))


if __name__ == "__main__":
    main()
