"""The one image-grid layout (rlr_backend.images) and the grids built on it."""

import warnings

import numpy as np
import torch
from PIL import Image

from rlr_backend.images import grid_image, to_pil
from rlr_backend.train.report import save_grid, save_reward_curve


def colours(n, h=3, w=5):
    """n solid images (N, 3, h, w), image i of value (i + 1) / (n + 1) in every channel."""
    return torch.stack([torch.full((3, h, w), (i + 1) / (n + 1)) for i in range(n)])


def test_to_pil_scales_with_nearest_and_rounds_to_bytes():
    pics = to_pil(colours(2), scale=3)
    assert [p.size for p in pics] == [(15, 9), (15, 9)]
    arr = np.asarray(pics[1])
    assert (arr == round(2 / 3 * 255)).all()


def test_grid_places_pictures_in_rows_with_gaps_and_margin():
    pics = to_pil(colours(5), scale=1)  # 5 x 3 pictures, 2 rows of 3
    grid = np.asarray(grid_image(pics, 3, gap=2, row_gap=4, margin=1, background="black"))
    assert grid.shape == (2 * 1 + 2 * 3 + 4, 2 * 1 + 3 * 5 + 2 * 2, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 1 + r * (3 + 4), 1 + c * (5 + 2)
        assert (grid[y:y + 3, x:x + 5] == round((i + 1) / 6 * 255)).all(), i
    assert (grid[0] == 0).all() and (grid[:, 6:8] == 0).all()  # margin and the gap between columns 0 and 1
    assert (grid[1 + 3 + 4:, 1 + 2 * 7:] == 0).all()  # the empty sixth place


def test_save_grid_frames_each_image_in_white(tmp_path):
    save_grid(colours(3), tmp_path / "g.png", nrow=2, scale=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    # each 3x5 image in a 1-pixel white frame, upscaled 2x: cells of 10x14, 2 rows x 2 columns
    assert grid.shape == (2 * 10, 2 * 14, 3)
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
    assert (grid[2:8, 2:12] == round(1 / 4 * 255)).all() and (grid[12:18, 2:12] == round(3 / 4 * 255)).all()
    assert (grid[8:12, :] == 255).all()  # frames of rows 0 and 1 meet
    assert (grid[10:, 14:] == 255).all()  # the empty fourth cell


def test_reward_curve_of_a_run_without_updates_is_drawn_without_warnings(tmp_path):
    """A run stopped before its first update still gets its chart (matplotlib warned about an empty legend)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_reward_curve([], {}, tmp_path / "empty.png")
        save_reward_curve([{"step": 1, "reward_mean": 0.5}], {0: 0.4}, tmp_path / "curve.png")
    assert Image.open(tmp_path / "empty.png").size == Image.open(tmp_path / "curve.png").size == (600, 350)
