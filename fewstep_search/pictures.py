"""Sample grids: labelled rows of small images (real digits, teacher, few-step samples) in one readable PNG.

Why our own few lines instead of torchvision's `make_grid`: no torchvision dependency, and rows carry a text
label so a reader sees at once which sampler produced which row.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewstep_search.atomic import atomic_write_bytes

__all__ = ["save_sample_grid", "grid_size"]

_BACKGROUND = 255
_TEXT = 0
_LINE_HEIGHT = 11
"""Height in pixels of one line of Pillow's default bitmap font (plus spacing)."""


def grid_size(
    *, n_rows: int, n_cols: int, image_hw: tuple[int, int], scale: int, pad: int, label_width: int, header: int = 0
) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_sample_grid` writes for these settings (`header`: the height of
    the column captions' band)."""
    h, w = image_hw
    width = label_width + n_cols * (w * scale + pad) + pad
    height = header + n_rows * (h * scale + pad) + pad
    return width, height


def _wrap(text: str, width: int, measure: Callable[[str], float]) -> list[str]:
    """`text` in lines of at most `width` pixels (a word longer than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _to_uint8(images: Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """[N, C, H, W] (C = 1 or 3) in `value_range` -> uint8 [N, H, W] or [N, H, W, 3], clamped."""
    lo, hi = value_range
    x = images.detach().to("cpu", torch.float64)
    x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    return x.numpy()


def save_sample_grid(
    path: str | Path,
    rows: Mapping[str, Tensor],
    *,
    max_cols: int = 16,
    scale: int = 6,
    pad: int = 4,
    label_width: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    column_labels: Sequence[str] | None = None,
) -> Path:
    """Write a PNG with one labelled row per entry of `rows`; return its path.

    `rows` maps a label (e.g. "real", "reference", "DDIM 4 steps") to images [N, C, H, W] (C = 1 or 3, values
    in `value_range`, default the model space [-1, 1]); each row shows its first `max_cols` images,
    upscaled `scale` times with nearest-neighbour so pixels stay sharp. `label_width` defaults to fit the
    longest label. `column_labels` (e.g. the prompt of each column) are wrapped into a band above the columns.
    The file is written atomically (temp file + os.replace). Size: see `grid_size`.

    Example:
        >>> import torch, tempfile, os
        >>> p = save_sample_grid(os.path.join(tempfile.mkdtemp(), "g.png"), {"noise": torch.rand(4, 1, 8, 8)})
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("rows is empty: pass at least one {label: images} entry")
    if max_cols < 1 or scale < 1 or pad < 0:
        raise ValueError(f"need max_cols >= 1, scale >= 1, pad >= 0; got {max_cols}, {scale}, {pad}")
    shapes = set()
    for label, imgs in rows.items():
        if not isinstance(imgs, Tensor) or imgs.ndim != 4 or imgs.shape[1] not in (1, 3) or imgs.shape[0] < 1:
            got = tuple(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
            raise ValueError(f"row {label!r}: expected images [N>=1, 1 or 3, H, W], got {got}")
        shapes.add(tuple(imgs.shape[1:]))
    if len(shapes) != 1:
        raise ValueError(f"all rows must share one image shape, got {sorted(shapes)}")
    channels, h, w = shapes.pop()
    font = ImageFont.load_default()
    if label_width is None:
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        label_width = max(int(probe.textlength(label, font=font)) for label in rows) + 2 * pad
    n_cols = min(max_cols, max(int(t.shape[0]) for t in rows.values()))
    measure = ImageDraw.Draw(Image.new("L", (1, 1))).textlength
    captions = [_wrap(str(c), w * scale, lambda s: measure(s, font=font)) for c in (column_labels or [])[:n_cols]]
    header = (max(len(c) for c in captions) * _LINE_HEIGHT + pad) if captions else 0
    width, height = grid_size(
        n_rows=len(rows), n_cols=n_cols, image_hw=(h, w), scale=scale, pad=pad, label_width=label_width,
        header=header,
    )
    mode = "L" if channels == 1 else "RGB"
    canvas = Image.new(mode, (width, height), _BACKGROUND if mode == "L" else (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    fill = _TEXT if mode == "L" else (_TEXT,) * 3
    for c, lines in enumerate(captions):
        for i, line in enumerate(lines):
            draw.text((label_width + pad + c * cell_w, pad + i * _LINE_HEIGHT), line, fill=fill, font=font)
    for r, (label, imgs) in enumerate(rows.items()):
        top = header + pad + r * cell_h
        draw.text((pad, top + max(0, (h * scale - _LINE_HEIGHT) // 2)), label, fill=fill, font=font)
        for c, arr in enumerate(_to_uint8(imgs[:n_cols], value_range)):
            tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_width + pad + c * cell_w, top))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())
