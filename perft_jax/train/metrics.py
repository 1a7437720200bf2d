"""Run logs: metrics to JSONL, TensorBoard and (optionally) Weights & Biases, and the router heatmap PNG.

`metrics.jsonl` is the record of a run: one JSON object per `write` call, flushed line by line so a crash
or preemption loses nothing and `tail -f` / pandas can read it while the run goes on. TensorBoard
(tensorboardX, no TensorFlow needed) and W&B (`train.wandb`, perft_jax/wandb_logger.py) are views of the same
scalars, tagged `<split>/<name>`: `train/lm`, `val/lm` (validation loss), `eval/accuracy/<benchmark>` and
`eval/macro_average` (benchmark accuracies, written by the evaluation at the adapters' step). Only one process writes
(`is_writer`, process 0 on multi-host); the others get a writer that does nothing, so call sites need
no `if process_index == 0`.

Arrays (router statistics [L, M], per-layer entropy [L]) do not fit a scalar line: they go to
`arrays.jsonl` (nested lists, same step/split keys) and to TensorBoard histograms. Flatten them first
with `router_stats.router_stats_scalars` to get per-layer scalar curves.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from perft_jax.io import atomic_file
from perft_jax.wandb_logger import WandbConfig, WandbRun

RESERVED_KEYS = ("step", "split", "time")
ANNOTATE_MAX_COLS = 16  # annotate heatmap cells with their value only while the text still fits
ANNOTATE_MAX_ROWS = 32


def _json_scalar(value: np.ndarray) -> int | float | None:
    """0-d array -> JSON number; NaN/inf become null (strict JSON has no NaN; jq and JS parsers reject it)."""
    if value.dtype == np.bool_ or np.issubdtype(value.dtype, np.integer):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _json_array(value: np.ndarray) -> list:
    """Array -> nested lists of JSON numbers, non-finite entries as null (as in `_json_scalar`)."""
    if value.dtype.kind != "f":
        return value.tolist()
    out = value.astype(np.float64).astype(object)
    out[~np.isfinite(value)] = None
    return out.tolist()


class MetricsWriter:
    """Appends metrics to `<run_dir>/metrics.jsonl` and TensorBoard scalars to `<run_dir>/tensorboard`.

    Args:
        run_dir: the run's output folder (created if missing).
        is_writer: False on every process but one; such a writer creates no file and ignores all calls.
        tensorboard: also write TensorBoard events (needs tensorboardX).
        wandb: also log the scalars to Weights & Biases when its `mode` is set (needs wandb).
        config: the resolved run config, recorded with the W&B run.
    """

    def __init__(self, run_dir: str | os.PathLike, is_writer: bool = True, tensorboard: bool = True,
                 wandb: WandbConfig | None = None, config: dict[str, Any] | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.is_writer = is_writer
        self._jsonl = self._arrays = self._tb = self._wandb = None
        if not is_writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file (readers dedupe by step if they need to).
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("MetricsWriter(tensorboard=True) needs tensorboardX: pip install tensorboardX, "
                                  "or pass tensorboard=False") from e
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb is not None and wandb.mode:
            self._wandb = WandbRun(wandb, self.run_dir, config)

    def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        """Logs one step: 0-d values as scalars (JSONL line + TensorBoard), larger arrays to their summaries.

        Args:
            step: the global optimizer step (the x axis everywhere).
            metrics: name -> Python number or array (jax arrays are fetched to the host here).
            split: `train`, `eval`, ...; a JSONL field and the TensorBoard tag prefix (`train/lm`).
        """
        if not self.is_writer:
            return
        clash = [k for k in metrics if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} clash with the reserved JSONL keys {RESERVED_KEYS}")
        step = int(step)
        host = {k: np.asarray(v) for k, v in jax.device_get(dict(metrics)).items()}
        scalars = {k: _json_scalar(v) for k, v in host.items() if v.ndim == 0}
        arrays = {k: v for k, v in host.items() if v.ndim > 0}
        self._jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if arrays:
            if self._arrays is None:
                self._arrays = open(self.run_dir / "arrays.jsonl", "a", encoding="utf-8")
            lists = {k: _json_array(v) for k, v in arrays.items()}
            self._arrays.write(json.dumps({"step": step, "split": split, **lists}) + "\n")
            self._arrays.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                if value is not None:
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            for key, value in arrays.items():
                finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value.astype(np.float64)
                if finite.size:
                    self._tb.add_histogram(f"{split}/{key}", finite.ravel(), step)
        if self._wandb is not None:
            self._wandb.log(step, scalars, split)

    def flush(self) -> None:
        """Pushes TensorBoard events to disk (JSONL lines are already flushed on write)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Closes every file; idempotent."""
        for f in (self._jsonl, self._arrays):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._arrays = self._tb = self._wandb = None
        self.is_writer = False

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _heatmap(fig, ax, load: np.ndarray, title: str, xlabel: str) -> None:
    """Layers x experts load matrix with a colour bar; cell values printed while the matrix is small."""
    rows, cols = load.shape
    uniform = float(load.sum(axis=1).mean()) / cols  # K / N for top-k; mean selected / M for DynMoLE
    image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(load.max()), 1e-6),
                      interpolation="nearest")
    ax.set_title(f"{title}\n(fraction of real tokens; uniform = {uniform:.3f})", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    if cols <= 32:
        ax.set_xticks(range(cols))
    if rows <= 32:
        ax.set_yticks(range(rows))
    fig.colorbar(image, ax=ax, pad=0.01, fraction=0.05, aspect=25)
    if cols <= ANNOTATE_MAX_COLS and rows <= ANNOTATE_MAX_ROWS:
        threshold = 0.6 * max(float(load.max()), 1e-6)
        for (i, j), value in np.ndenumerate(load):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > threshold else "white")


def _figsize(num_layers: int, widths: list[int]) -> tuple[float, float]:
    """A size that keeps cells legible from 2 to 64 layers and 4 to 128 experts."""
    width = min(max(4.0 + 0.45 * sum(widths), 10.0), 24.0)
    top = min(max(0.3 * num_layers + 1.5, 3.0), 14.0)
    return width, top + 3.2


def draw_router_heatmaps(stats_mean: dict[str, Any], path_png: str | os.PathLike, title: str | None = None,
                         figsize: tuple[float, float] | None = None, dpi: int = 100) -> pathlib.Path:
    """Draws the end-of-run router picture: adapter and base load heatmaps, per-layer entropy below.

    The PNG is written to a temporary file in the same folder and renamed, so a reader (or a crash
    mid-write) never sees a truncated image.

    Args:
        stats_mean: `RouterStatsAccumulator.mean()` (or one `router_statistics` result): needs
            `base/load` [L, E] and `base/entropy` [L]; `adapter/*` keys are drawn when present.
        path_png: output file.
        title: figure title (e.g. the run name).
        figsize: inches; by default sized from L and the expert counts. Pixels = figsize * dpi.
        dpi: resolution.

    Returns:
        The PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = {k: np.asarray(v, np.float64) for k, v in jax.device_get(dict(stats_mean)).items()}
    base_load = stats["base/load"]
    adapter_load = stats.get("adapter/load")
    num_layers = base_load.shape[0]
    maps = ([(adapter_load, "Adapter-expert load (PERFT-R router)", "adapter expert")]
            if adapter_load is not None else [])
    maps.append((base_load, "Base-expert load (frozen router)", "base expert"))
    widths = [m[0].shape[1] for m in maps]

    fig = Figure(figsize=figsize or _figsize(num_layers, widths), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    rows = fig.add_gridspec(2, 1, height_ratios=[max(num_layers, 4), 4])
    # A nested grid for the maps, so the full-width plot below does not pull the colour bars off their maps.
    # Widths follow the expert counts, but a small adapter map keeps at least a third of the widest.
    top = rows[0].subgridspec(1, len(maps), width_ratios=[max(w, max(widths) / 3, 4) for w in widths])
    for col, (load, name, xlabel) in enumerate(maps):
        _heatmap(fig, fig.add_subplot(top[0, col]), load, name, xlabel)
    _draw_per_layer(fig.add_subplot(rows[1]), stats, num_layers)
    if title:
        fig.suptitle(title)

    path = pathlib.Path(path_png)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _draw_per_layer(ax, stats: dict[str, np.ndarray], num_layers: int) -> None:
    """Per-layer normalised entropy (and DynMoLE's broadcast rate / selected count) as lines."""
    layers = np.arange(num_layers)
    series = [("adapter/entropy", "adapter router entropy", "o-"), ("base/entropy", "base router entropy", "s-"),
              ("adapter/broadcast_frac", "DynMoLE broadcast fraction", "^--")]
    for key, label, style in series:
        if key in stats:
            ax.plot(layers, stats[key], style, label=label, markersize=4)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised entropy / fraction")
    ax.set_xticks(layers if num_layers <= 32 else layers[:: max(num_layers // 16, 1)])
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "adapter/num_selected" in stats:
        twin = ax.twinx()
        line = twin.plot(layers, stats["adapter/num_selected"], "d:", color="tab:red", markersize=4,
                         label="DynMoLE mean adapters selected")
        twin.set_ylabel("adapters selected / token")
        # Full range 0..M, so the line reads against "all adapters" (broadcast) rather than filling the axis.
        twin.set_ylim(0, stats["adapter/load"].shape[1] if "adapter/load" in stats else None)
        handles, labels = handles + line, labels + [line[0].get_label()]
    # Below the axes: inside, it would hide the lines it describes (twin-axis lines are invisible to loc="best").
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=len(labels),
              frameon=False)
    ax.set_title("Per-layer routing entropy (adapter: Shannon for top-K, Tsallis q for DynMoLE)", fontsize=10)
