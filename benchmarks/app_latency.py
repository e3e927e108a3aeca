"""How fast the Gradio app shows training: time from pressing Train to the first gallery (the "before"
samples) and to the first refreshed gallery, and updates per minute, with the app's default form.

    python -m benchmarks.app_latency [--steps 15] [--threads 1] [--cold]

Starts ``gradio_app.py`` on a free loopback port in a temporary folder, submits the default form
through gradio_client (only ``steps`` changed) and stops after the run. ``--cold`` presses Train as
soon as the page answers (the model code is still being imported); otherwise it waits 30 s first.
Prints one markdown row with the machine load.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="press Train as soon as the page answers")
    args = ap.parse_args()
    import httpx
    from gradio_client import Client

    sys.path.insert(0, str(REPO))
    import gradio_app as ga

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="rlr-app-bench-"))
    log = open(home / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "gradio_app.py"), "--port", str(port), "--output-dir",
                             str(home / "runs"), "--threads", str(args.threads)], cwd=home, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}/"
    try:
        t_launch = time.monotonic()
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        page_s = time.monotonic() - t_launch
        if not args.cold:
            time.sleep(30)
        values = {**ga.form_defaults(), "steps": args.steps}
        load_before = os.getloadavg()
        t0 = time.monotonic()
        job = Client(url, verbose=False).submit(*[values[k] for k in ga.FORM_KEYS], api_name="/train")
        first = refreshed = None
        seen = 0
        while not job.done():
            outs = job.outputs()
            for o in outs[seen:]:
                if isinstance(o[1], list) and o[1]:
                    step = int(o[1][0]["caption"].split("vs step ")[1].split()[0])
                    now = time.monotonic() - t0
                    first = first if first is not None else now
                    if step > 0 and refreshed is None:
                        refreshed = now
            seen = len(outs)
            time.sleep(0.05)
        status = job.result()[0]
        rate = re.search(r"([\d.]+) s/update \(([\d.]+) per min\)", status)
        print(f"| {'cold' if args.cold else 'warm'} | {page_s:.1f} | {first:.1f} | {refreshed:.1f} | "
              f"{float(rate.group(2)):.1f} | {args.threads} | {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    main()
