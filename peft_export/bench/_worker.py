"""Fresh-process worker for :func:`peft_export.bench.common.run_worker` (and ``run_isolated``).

Reads ``{"function": "module:name", "kwargs": {...}}`` as JSON on stdin, calls the function and prints its JSON
result as the last line. A :class:`~peft_export.errors.PeftExportError` becomes its one-line message on stderr
and the error's exit code (the parent shows that line).
"""

from __future__ import annotations

import importlib
import json
import signal
import sys

from peft_export.errors import PeftExportError, first_line


def main() -> None:
    # the parent forwards Ctrl-C as one SIGINT: honour it even when started with SIGINT ignored (nohup, cmd &)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    payload = json.loads(sys.stdin.read())
    module, name = payload["function"].split(":")
    try:
        result = getattr(importlib.import_module(module), name)(**payload["kwargs"])
    except PeftExportError as exc:
        print(first_line(exc), file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
