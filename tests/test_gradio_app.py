"""The Gradio app through gradio_client on loopback: streamed training, stop, downloads, one run at a time,
bad input, the compare tab, and what the server refuses to serve. The app runs in a subprocess started
from a folder that is not the repo, as a user would run it."""

import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gradio_client import Client
from gradio_client.exceptions import ValidationError

import gradio_app as ga
from rlr_app.form import DEFAULT_FLOW_MODEL
from rlr_backend.advise import CANDIDATES
from test_gradio_form import form  # the tiny form settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port``, from /proc/net/tcp{,6} (hex, little-endian IPv4)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    out.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    out.add("ipv6:" + addr)
    return out


@contextlib.contextmanager
def launch_app(home: Path, *args: str):
    """Run ``gradio_app.py`` in ``home`` (not the repo) on a free loopback port until the block ends."""
    out = home / "runs"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = open(home / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "gradio_app.py"), "--port", str(port), "--output-dir",
                             str(out), "--threads", "1", *args], cwd=home, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail(f"the app did not start: {(home / 'app.log').read_text()[-2000:]}")
        yield {"url": url, "port": port, "out": out, "home": home, "proc": proc, "log": home / "app.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    home = tmp_path_factory.mktemp("app")  # the working folder: not the repo
    (home / "canary.txt").write_text("CANARY-CWD")
    with launch_app(home) as running:
        yield running
        cache = served_cache(running)
    # after the app has exited: its private cache is gone, and nothing was written outside the run folders
    assert not cache.exists()
    assert sorted(p.name for p in home.iterdir()) == ["app.log", "canary.txt", "runs"]
    assert [p.name for p in (home / "runs").iterdir() if p.name.startswith(".") or not p.is_dir()] == []


def runs_in(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} if out.is_dir() else set()


def gallery_step(outputs) -> int | None:
    """Step of the "now" row of the last gallery update ("...: step 0 (top) vs step N (bottom)")."""
    for o in reversed(outputs):
        if isinstance(o[1], list) and o[1]:
            return int(o[1][0]["caption"].split("vs step ")[1].split()[0])
    return None


def wait_for(pred, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- without a server ------------------------------------------------------------------------------
def test_default_bind_is_loopback_only(app):
    assert listening_addresses(app["port"]) == {"127.0.0.1"}


def test_train_streams_survives_a_closed_tab_stops_and_the_lora_loads(app):
    before = runs_in(app["out"])
    client = Client(app["url"], verbose=False)
    t0 = time.monotonic()
    job = client.submit(*form(steps=400), api_name="/train")
    first_refresh = wait_for(lambda: (gallery_step(job.outputs()) or 0) >= 2, what="a refreshed gallery")
    assert first_refresh
    elapsed = time.monotonic() - t0
    curve = wait_for(lambda: next((o[2] for o in reversed(job.outputs()) if isinstance(o[2], str)), None),
                     what="a reward curve")
    assert Path(curve).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # closing the tab (the client leaves) does not stop training; a new page sees the run
    job.cancel()
    watcher = Client(app["url"], verbose=False).submit(api_name="/watch")
    wait_for(lambda: any("<b>running</b>" in o[0] for o in watcher.outputs()), what="the run in a new page")
    step_seen = wait_for(lambda: (gallery_step(watcher.outputs()) or 0) >= 4, what="training going on")
    assert step_seen
    msg = client.predict(api_name="/stop")
    k = int(msg.split("the LoRA of update ")[1].split()[0])
    final = watcher.result()
    assert "<b>stopped</b>" in final[0], final[0]
    done = int(final[0].split("update ")[1].split(" / 400")[0])
    assert k <= done <= k + 1  # the update in progress is dropped (k + 1 if it finished as the click came)
    (new_run,) = runs_in(app["out"]) - before
    lora = next(Path(f) for f in final[4] if f.endswith("lora.safetensors"))
    from rlr_backend.lora import load_lora
    from rlr_backend.safe_io import load_tensors
    from rlr_backend.models.loader import load_pipeline

    tensors, meta = load_tensors(lora)
    assert int(meta["rlr_steps"]) == done and meta.get("rlr_interrupted_at_step") == meta["rlr_steps"]
    load_lora(load_pipeline(None).unet, lora)
    assert tensors.keys() == load_tensors(app["out"] / new_run / "lora.safetensors")[0].keys()
    print(f"first refreshed gallery (step 2 of a tiny run) {elapsed:.1f} s after submit")


def test_two_submissions_never_train_at_once(app):
    before = runs_in(app["out"])
    clients = [Client(app["url"], verbose=False) for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        finals = list(pool.map(lambda c: c.submit(*form(steps=3), api_name="/train").result(), clients))
    assert len(runs_in(app["out"]) - before) == 1
    notes = [f[0] for f in finals]
    assert sum("already in progress" in n for n in notes) == 1, notes
    assert all("<b>done</b>" in n for n in notes)  # the second tab watched the first one's run to its end


def test_bad_input_is_refused_before_anything_starts(app):
    before = runs_in(app["out"])
    client = Client(app["url"], verbose=False)
    cases = [({"steps": 0}, "steps: must be >= 1"), ({"prompts": "\n \n"}, "prompts: enter at least one prompt"),
             ({"w:prompt_alignment": "NaN"}, "w_prompt_alignment: weight must be a finite"),  # JSON has no NaN
             ({"batch_size": 3}, "batch_size .*multiple")]
    for change, text in cases:
        with pytest.raises(ValidationError, match=text):
            client.predict(*form(**change), api_name="/train")
    with pytest.raises(httpx.HTTPStatusError, match="400 Bad Request"):  # not one of the dropdown's choices
        client.predict(*form(model="/etc"), api_name="/train")
    assert runs_in(app["out"]) == before


def test_picking_a_model_sets_its_defaults_and_shows_its_options(app):
    """The model dropdown's event: the kind's steps and guidance (here the flow default's rlr_defaults.json),
    the flow options' group shown and DDIM's eta hidden for a flow model, the reverse for the UNet default."""
    client = Client(app["url"], verbose=False)
    flow = client.predict(DEFAULT_FLOW_MODEL, api_name="/model_defaults")
    unet = client.predict(ga.DEFAULT_MODEL, api_name="/model_defaults")
    assert flow[:3] == unet[:3] == (20, 4.0, 4)  # steps, guidance, fo_steps: both defaults use TrainConfig's
    assert flow[3:8] == (0, "flow_sde", 0.7, 0, 0)  # image size, step kind, flow eta, SDE window
    assert flow[-1]["visible"] is False and unet[-1]["visible"] is True  # DDIM eta (the group has no value)


def test_compare_tab_and_compare_estimators(app):
    client = Client(app["url"], verbose=False)
    final = client.submit(*form(steps=2), "ddpo", api_name="/compare_estimators").result()
    assert "<b>done</b>" in final[0] and "run 2 of 2" in final[0]
    runs = [r for r in runs_in(app["out"]) if "-cmp-" in r]
    assert sorted(r.split("-cmp-")[1] for r in runs) == ["ddpo", "rlr"]
    watched = client.submit(api_name="/watch").result()  # a new page shows the finished job
    assert "rlr: done after 2 updates" in watched[3] and "ddpo: done after 2 updates" in watched[3]
    assert sorted(Path(f).name.split("-cmp-")[1] for f in watched[4] if f.endswith(".safetensors")) == [
        "ddpo-lora.safetensors", "rlr-lora.safetensors"]
    run = sorted(runs)[0]
    same = client.predict(run, "a red circle on a blue background", 3, 0.0, 1, api_name="/compare_lora")
    diff = client.predict(run, "a red circle on a blue background", 3, 2.0, 1, api_name="/compare_lora")
    assert len(same) == len(diff) == 2
    read = [[Path(item["image"]).read_bytes() for item in g] for g in (same, diff)]
    assert read[0][0] == read[0][1] and read[1][0] == read[0][0] and read[1][1] != read[1][0]
    with pytest.raises(Exception, match="unknown run"):
        client.predict("../x", "a red circle", 0, 1.0, 1, api_name="/compare_lora")


def served_cache(app) -> Path:
    """The app's private cache folder, from its start-up line in the log."""
    line = next(line for line in app["log"].read_text().splitlines() if "serving on" in line)
    return Path(line.rsplit(", cache ", 1)[1].rstrip(")"))


def test_advise_button_measures_the_form_and_refuses_bad_targets(app):
    """The Advise button runs rlr-advise on the form's model, reward and prompts (a structure reward with its
    target here); a bad target is refused with the field's message before anything runs."""
    client = Client(app["url"], verbose=False)
    rewards = {"w:prompt_alignment": 0, "w:brightness": 0, "w:position": 1, "a:position": "right"}
    with pytest.raises(Exception, match="unknown position target"):
        client.predict(*form(**{**rewards, "a:position": "middle"}), api_name="/advise")
    text = client.predict(*form(**rewards), api_name="/advise")
    assert "reward position:right=1" in text and "recommended:" in text and "truncated_bp (K=2)" in text
    header = next(line for line in text.splitlines() if line.startswith("estimator"))
    rows = text.splitlines()[text.splitlines().index(header) + 1:][:len(CANDIDATES)]
    assert all(int(row.split()[-1]) > 0 for row in rows), rows  # every candidate's peak memory, in MB


def test_files_outside_the_output_folder_are_refused(app):
    out, home = app["out"], app["home"]
    cache = served_cache(app)
    run = next(r for r in runs_in(out) if (out / r / "lora.safetensors").is_file())
    staged = cache / "downloads" / run / f"{run}-lora.safetensors"
    assert staged.is_file()

    def get(path: str) -> httpx.Response:
        return httpx.get(app["url"] + "gradio_api/file=" + path, timeout=10)

    assert get(str(staged)).status_code == 200  # what the app hands out is served
    refused = [
        "/etc/passwd", str(home / "canary.txt"), str(REPO / "pyproject.toml"),
        str(REPO / "rlr_backend" / "assets" / "default_model" / "model_index.json"),
        str(out / run / "config.json"), str(out / run / "ckpt" / "LATEST"),  # run folders: only staged copies
        f"{cache}/../{run}/config.json", f"{cache}/..%2f{run}/config.json", f"{cache}/%2e%2e/{run}",
        f"{cache}/../../etc/passwd",
        "../../../../etc/passwd", "file:///etc/passwd",
    ]
    for path in refused:
        r = get(path)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert b"CANARY" not in r.content and b"root:" not in r.content


def test_the_run_viewer_refuses_a_run_folder_holding_a_symlink(app):
    """A symlink planted in a run folder (here: the LoRA -> /etc/passwd) is never staged or served."""
    import shutil

    out = app["out"]
    run = next(r for r in runs_in(out) if (out / r / "lora.safetensors").is_file())
    client = Client(app["url"], verbose=False)
    files, *_ = client.predict(run, api_name="/show_run")
    assert files and all(Path(f["path"] if isinstance(f, dict) else f).is_file() for f in files)
    planted = out / "planted"
    shutil.copytree(out / run, planted, ignore=shutil.ignore_patterns("ckpt"))
    try:
        (planted / "lora.safetensors").unlink()
        (planted / "lora.safetensors").symlink_to("/etc/passwd")
        with pytest.raises(Exception, match="symbolic link"):
            client.predict("planted", api_name="/show_run")
        staged = out / ".gradio" / "downloads" / "planted"
        assert not staged.exists() or all(b"root:" not in p.read_bytes() for p in staged.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(planted)


def test_other_origins_get_no_cross_origin_grant(app):
    """A page on another site cannot drive the app from a visitor's browser (CSRF): the JSON API needs a
    CORS preflight, and only the app's own origin is granted."""
    before = runs_in(app["out"])
    join = app["url"] + "gradio_api/queue/join"
    for origin in ("https://evil.example", "null", app["url"].rstrip("/")):
        pre = httpx.options(join, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "content-type"}, timeout=10)
        post = httpx.post(join, json={"data": [], "fn_index": 0, "session_hash": "csrf"},
                          headers={"Origin": origin}, timeout=10)
        granted = {pre.headers.get("access-control-allow-origin"), post.headers.get("access-control-allow-origin")}
        assert granted == ({origin} if origin.startswith("http://127.0.0.1") else {None}), (origin, granted)
    assert runs_in(app["out"]) == before


def test_the_app_logged_no_exception(app):
    """Last in the file: nothing above made the app log a traceback (user errors are messages, not crashes)."""
    text = app["log"].read_text()
    for block in text.split("Traceback (most recent call last):")[1:]:
        error = next(line for line in block.splitlines() if line and not line.startswith(" "))
        assert error.startswith("gradio.exceptions.Error: "), block[-3000:]  # gr.Error: a message to the user
