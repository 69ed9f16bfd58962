"""How the bench prints: one table helper for every table, and the targets' PASS/MISS check.

    print0(format_table([Column("batch"), Column("img/s", ".0f")], [(64, 1689.3), (256, 2881.0)]))

prints

    batch  img/s
    -----  -----
       64   1689
      256   2881

Widths come from the widest header or cell of each column; numbers align right, text left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# (name, section, measured key, batch, threshold): the targets for a 2-core CPU in float32
# (issue 11; trainer/limit from the earlier throughput work). "scaling" rows are the weak-scaling
# section's, where "efficiency_over_peer" is the trainer's 1 -> 2 efficiency over the plain DDP
# peer's, measured in the same launches.
TARGETS = (
    ("trainer/plain at batch 64", "throughput", "trainer_over_plain", 64, 1.3),
    ("trainer/plain at batch 256", "throughput", "trainer_over_plain", 256, 1.3),
    ("trainer/limit at batch 256", "throughput", "trainer_over_limit", 256, 0.8),
    ("weak-scaling efficiency 1->2 processes at batch 64", "scaling", "efficiency", 64, 0.65),
    ("weak-scaling efficiency 1->2 processes at batch 256", "scaling", "efficiency", 256, 0.88),
    (
        "trainer efficiency / plain DDP peer efficiency at batch 64",
        "scaling",
        "efficiency_over_peer",
        64,
        1.0,
    ),
    (
        "trainer efficiency / plain DDP peer efficiency at batch 256",
        "scaling",
        "efficiency_over_peer",
        256,
        1.0,
    ),
)
GAP = "  "


def print0(*args: Any, **kwargs: Any) -> None:
    """The bench's only output path (one process prints; the scaling workers write JSON)."""
    print(*args, **kwargs, flush=True)


@dataclass(frozen=True)
class Column:
    header: str
    fmt: str = ""
    """Format spec of the cells (``format(value, fmt)``), e.g. ``.0f``, ``.1%``, ``,``."""
    align: str = ""
    """``<`` left or ``>`` right; empty: right for numbers, left for anything else."""


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if fmt else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> str:
    """``rows`` as aligned text under ``columns``' headers and a rule; no trailing spaces."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns: {row!r}")
    cells = [[_cell(v, c.fmt) for v, c in zip(row, columns)] for row in rows]
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    aligns = [
        c.align or (">" if rows and all(_is_number(r[i]) for r in rows) else "<")
        for i, c in enumerate(columns)
    ]

    def line(texts: Sequence[str]) -> str:
        return GAP.join(f"{t:{a}{w}}" for t, a, w in zip(texts, aligns, widths)).rstrip()

    header = line([c.header for c in columns])
    return "\n".join([header, line(["-" * w for w in widths]), *(line(r) for r in cells)])


def check_targets(report: dict) -> list[dict]:
    """Each target the report has a figure for, with PASS or MISS; prints them as a table."""
    rows = {("throughput", r["batch"]): r for r in report.get("throughput", [])}
    rows.update(
        {("scaling", r["batch"]): r for r in report.get("weak_scaling", {}).get("rows", [])}
    )
    meta = report["meta"]
    print0("\n== targets (defined for a 2-core CPU, float32) ==")
    if meta["precision"] != "no" or meta["device"] != "cpu" or meta["nproc"] != 2:
        print0(
            f"(this run: {meta['device']}, {meta['nproc']} cores, precision {meta['precision']}: "
            "the thresholds were set for another setting; read PASS/MISS as indicative only)"
        )
    out = []
    for name, section, key, batch, threshold in TARGETS:
        row = rows.get((section, batch))
        if row is None or key not in row:
            continue
        value = row[key]
        status = "PASS" if value >= threshold else "MISS"
        out.append({"target": name, "threshold": threshold, "measured": value, "status": status})
    columns = [Column("status"), Column("target"), Column("measured", ".3f"), Column(">=", ".2f")]
    table = [(t["status"], t["target"], t["measured"], t["threshold"]) for t in out]
    print0(format_table(columns, table) if out else "(no figure of this run has a target)")
    return out
