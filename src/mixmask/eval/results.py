"""``mixmask results RUN...``: one table of every evaluation found in ``RUN/eval/*.json``,
the protocol named in a column, as markdown or CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from mixmask.errors import MixmaskError
from mixmask.runs.folder import protocol_results

COLUMNS = ("run", "method", "masking", "backbone", "dataset", "protocol", "top1", "ci95",
           "top5", "best_top1", "box_ap", "mask_ap", "miou", "init", "pretrain_step",
           "wall_time_s")

# Each protocol's headline number, first found: classification's top-1, segmentation's
# mIoU, instance segmentation's mask AP, detection's box AP.
HEADLINES = (("top1", "top-1"), ("miou", "mIoU"), ("mask_ap", "mask AP"), ("box_ap", "box AP"))


def headline(row: dict[str, Any]) -> tuple[str, str]:
    """(key, label) of the number that stands for ``row``'s protocol."""
    for key, label in HEADLINES:
        if row.get(key) is not None:
            return key, label
    return "top1", "top-1"


def result_rows(runs: list[Path], problems: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per protocol result in ``RUN/eval/*.json`` (several for a result that
    lists ``summary_rows``: few-shot's shot counts, robustness's clean and corrupted
    scores). A file that cannot be read is left out and named in ``problems`` (one
    sentence each), so one bad file never hides the other results."""
    return [row for run in runs for _, result in protocol_results(run, problems)
            for row in result_row_list(run, result)]


def result_row_list(run: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows of one protocol result: one, or one per entry of its
    ``summary_rows`` (each a protocol name, top1 and an optional ci95)."""
    summary_rows = result.get("summary_rows")
    if not isinstance(summary_rows, list) or not summary_rows:
        return [result_row(run, result)]
    return [result_row(run, {**result, "protocol": row.get("protocol", result["protocol"]),
                             "top1": row.get("top1"), "ci95": row.get("ci95")})
            for row in summary_rows if isinstance(row, dict)]


def result_row(run: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The table's row of one protocol result of ``run``."""
    return {"run": str(run), "method": result.get("method"),
            "masking": result.get("masking"), "backbone": result.get("backbone"),
            "dataset": result.get("dataset"), "protocol": result["protocol"],
            "top1": result.get("top1"), "ci95": result.get("ci95"), "top5": result.get("top5"),
            "best_top1": result.get("best_top1"), "box_ap": result.get("box_ap"),
            "mask_ap": result.get("mask_ap"), "miou": result.get("miou"),
            "init": "random" if result.get("from_scratch") else "pretrained",
            "pretrain_step": result.get("pretrain_step"),
            "wall_time_s": result.get("wall_time_s")}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt != "markdown":
        raise MixmaskError(f"--format must be markdown or csv, got {fmt!r}.")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[column]) for column in COLUMNS) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"
