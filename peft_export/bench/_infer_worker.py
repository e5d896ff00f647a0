"""Fresh-process worker: peak memory of one inference case (payload as JSON on stdin, result as JSON line)."""

from __future__ import annotations

import json
import sys

from peft_export._malloc import tune_malloc


def main() -> None:
    tune_malloc()
    payload = json.loads(sys.stdin.read())
    from peft_export.bench.infer import measure_case_memory

    print(json.dumps(measure_case_memory(payload["case"], int(payload["prompts"]))))


if __name__ == "__main__":
    main()
