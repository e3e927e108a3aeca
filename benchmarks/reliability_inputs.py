"""The battery's input cases (see benchmarks/reliability.py): damaged files, pickles at every entry point,
traversal names and planted symlinks. Each case runs a real entry point and records whether it was
refused with one line (exit code 2 in the CLI) and left every file as it was."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from rlr_backend.cli import sample_main, train_main
from rlr_backend.train import TrainConfig, Trainer

from . import faults
from .damage import (CHECKPOINT_MUTATIONS, FILE_MUTATIONS, RECOVERABLE_MUTATIONS, TRAVERSAL_NAMES, edit_tensors, latest,
                     plant_symlinks)
from .faults import ARGS, CFG, case, cli, refused, run_killed, same_run, snapshot

STANDIN = Path(__file__).parent.parent / "tests" / "comfy_standin"


# -- damaged inputs ----------------------------------------------------------------------------------
def damaged(work: Path, ref: Path, quick: bool) -> list[dict]:
    out = []
    cfg = TrainConfig(**CFG, output_dir=work / "partial", run_name="run")
    run_killed(Trainer(cfg, progress=False).run, "step:begin@5")  # checkpoints 2 and 4, LATEST = step-000004
    partial = cfg.run_dir
    sample = list(enumerate(CHECKPOINT_MUTATIONS))[::6 if quick else 1]
    for i, (name, mutate) in sample:
        folder = work / "mut" / str(i)
        shutil.copytree(partial, folder / "run")
        mutate(folder / "run")
        before = snapshot(folder)
        ok, detail = refused(*cli(train_main, faults.tiny_args(folder, "run", 6, *ARGS, "--resume")))
        out.append(case("damaged", f"checkpoint/run folder: {name}", ok and snapshot(folder) == before, detail))
    for name, mutate in RECOVERABLE_MUTATIONS:
        folder = work / "rec" / name.replace(" ", "_").replace("/", "_")
        shutil.copytree(partial, folder / "run")
        mutate(folder / "run")
        rc, err = cli(train_main, faults.tiny_args(folder, "run", 6, *ARGS, "--resume"))
        problem = f"exit code {rc}: {err.strip()[-200:]}" if rc != 0 else same_run(folder / "run", ref)
        out.append(case("recovered", name, not problem, problem or "resumed; bitwise equal"))
    good = (ref / "lora.safetensors").read_bytes()
    loras = [(n, m(good)) for n, m in FILE_MUTATIONS] + lora_tensor_cases(ref / "lora.safetensors")
    for i, (name, data) in enumerate(loras[::5 if quick else 1]):
        p, png = work / "lora" / f"{i}.safetensors", work / "lora" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        ok, detail = refused(*cli(sample_main, ["a red circle", "--num", "1", "--steps", "2", "--lora", str(p),
                                                "--out", str(png)]))
        out.append(case("damaged", f"LoRA file: {name}", ok and not png.exists(), detail))
    model = tiny_model(work)
    for name, mutate in model_cases()[::3 if quick else 1]:
        folder = work / "models" / name.replace(" ", "_").replace("/", "_")
        shutil.copytree(model, folder)
        mutate(folder)
        png = folder.parent / f"{folder.name}.png"
        ok, detail = refused(*cli(sample_main, ["a red circle", "--num", "1", "--steps", "2", "--model", str(folder),
                                                "--out", str(png)]))
        out.append(case("damaged", f"model folder: {name}", ok and not png.exists(), detail))
    out += reward_cases(work, quick)
    return out


def lora_tensor_cases(path: Path) -> list[tuple[str, bytes]]:
    """Valid safetensors files that are wrong as a LoRA for the default model."""
    from safetensors.torch import save

    from rlr_backend.safe_io import load_tensors

    sd, meta = load_tensors(path)
    key = sorted(k for k in sd if k.endswith("lora_down.weight"))[0]
    cases = {"wrong shape for the UNet": {**sd, key: sd[key][:, :1].clone()},
             "integer tensors": {k: v.long() for k, v in sd.items()},
             "up and down of different ranks": {**sd, key: torch.cat([sd[key], sd[key]])},
             "SDXL module names": {"lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn1_to_q.lora_down.weight":
                                   torch.zeros(4, 1280), "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn1"
                                   "_to_q.lora_up.weight": torch.zeros(1280, 4)},
             "a text-encoder key": {**sd, "lora_te_x.lora_down.weight": torch.zeros(4, 4)},
             "NaN in float16": {**sd, key: sd[key].clone().half().fill_(float("nan"))}}
    out = [(n, save(t, metadata=meta)) for n, t in cases.items()]
    out += [(f"a pickle ({form}) named .safetensors", data)
            for form, data in faults.pickle_payloads(Path("/nonexistent/canary")).items()]
    return out


def tiny_model(work: Path) -> Path:
    from rlr_backend.models.tiny_pipelines import save_tiny_pipeline

    path = work / "tiny-sd1"
    if not path.exists():
        save_tiny_pipeline("sd1", path)
    return path


def _tensor_file(folder: Path, comp: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = next((folder / comp).glob("*.safetensors"))
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f))


def _first(t: dict, pick=0) -> str:
    return sorted(k for k in t if t[k].dim() >= 1)[pick]


def model_cases() -> list[tuple[str, object]]:
    def sched(key, value):
        def apply(folder: Path) -> None:
            p = folder / "scheduler" / "scheduler_config.json"
            cfg = json.loads(p.read_text())
            cfg[key] = value
            p.write_text(json.dumps(cfg))
        return apply

    def tensors(comp, edit):
        return lambda folder: _tensor_file(folder, comp, edit)

    def nan(t):
        k = _first(t, 3)
        t[k] = t[k].clone()
        t[k].view(-1)[0] = float("nan")

    def index_outside(folder: Path) -> None:
        (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"x": "../../../etc/passwd"}}))

    return [("UNet weight NaN", tensors("unet", nan)),
            ("VAE weight inf", tensors("vae", lambda t: t.update({_first(t): t[_first(t)] * float("inf")}))),
            ("text encoder weight NaN", tensors("text_encoder", nan)),
            ("UNet weight of the wrong shape", tensors("unet", lambda t: t.update({_first(t): t[_first(t)][:1].clone()}))),
            ("UNet weight as integers", tensors("unet", lambda t: t.update({_first(t): t[_first(t)].long()}))),
            ("scheduler beta_start NaN", sched("beta_start", float("nan"))),
            ("scheduler beta_end inf", sched("beta_end", float("inf"))),
            ("scheduler beta_end > 1 (alphas outside (0, 1])", sched("beta_end", 2.0)),
            ("model_index.json not JSON", lambda f: (f / "model_index.json").write_text("{")),
            ("unet/config.json missing", lambda f: (f / "unet" / "config.json").unlink()),
            ("UNet weights truncated", lambda f: next((f / "unet").glob("*.safetensors")).write_bytes(b"\x00" * 16)),
            ("a sharded index naming a file outside", index_outside)]


def reward_cases(work: Path, quick: bool) -> list[dict]:
    """Damaged aesthetic-reward weights (head and CLIP tower), given to rlr-train through RLR_REWARD_MODELS."""
    root = work / "rewards"
    head = faults.tiny_aesthetic(root)
    tower = root / "clip_vision" / "clip-vit-large-patch14.safetensors"
    good = {p: p.read_bytes() for p in (head, tower)}
    muts = [(f"{p.parent.name}: {n}", p, m) for p in (head, tower) for n, m in FILE_MUTATIONS[::4 if quick else 2]]
    muts += [(f"aesthetic: {n}", head, m) for n, m in [
        ("wrong shape", edit_tensors(lambda t: t.update({"layers.2.weight": t["layers.2.weight"][:64].clone()}))),
        ("integer weights", edit_tensors(lambda t: t.update({"layers.0.weight": t["layers.0.weight"].long()}))),
        ("a tensor missing", edit_tensors(lambda t: t.pop("layers.7.bias")))]]
    out = []
    os.environ["RLR_REWARD_MODELS"] = str(root)
    try:
        for i, (name, path, mutate) in enumerate(muts):
            path.write_bytes(mutate(good[path]))
            runs = work / "reward-runs" / str(i)
            ok, detail = refused(*cli(train_main, faults.tiny_args(runs, "r", 2, *ARGS, "--reward", "aesthetic")))
            out.append(case("damaged", f"reward weights, {name}", ok and not runs.exists(), detail))
            path.write_bytes(good[path])
    finally:
        del os.environ["RLR_REWARD_MODELS"]
    prompts = work / "prompts"
    prompts.mkdir()
    for name, data in [("not UTF-8", "a caf\xe9\n".encode("latin-1")), ("empty", b"\n# comment\n")]:
        (prompts / "p.txt").write_bytes(data)
        runs = work / "prompt-runs"
        ok, detail = refused(*cli(train_main, faults.tiny_args(runs, "r", 2, *ARGS, "--prompt-file",
                                                               str(prompts / "p.txt"))))
        out.append(case("damaged", f"prompt file: {name}", ok and not runs.exists(), detail))
    return out


# -- pickles ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def unsafe_torch():
    """As an extension that weakens torch would: weights_only off by default and torch.load forced to
    unpickle. Yields a list that counts every torch.load call."""
    calls, original = [], torch.load

    def load(*args, **kwargs):
        calls.append(args[:1])
        kwargs["weights_only"] = False
        return original(*args, **kwargs)
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    torch.load = torch.serialization.load = load
    try:
        yield calls
    finally:
        torch.load = torch.serialization.load = original
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]


@contextlib.contextmanager
def comfy_pack(base: Path):
    """comfy_nodes.nodes imported against the stand-in ComfyUI host (as tests/test_comfy_nodes.py does)."""
    hosts = ("comfy_api", "comfy", "folder_paths", "server", "comfy_nodes")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in hosts}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(STANDIN))
    try:
        import folder_paths

        folder_paths.base = str(base)
        yield importlib.import_module("comfy_nodes.nodes")
    finally:
        sys.path.remove(str(STANDIN))
        for k in [k for k in sys.modules if k.split(".")[0] in hosts]:
            del sys.modules[k]
        sys.modules.update(saved)


def _raises(fn) -> tuple[bool, str]:
    """(refused with one line, the message): a ValueError/OSError whose message is one line."""
    try:
        fn()
    except (ValueError, OSError) as e:
        return "\n" not in str(e), str(e).splitlines()[0] if str(e) else type(e).__name__
    except Exception as e:  # noqa: BLE001 -- counted as a failure
        return False, f"{type(e).__name__}: {e}"
    return False, "accepted"


def pickles(work: Path, ref: Path, quick: bool) -> list[dict]:
    """Every payload form at every entry point, behind a symlink where the entry point reads a folder."""
    from rlr_backend.rewards import make_reward
    from rlr_backend.rewards.alignment import load_classifier

    model = tiny_model(work)
    out = []
    forms = list(faults.pickle_payloads(work / "x").items())
    with unsafe_torch() as calls:
        for form, _ in forms[::2] if quick else forms:
            root = work / "pickle" / form
            root.mkdir(parents=True)
            canary = root / "canary"
            data = faults.pickle_payloads(canary)[form]
            linked = faults.model_with_symlinked_pickle(model, root / "m", data, "diffusion_pytorch_model.bin")
            renamed = faults.model_with_symlinked_pickle(model, root / "m2", data, "extra.safetensors")
            single = root / "single.safetensors"
            single.write_bytes(data)
            partial = root / "runs"
            shutil.copytree(ref, partial / "run")
            (latest(partial / "run") / "optim.safetensors").write_bytes(data)
            png = root / "x.png"

            def sample(*args):
                return refused(*cli(sample_main, ["a red circle", "--num", "1", "--steps", "2", *args,
                                                  "--out", str(png)]))

            entries = {
                "rlr-train --model (pickle .bin behind a symlinked unet/)":
                    lambda: refused(*cli(train_main, faults.tiny_args(root / "r", "r", 2, *ARGS, "--model", str(linked)))),
                "rlr-sample --model (pickle named .safetensors behind a symlinked unet/)":
                    lambda: sample("--model", str(renamed)),
                "rlr-sample --model (single file)": lambda: sample("--model", str(single)),
                "rlr-sample --lora": lambda: sample("--lora", str(single)),
                "rlr-train --resume (optim.safetensors replaced)":
                    lambda: refused(*cli(train_main, faults.tiny_args(partial, "run", 8, *ARGS, "--resume"))),
                "Gradio app: model folder linked into --models-dir": lambda: app_run(root, linked),
                "ComfyUI RLR Load Model: diffusers folder": lambda: comfy_load(root, linked, single, "folder"),
                "ComfyUI RLR Load Model: checkpoints/": lambda: comfy_load(root, linked, single, "checkpoint"),
                "prompt_alignment classifier file": lambda: _raises(lambda: load_classifier(single)),
            }
            for reward, name in (("aesthetic", "sac+logos+ava1-l14-linearMSE.safetensors"),
                                 ("hpsv2", "HPS_v2.1_compressed.safetensors"),
                                 ("image_reward", "ImageReward.safetensors"),
                                 ("pickscore", "model.safetensors"), ("clip_score", "model.safetensors")):
                entries[f"reward {reward}: folder linked into the models folder"] = \
                    lambda r=reward, n=name: _raises(lambda: make_reward(r, models_dir=reward_folder(root, r, n, data)))
            for entry, fn in entries.items():
                ok, detail = fn()
                out.append(case("pickle", f"{entry} [{form}]", ok and not canary.exists() and not png.exists(),
                                detail, canary=canary.exists()))
    out.append(case("pickle", "torch.load calls across all the cases above", not calls, f"{len(calls)} calls"))
    return out


def reward_folder(root: Path, reward: str, name: str, data: bytes) -> Path:
    real = root / f"real-{reward}"
    real.mkdir(exist_ok=True)
    (real / name).write_bytes(data)
    (real / "pytorch_model.bin").write_bytes(data)
    if name == "model.safetensors":
        (real / "config.json").write_text(json.dumps({"model_type": "clip"}))
    models = root / f"rewards-{reward}"
    models.mkdir(exist_ok=True)
    if not (models / reward).is_symlink():
        (models / reward).symlink_to(real, target_is_directory=True)
    return models


def app_run(root: Path, linked_model: Path) -> tuple[bool, str]:
    """The app's path: the model list, the form, the run manager training the chosen model."""
    from rlr_app.form import Settings, check_form, form_defaults, list_models
    from rlr_backend.train.runner import RunManager

    models = root / "app-models"
    models.mkdir(exist_ok=True)
    if not (models / "linked").is_symlink():
        (models / "linked").symlink_to(linked_model, target_is_directory=True)
    settings = Settings(root / "app-runs", models)
    if "linked" not in list_models(models):
        return True, "not listed"
    errors, kw = check_form({**form_defaults(), **faults.TINY, "model": "linked", "steps": 2}, settings)
    if errors:
        return True, f"refused by the form: {errors}"
    job = RunManager().start([("x", TrainConfig(**kw, output_dir=settings.output_dir, run_name="x"))])
    while not job.finished:
        job.wait(job.version, timeout=5)
    run = job.runs[0]
    return run.status == "failed" and "\n" not in (run.error or ""), run.error or run.status


def comfy_load(root: Path, linked_model: Path, single: Path, which: str) -> tuple[bool, str]:
    base = root / "comfy"
    (base / "models" / "diffusers").mkdir(parents=True, exist_ok=True)
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (base / "models" / "diffusers" / "planted").exists():
        shutil.copytree(linked_model, base / "models" / "diffusers" / "planted", symlinks=True)
        shutil.copy(single, base / "models" / "checkpoints" / "renamed.safetensors")
    with comfy_pack(base) as nodes, torch.inference_mode():
        name = "planted" if which == "folder" else "checkpoints/renamed.safetensors"
        return _raises(lambda: nodes.LoadModel.execute(model=name))


# -- traversal names and planted symlinks --------------------------------------------------------------
def traversal(work: Path, ref: Path) -> list[dict]:
    from comfy_nodes.logic import lora_target, resolve_checkpoint, resolve_model_folder
    from rlr_app.form import Settings, list_runs
    from rlr_app.render import stage_downloads

    out, outside = [], work / "outside"
    outside.mkdir()
    (outside / "file").write_text("keep")
    runs = work / "trav"
    runs.mkdir()
    for name in TRAVERSAL_NAMES:
        rc, err = cli(train_main, faults.tiny_args(runs, name, 2, *ARGS))
        ok, detail = refused(rc, err)
        out.append(case("traversal", f"rlr-train --run-name {name[:40]!r}", ok and not any(runs.iterdir())
                        and snapshot(outside) == {"file": snapshot(outside)["file"]}, detail))
    for i, (name, _) in enumerate(plant_symlinks(ref, outside)):
        folder = work / "plant" / str(i)
        shutil.copytree(ref, folder / "run")
        dict(plant_symlinks(folder / "run", outside))[name]()
        before, outside_before = snapshot(folder), snapshot(outside)
        ok, detail = refused(*cli(train_main, faults.tiny_args(folder, "run", 8, *ARGS, "--resume")))
        out.append(case("traversal", f"rlr-train --resume, {name}",
                        ok and snapshot(folder) == before and snapshot(outside) == outside_before, detail))
        settings = Settings(folder)
        ok, detail = _raises(lambda: stage_downloads(settings, folder / "run"))
        served = [p for p in (folder / ".gradio").rglob("*") if p.is_file()] if (folder / ".gradio").exists() else []
        listed = "run" in list_runs(folder, with_lora=True)
        out.append(case("traversal", f"Gradio run viewer, {name}", ok and not served, detail,
                        listed_with_lora=listed))
    (runs / "linked").symlink_to(outside, target_is_directory=True)
    ok, detail = refused(*cli(train_main, faults.tiny_args(runs, "linked", 2, *ARGS)))
    out.append(case("traversal", "rlr-train --run-name naming a symlink to another folder",
                    ok and snapshot(outside) == {"file": snapshot(outside)["file"]}, detail))
    app_out = work / "app-out"
    shutil.copytree(ref, app_out / "ok")
    (app_out / "linked").symlink_to(outside, target_is_directory=True)
    for name in [*TRAVERSAL_NAMES, "linked"]:
        listed = list_runs(app_out)
        out.append(case("traversal", f"Gradio run viewer, run name {name[:40]!r}", name not in listed,
                        "not a listed run: refused" if name not in listed else "listed"))
    loras = work / "comfy-loras"
    (loras / "rlr").mkdir(parents=True)
    for name in TRAVERSAL_NAMES:
        def contained():
            target = lora_target(loras, name)
            if target.resolve().parent != (loras / "rlr").resolve():
                raise AssertionError(f"{target} is outside")
        ok, detail = _raises(contained)
        out.append(case("traversal", f"ComfyUI RLR Save LoRA filename {name[:40]!r}", ok or detail == "accepted",
                        detail))
        ok, detail = _raises(lambda: resolve_model_folder([loras], name))
        out.append(case("traversal", f"ComfyUI RLR Load Model folder {name[:40]!r}", ok, detail))
        ok, detail = _raises(lambda: resolve_checkpoint([loras], name + ".safetensors"))
        out.append(case("traversal", f"ComfyUI RLR Load Model checkpoint {name[:40]!r}", ok, detail))
    return out
