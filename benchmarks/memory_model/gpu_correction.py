"""The CPU-fitted model corrected with a GPU check's measurements of its two parts (``benchmarks.gpu_check``).

The first GPU check found the model's *composition* right (fed with the GPU's own measurements of one
denoiser call and of decode + reward it came within 2.6% of every measured update) but its *parts* low:
CUDA keeps more bytes for backward than the CPU kernels the fits were measured with. So the correction
re-scales the parts, not the totals: for each model and option (no options / checkpointed) the check's
build measures one CFG denoiser call and one decode + reward of its batch on the GPU, and

    scale = GPU bytes / CPU-fitted bytes of the same call   (peak, retained; no-grad peak from the plain parts)

multiplies the CPU fit of that part in every prediction of that model and option (``PartScale``). Weights,
optimizer state and the stored chain are parameter and tensor counts and are not scaled. The scale measured
at the check's batch (SD1.5: 4, SDXL: 1) is assumed at the others.
"""

from __future__ import annotations

from .model import Options, PartScale, Scenario, decode_and_reward, gpu_config, predict, unet_call

#: the resolution each architecture's GPU check runs at (``benchmarks.gpu_check.updates``' plans) and the
#: architecture of each of its model labels
RESOLUTION = {"sd15": 512, "sdxl": 1024}
ARCH_OF_LABEL = {"SD1.5": "sd15", "SDXL": "sdxl"}


def _key(arch: str, checkpointing: bool) -> str:
    return f"{arch}/{'ckpt' if checkpointing else 'plain'}"


def _ratio(gpu: float, cpu: float) -> float:
    return gpu / cpu if cpu > 0 else 1.0


def part_scales(fits, gpu: dict | None) -> dict[str, PartScale]:
    """Per ``"arch/plain"`` and ``"arch/ckpt"``: the GPU / CPU-fit ratios of the two parts, from the build rows of
    a GPU check record (``gpu-check.json``; the newest row of each model); {} without one."""
    if not gpu or gpu.get("tiny"):
        return {}
    out: dict[str, PartScale] = {}
    for r in gpu.get("checks", []):
        arch = ARCH_OF_LABEL.get(str(r.get("model", "")).split(" ")[0])
        if not r.get("name", "").endswith(": build") or "parts" not in r or arch is None:
            continue
        b, px = r["batch"], (RESOLUTION[arch] // 8) ** 2
        plain_step, plain_dec = unet_call(fits, arch, 2 * b, px, False), decode_and_reward(fits, b, px, False)
        nograd = (_ratio(r["parts"]["plain"]["step_nograd"], plain_step.nograd),
                  _ratio(r["parts"]["plain"]["reward_nograd"], plain_dec.nograd))
        for var, ckpt in (("plain", False), ("ckpt", True)):
            g = r["parts"][var]
            step, dec = unet_call(fits, arch, 2 * b, px, ckpt), decode_and_reward(fits, b, px, ckpt)
            out[_key(arch, ckpt)] = PartScale(
                step=(_ratio(g["step_peak"], step.peak), _ratio(g["step_retained"], step.retained), nograd[0]),
                decode=(_ratio(g["reward_peak"], dec.peak), _ratio(g["reward_retained"], dec.retained), nograd[1]))
    return out


def corrected_bytes(fits, pred: dict, counts: dict, scales: dict[str, PartScale]) -> float | None:
    """``pred`` (a :func:`predict` result) recomputed with its parts scaled as the GPU measured them; None
    where the GPU check measured no part of that model and option."""
    key = _key(pred["scenario"]["arch"], pred["options"]["checkpointing"])
    if key not in scales:
        return None
    s, opts = Scenario(**pred["scenario"]), Options(**pred["options"])
    return predict(fits, s, opts, counts, pred["estimator"], scales[key])["bytes"]


def best_bytes(pred: dict) -> float:
    """A prediction's best estimate of a GPU's peak: GPU-corrected where a GPU check measured its kind."""
    return pred["gpu_bytes"] if pred.get("gpu_bytes") is not None else pred["bytes"]


def check_rows(fits, counts: dict, gpu: dict | None, scales: dict[str, PartScale]) -> list[dict]:
    """The GPU check's measured updates against the corrected model (one update: no evaluation; the check's
    reward is the image tower), so the page shows how far the correction is from what was measured."""
    rows = []
    c = {**counts, "reward": counts.get("reward_vision_only", counts["reward"])}
    for r in (gpu or {}).get("checks", []):
        if r.get("group") != "update" or not r.get("measured_bytes") or r.get("arch") not in RESOLUTION \
                or r.get("superseded"):
            continue
        key = _key(r["arch"], r["checkpointing"])
        s = Scenario(r["arch"], RESOLUTION[r["arch"]], r["batch"], T=r["T"], h=r["h"], fo_steps=r["window"],
                     eval_images=0)
        opts = Options.from_config(gpu_config(gradient_checkpointing=r["checkpointing"], offload_text_encoders=True))
        cpu = predict(fits, s, opts, c, r["estimator"])
        fixed = predict(fits, s, opts, c, r["estimator"], scales.get(key)) if key in scales else None
        rows.append({"name": r["name"], "measured": r["measured_bytes"], "cpu": cpu["bytes"],
                     "corrected": None if fixed is None else fixed["bytes"],
                     "phase": None if fixed is None else fixed["binding_phase"]})
    return rows

