"""Tiling a frame into overlapping model-sized tiles and stitching their maps back. Pure functions.

A frame of H x W split into ``rows x cols`` tiles overlapping by ``overlap`` (a fraction of a tile)
maps onto a *canvas*: the frame at the resolution where every tile is exactly the model's input
size (h x w). Tile maps (at model resolution) are placed on the canvas and combined where they
overlap; the canvas is the frame's map, squashed like the frame into it, at model resolution per
tile. ``tiles (1, 1)`` is the untiled case: the canvas is the model input itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

StitchMode = Literal["max", "mean"]


@dataclass(frozen=True)
class TileGrid:
    rows: int = 1
    cols: int = 1
    overlap: float = 0.0  # fraction of a tile shared with its neighbour, [0, 1)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"tiles must be at least 1x1, got {self.rows}x{self.cols}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.overlap}")

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def span(self) -> tuple[float, float]:
        """How many tile heights/widths the frame spans: rows - (rows - 1) * overlap, same for cols."""
        return self.rows - (self.rows - 1) * self.overlap, self.cols - (self.cols - 1) * self.overlap


UNTILED = TileGrid()


@dataclass(frozen=True)
class TilePlan:
    """Where each tile of one frame lies: in frame pixels (crops) and on the canvas (placement)."""

    frame_size: tuple[int, int]  # (H, W)
    canvas_size: tuple[int, int]  # (Ch, Cw)
    crops: list[tuple[int, int, int, int]]  # (y0, y1, x0, x1) in frame pixels, row-major
    origins: list[tuple[int, int]]  # (cy, cx) of each tile's top-left corner on the canvas
    tile_size: tuple[int, int]  # (h, w) model input = a tile's size on the canvas


def plan_tiles(frame_size: tuple[int, int], model_size: tuple[int, int], grid: TileGrid = UNTILED) -> TilePlan:
    """Tile geometry of a frame for a model input of model_size (h, w).

    Canvas strides are whole pixels, so tiles sit exactly on the canvas; the last tile of a row or
    column ends exactly at the frame's edge.
    """
    height, width = frame_size
    th, tw = model_size
    sy, sx = round(th * (1 - grid.overlap)), round(tw * (1 - grid.overlap))
    ch, cw = th + (grid.rows - 1) * sy, tw + (grid.cols - 1) * sx
    fy, fx = height / ch, width / cw  # frame pixels per canvas pixel
    crops, origins = [], []
    for r in range(grid.rows):
        for c in range(grid.cols):
            cy, cx = r * sy, c * sx
            y0, x0 = round(cy * fy), round(cx * fx)
            y1, x1 = max(y0 + 1, round((cy + th) * fy)), max(x0 + 1, round((cx + tw) * fx))
            crops.append((y0, min(y1, height), x0, min(x1, width)))
            origins.append((cy, cx))
    return TilePlan((height, width), (ch, cw), crops, origins, (th, tw))


def stitch(tile_maps: torch.Tensor, plan: TilePlan, mode: StitchMode = "max") -> torch.Tensor:
    """(N, h, w) tile maps at the plan's tile size -> (Ch, Cw) canvas map.

    ``max`` (what the engine uses): a defect seen by any tile keeps its full strength where tiles
    overlap, instead of being halved by a neighbour that sees only its edge. ``mean`` averages.
    """
    n, th, tw = tile_maps.shape
    if n != len(plan.origins) or (th, tw) != plan.tile_size:
        raise ValueError(f"{n} tile maps of {th}x{tw} do not fit a plan of {len(plan.origins)} "
                         f"tiles of {plan.tile_size[0]}x{plan.tile_size[1]}")
    if n == 1:
        return tile_maps[0]
    ch, cw = plan.canvas_size
    if mode == "max":
        canvas = tile_maps.new_full((ch, cw), float("-inf"))
        for m, (cy, cx) in zip(tile_maps, plan.origins, strict=True):
            view = canvas[cy : cy + th, cx : cx + tw]
            torch.maximum(view, m, out=view)
        return canvas
    if mode == "mean":
        total = tile_maps.new_zeros((ch, cw))
        count = tile_maps.new_zeros((ch, cw))
        for m, (cy, cx) in zip(tile_maps, plan.origins, strict=True):
            total[cy : cy + th, cx : cx + tw] += m
            count[cy : cy + th, cx : cx + tw] += 1
        return total / count
    raise ValueError(f"unknown stitch mode {mode!r}; choose max or mean")


def smoothing_sigma(frame_size: tuple[int, int], canvas_size: tuple[int, int],
                    sigma_model_px: float) -> tuple[float, float]:
    """(sigma_y, sigma_x) on the canvas for an isotropic blur in the frame.

    The blur is ``sigma_model_px`` canvas pixels along the axis the canvas squashes most, i.e. the
    same blur in frame pixels along both axes, as a blur at frame resolution with sigma
    ``sigma_model_px * max(H / Ch, W / Cw)`` would be.
    """
    (height, width), (ch, cw) = frame_size, canvas_size
    sigma_frame = sigma_model_px * max(height / ch, width / cw)
    return sigma_frame * ch / height, sigma_frame * cw / width
