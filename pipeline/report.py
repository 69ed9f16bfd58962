"""Files a person reads after (or during) a run: training curves and the summary JSON.

Everything here reads ``metrics.jsonl`` (one ``{"step": ..., **metrics}`` row per log call,
written by :class:`pipeline.tracking.Tracking`) and writes atomically, so a reader never sees a
half-written PNG or JSON even if the run is killed mid-write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write, atomic_write_text

# (title, y label, metric names) per panel; a panel with no data is left out.
CURVE_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("losses", "loss", ("train/d_loss", "train/g_loss")),
    ("discriminator outputs", "mean D(x)", ("train/d_real", "train/d_fake")),
    ("classifier FID", "FID", ("eval/fid",)),
)


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """Rows of ``metrics.jsonl`` in file order; [] if the file does not exist.

    A torn final line (the run was killed mid-write) is ignored; a malformed line anywhere
    else is corruption and raises ValueError naming the line.
    """
    path = Path(metrics_jsonl)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path}:{lineno} is not a JSON row: {line[:80]!r}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{lineno} is not a metrics row with a 'step': {line[:80]!r}")
        rows.append(row)
    return rows


def _series(rows: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[name]) for row in rows if row.get(name) is not None]
    return [s for s, _ in points], [float(v) for _, v in points]


def write_curves(metrics_jsonl: Path, out_png: Path) -> None:
    """Plot losses, D outputs and FID against the global step into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    panels = []
    for title, ylabel, names in CURVE_PANELS:
        series = {name: _series(rows, name) for name in names}
        series = {name: xy for name, xy in series.items() if xy[0]}
        if series:
            panels.append((title, ylabel, series))

    fig, axes = plt.subplots(
        max(len(panels), 1), 1, figsize=(8, 2.8 * max(len(panels), 1)), sharex=True, squeeze=False
    )
    try:
        if not panels:
            axes[0, 0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
        for ax, (title, ylabel, series) in zip(axes[:, 0], panels):
            for name, (steps, values) in series.items():
                sparse = len(steps) < 20  # evaluations are rare: show each point
                ax.plot(steps, values, label=name, marker="o" if sparse else None, linewidth=1.2)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        axes[-1, 0].set_xlabel("global step")
        fig.tight_layout()
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def _to_json(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)  # Path and the like


def write_summary(path: Path, summary: dict) -> None:
    """Write ``summary`` as indented JSON, atomically."""
    text = json.dumps(summary, indent=2, default=_to_json) + "\n"
    atomic_write_text(path, text)
