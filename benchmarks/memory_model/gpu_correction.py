"""The CPU-fitted model corrected with a GPU check's measurements (``benchmarks.gpu_check``).

The first GPU check found the model's *composition* right (fed with the GPU's own measurements of one UNet
step and of decode + reward it came within 2.6% of every measured update) but its *components* low: CUDA
keeps more bytes for backward than the CPU kernels the fits were measured with. So the correction scales
the part of a prediction that is activations (the peak minus the persistent weights and optimizer state,
which are parameter counts and do not depend on the device) by what the GPU measured:

    ratio(arch, checkpointing) = max over the check's updates of (measured - persistent) / (predicted - persistent)
    corrected = persistent + ratio x (predicted - persistent)

The largest ratio over the measured estimators is taken, so the corrected figure is an upper estimate for
the estimators measured at that (model, option), and the ratio measured at one batch (SD1.5: 4, SDXL: 1)
is assumed for the others.
"""

from __future__ import annotations

from .model import Options, Scenario, gpu_config, predict

#: the resolution each architecture's GPU check runs at (``benchmarks.gpu_check.updates``' plans)
RESOLUTION = {"sd15": 512, "sdxl": 1024}


def _key(arch: str, checkpointing: bool) -> str:
    return f"{arch}/{'ckpt' if checkpointing else 'plain'}"


def activation_ratios(fits, counts: dict, gpu: dict | None) -> dict[str, dict]:
    """Per ``"arch/plain"`` and ``"arch/ckpt"``: the largest measured / predicted ratio of activation bytes
    over the full-size update rows of a GPU check record (``gpu-check.json``); {} without one."""
    if not gpu or gpu.get("tiny"):
        return {}
    c = {**counts, "reward": counts.get("reward_vision_only", counts["reward"])}  # the check builds the image tower
    out: dict[str, dict] = {}
    for r in gpu.get("checks", []):
        if r.get("group") != "update" or not r.get("measured_bytes") or r.get("arch") not in RESOLUTION:
            continue
        s = Scenario(r["arch"], RESOLUTION[r["arch"]], r["batch"], T=r["T"], h=r["h"], fo_steps=r["window"],
                     eval_images=0)  # the check measures one update, not the evaluation between updates
        opts = Options.from_config(gpu_config(gradient_checkpointing=r["checkpointing"], offload_text_encoders=True))
        p = predict(fits, s, opts, c, r["estimator"])
        pers = sum(p["persistent"].values())
        ratio = (r["measured_bytes"] - pers) / (p["bytes"] - pers)
        key = _key(r["arch"], r["checkpointing"])
        if key not in out or ratio > out[key]["ratio"]:
            out[key] = {"ratio": ratio, "row": r["name"], "measured": r["measured_bytes"], "predicted": p["bytes"]}
    return out


def corrected_bytes(pred: dict, ratios: dict[str, dict]) -> float | None:
    """``pred`` (a :func:`predict` result) with its activations scaled by the GPU ratio of its model and
    option; None where the GPU check measured no update of that kind."""
    key = _key(pred["scenario"]["arch"], pred["options"]["checkpointing"])
    if key not in ratios:
        return None
    pers = sum(pred["persistent"].values())
    return pers + ratios[key]["ratio"] * (pred["bytes"] - pers)
