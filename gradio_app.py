"""The Gradio app: pick prompts and rewards, press Train, watch the samples improve.

    python gradio_app.py [--host 127.0.0.1] [--port 7860] [--models-dir DIR] [--output-dir runs] [--auth USER:PASS]

An adapter only: ``rlr_app.form`` turns form values into a ``TrainConfig``, the backend's ``RunManager``
(a worker thread owned by the app, one job at a time) trains it, ``rlr_app.render`` draws the job's
state, and ``rlr_app.page`` builds the page's panels and tabs, which ``build_ui`` lays out. Closing or
reloading the page does not stop a run; a reopened page shows it. Gradio is imported only inside
``build_ui`` and ``main``.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from rlr_app.form import DEFAULT_MODEL, FORM_KEYS, MODEL_LOCK, Settings, check_form, form_defaults, list_models, reward_facts
from rlr_app.render import curve_figure, curve_image
from rlr_backend.rewards import REWARDS, make_reward
from rlr_backend.train import TrainConfig
from rlr_backend.train.runner import RunManager

__all__ = ["DEFAULT_MODEL", "FORM_KEYS", "REWARDS", "Settings", "TrainConfig", "build_ui", "check_form", "curve_figure",
           "curve_image", "form_defaults", "list_models", "main", "parser"]

logger = logging.getLogger("rlr_app")


# -- the page ---------------------------------------------------------------------------------------
def build_ui(settings: Settings, manager: RunManager | None = None):
    """The gr.Blocks page; ``manager`` owns the training worker (one per app). Each panel is built by its
    module in ``rlr_app.page`` and wired once every component exists."""
    import gradio as gr

    from rlr_app.page import Page, advise, compare_estimators, compare_lora, form_panel, results, training

    page = Page.create(settings, manager)
    for name in REWARDS:
        reward_facts(name)  # now, before requests come: later a pipeline load may hold the lock
    with gr.Blocks(title="RLR reward fine-tuning", analytics_enabled=False) as demo:
        gr.Markdown("## RLR reward fine-tuning\nPick prompts and a reward, press **Train**, and watch the same "
                    "seeds' samples move toward the reward (top: before training, bottom: now).")
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                form = form_panel.build(page)
                compare = compare_estimators.build()
                advice = advise.build()
            with gr.Column(scale=3):
                controls = training.build_controls()
                with gr.Tabs():
                    with gr.Tab("Live"):
                        live = training.build_live(page)
                    with gr.Tab("Results"):
                        runs = results.build()
                    with gr.Tab("Compare"):
                        lora = compare_lora.build()
        training.wire_train(page, form, controls, live)
        compare_estimators.wire(page, form, compare, live)
        training.wire_stop(page, controls)
        advise.wire(page, form, advice)
        training.wire_page_load(page, demo, form, live)
        form_panel.wire(page, form)
        results.wire(page, demo, runs, lora.run, lora.refresh)
        compare_lora.wire(page, lora)
    return demo


# -- launch -----------------------------------------------------------------------------------------
def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlr-app", description="The RLR training app in a browser tab.")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only); others need --auth")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--models-dir", type=Path, help="folder whose diffusers model folders the model list shows")
    ap.add_argument("--output-dir", type=Path, default=Path("runs"), help="folder for run folders (default runs)")
    ap.add_argument("--auth", help="USER:PASSWORD required to open the page (or set RLR_APP_AUTH)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    auth_text = args.auth or os.environ.get("RLR_APP_AUTH")
    auth = None
    if auth_text:
        user, _, password = auth_text.partition(":")
        if not user or not password:
            print("rlr-app: error: --auth must be USER:PASSWORD", file=sys.stderr)
            return 2
        auth = (user, password)
    if not _loopback(args.host) and auth is None:
        print(f"rlr-app: error: --host {args.host} would expose the app to the network; set --auth USER:PASSWORD "
              "(or RLR_APP_AUTH), or keep the default 127.0.0.1", file=sys.stderr)
        return 2
    if args.models_dir is not None and not args.models_dir.is_dir():
        print(f"rlr-app: error: --models-dir {args.models_dir} is not a folder", file=sys.stderr)
        return 2
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(output_dir, args.models_dir.resolve() if args.models_dir else None)
    # Gradio's cache (the only folder it serves files from, and where Gradio keeps its own state) is a
    # private temporary folder of this process, removed when it exits: nothing lands outside the run folders.
    cache = Path(tempfile.mkdtemp(prefix="rlr-app-"))
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a plain `kill` also runs the clean-up
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(cache / "examples")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from rlr_backend.models.default_model import DEFAULT_MODEL_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    demo = build_ui(settings)
    threading.Thread(target=_warm_up, name="rlr-warm-up", daemon=True).start()
    blocked = [str(DEFAULT_MODEL_DIR.parent)] + ([str(settings.models_dir)] if settings.models_dir else [])
    logger.info("serving on http://%s:%d (output folder %s, cache %s)", args.host, args.port, output_dir, cache)
    demo.queue(max_size=32, default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=False, auth=auth, allowed_paths=[],
        blocked_paths=blocked, max_file_size="1mb", show_error=False, ssr_mode=False, run_history=False,
        enable_monitoring=False, mcp_server=False, quiet=True)
    return 0


def _warm_up() -> None:
    """Import the model code while the page loads, so the first Train does not wait for it."""
    from rlr_backend.cli import quiet_libraries
    from rlr_backend.models.loader import load_pipeline

    try:
        with MODEL_LOCK:
            quiet_libraries()  # no loading bars or torchvision notices in the app's log
            load_pipeline(None)
            make_reward(TrainConfig().reward)
    except Exception:  # noqa: BLE001 -- only a warm-up; the first run reports any real problem
        logger.exception("warm-up failed")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
