"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- `heatmap_<task>.png`: for every task with needles at two or more depths, one panel per mode,
  needle depth (rows) by context length (columns), each cell the mean score, annotated.
- `speed.png`: speedup over autoregressive decoding and mean accepted tokens against context length,
  one line per mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eval.modes import BASELINE, sort_modes  # noqa: E402
from eval.result import Result  # noqa: E402

if TYPE_CHECKING:
    from eval.report import SpeedRow


def length_label(tokens: int) -> str:
    """1024 -> "1K", 1536 -> "1.5K", 1200 -> "1200", 300 -> "300"."""
    return f"{tokens / 1024:g}K" if tokens >= 1024 and tokens % 512 == 0 else str(tokens)


def plot_heatmaps(results: Sequence[Result], out_dir: Path) -> list[Path]:
    files = []
    for task in dict.fromkeys(r.task for r in results):
        mine = [r for r in results if r.task == task and r.depth is not None and r.score is not None]
        depths = sorted({r.depth for r in mine})
        lengths = sorted({r.length for r in mine})
        if len(depths) < 2:
            continue
        modes = sort_modes(r.mode for r in mine)
        width = 1.5 + len(modes) * (0.8 + 0.75 * len(lengths))
        figure, axes = plt.subplots(1, len(modes), figsize=(width, 1.6 + 0.45 * len(depths)), sharey=True,
                                    squeeze=False, layout="constrained")
        for ax, mode in zip(axes[0], modes, strict=True):
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for i, depth in enumerate(depths):
                for j, length in enumerate(lengths):
                    scores = [r.score for r in mine if r.mode == mode and r.depth == depth and r.length == length]
                    if scores:
                        grid[i][j] = sum(scores) / len(scores)
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not math.isnan(grid[i][j]):
                        ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_title(mode, fontsize=10)
            ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
            ax.tick_params(labelleft=ax is axes[0][0])
            ax.set_xlabel("context tokens", fontsize=8)
        axes[0][0].set_ylabel("needle depth", fontsize=8)
        figure.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="score")
        figure.suptitle(f"{task}: score by needle depth and context length", fontsize=11)
        path = out_dir / f"heatmap_{task}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        files.append(path)
    return files


def plot_speed(rows: Sequence[SpeedRow], out_dir: Path) -> list[Path]:
    if not rows:
        return []
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    lengths = sorted({r.length for r in rows})
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = sorted((r for r in rows if r.mode == mode), key=lambda r: r.length)
        style = dict(marker="o", linestyle="--" if mode == BASELINE else "-", label=mode)
        if all(r.speedup is not None for r in mine):
            left.plot([r.length for r in mine], [r.speedup for r in mine], **style)
        right.plot([r.length for r in mine], [r.summary.acceptance_length for r in mine], **style)
    for ax, label in ((left, "decode speedup over autoregressive (x)"), (right, "mean accepted tokens per forward")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.axhline(1.0, color="grey", linewidth=0.8)
    right.legend(fontsize=8)
    figure.suptitle("Speed against context length")
    figure.tight_layout()
    path = out_dir / "speed.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
