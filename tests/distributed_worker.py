"""Run in every process of test_distributed.py's `accelerate launch`: several `rlr-train` runs in a row.

``python distributed_worker.py RUNS_JSON``: RUNS_JSON is a list of argument lists for ``train_main``,
the body of `rlr-train` (one launch for all runs, so the test pays the processes' start-up once).
"""

import json
import sys

from rlr_backend.cli import train_main

if __name__ == "__main__":
    for args in json.loads(sys.argv[1]):
        code = train_main(args)
        if code:
            sys.exit(code)
