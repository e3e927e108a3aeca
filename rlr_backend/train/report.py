"""Pictures of a run: image grids and the reward curve."""

from __future__ import annotations

from pathlib import Path

import torch

from ..images import grid_image, to_pil
from ..safe_io import atomic_path


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 2) -> None:
    """Images (N, 3, H, W) in [0, 1] -> a PNG grid with ``nrow`` images per row, upscaled for viewing, each
    framed by ``scale`` white pixels."""
    img = grid_image(to_pil(images, scale), nrow, gap=2 * scale, margin=scale)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_reward_curve(history: list[dict], eval_rewards: dict[int, float], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in history if "reward_mean" in r]
    vals = [r["reward_mean"] for r in history if "reward_mean" in r]
    if steps:
        ax.plot(steps, vals, color="0.7", lw=1, label="batch reward")
        k = max(len(vals) // 10, 1)
        smooth = [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"batch reward (mean of {k})")
    if eval_rewards:
        es = sorted(eval_rewards)
        ax.plot(es, [eval_rewards[s] for s in es], "o-", color="tab:red", label="eval reward (fixed seeds)")
    ax.set_xlabel("update")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if steps or eval_rewards:
        ax.legend(fontsize=8)
    else:  # e.g. a run stopped before its first update: an empty chart that says why
        ax.text(0.5, 0.5, "no updates yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save_before_after(before: Path, after: Path, path: Path, before_label: str, after_label: str) -> None:
    """Two evaluation grids side by side, each under a one-line label (e.g. its eval reward)."""
    from PIL import Image, ImageDraw, ImageFont

    a, b = Image.open(before).convert("RGB"), Image.open(after).convert("RGB")
    font = ImageFont.load_default()
    top, gap = 16, 8
    out = Image.new("RGB", (a.width + gap + b.width, top + max(a.height, b.height)), "white")
    out.paste(a, (0, top))
    out.paste(b, (a.width + gap, top))
    draw = ImageDraw.Draw(out)
    draw.text((2, 2), before_label, fill="black", font=font)
    draw.text((a.width + gap + 2, 2), after_label, fill="black", font=font)
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")


def diversity(images, per_prompt: int) -> float:
    """Mean pairwise RMS pixel distance between images of the same prompt (images grouped by prompt, in
    [0, 1]); falls when the model collapses to one image per prompt."""
    import torch

    groups = images.reshape(-1, per_prompt, *images.shape[1:]).flatten(2).float()
    d = torch.cdist(groups, groups) / groups.shape[-1] ** 0.5
    return float(d.sum() / (groups.shape[0] * per_prompt * (per_prompt - 1)))


def progress_bar(total: int, start: int, enabled: bool):
    """rlr-train's tqdm bar over the updates (None when disabled)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="rlr-train", unit="update")
