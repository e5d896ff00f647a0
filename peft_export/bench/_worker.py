"""Fresh-process worker for :func:`peft_export.bench.common.run_isolated`.

Reads ``{"function": "module:name", "kwargs": {...}}`` as JSON on stdin, calls the function and prints its JSON
result as the last line.
"""

from __future__ import annotations

import importlib
import json
import sys


def main() -> None:
    payload = json.loads(sys.stdin.read())
    module, name = payload["function"].split(":")
    result = getattr(importlib.import_module(module), name)(**payload["kwargs"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
