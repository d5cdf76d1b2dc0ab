"""``mixmask report RUN... --out report.html``: one self-contained HTML page for one run,
or comparing several.

Per run the page shows the resolved config (the keys that differ from the recipe the run
was launched with highlighted), ``summary.json``, every evaluation of ``RUN/eval/*.json``
with its protocol, the plots of ``RUN/plots/*.png`` and the mask gallery of the config
(drawn now, as ``mixmask show-masks`` does). With several runs a comparison table comes
first. Images are embedded as ``data:`` URIs and the style sheet is inline, so the file can
be mailed or archived alone::

    write_report([Path("runs/a"), Path("runs/b")], Path("report.html"))

Every number taken from ``summary.json`` or an evaluation sits in an element carrying
``data-run``, ``data-key`` and ``data-value`` (the JSON of the exact value), so a test or a
script can read the page back without parsing the formatted text.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mixmask.config import load_config
from mixmask.errors import MixmaskError, writing
from mixmask.eval.results import headline
from mixmask.pictures.isolated import run_isolated
from mixmask.pictures.masks import GALLERY_ROWS, gallery_from_config
from mixmask.pictures.mim_gallery import is_mim_method, mim_gallery_from_config
from mixmask.pictures.report_runs import (
    RunRecord,
    disambiguate_labels,
    flatten,
    load_run,
)

__all__ = ["write_report"]

# Lists in summary.json longer than this (e.g. bad_image_files) are counted, not listed.
_MAX_LIST_ITEMS = 8
_GALLERY_IMAGES = 8
_SUMMARY_TOP1_KEYS = ("knn_top1", "linear_top1", "probe_top1")


def write_report(runs: list[Path], out: Path) -> Path:
    """Write the HTML report of ``runs`` (folders written by ``mixmask pretrain``) to
    ``out`` and return its path. A folder without ``config.yaml`` is a
    :class:`~mixmask.errors.MixmaskError`; a missing summary, recipe, evaluation or
    dataset is said on the page instead."""
    if not runs:
        raise MixmaskError("give at least one run folder to report on.")
    loaded = [load_run(Path(run)) for run in runs]
    disambiguate_labels(loaded)
    sections = [_run_section(run) for run in loaded]
    body = ([_comparison_section(loaded)] if len(loaded) > 1 else []) + sections
    title = ("mixmask report: " + loaded[0].label if len(loaded) == 1
             else f"mixmask report: {len(loaded)} runs")
    page = _PAGE.format(title=_text(title), css=_CSS, body="\n".join(body))
    with writing(out) as out:
        out.write_text(page, encoding="utf-8")
    return out


# --------------------------------------------------------------------------- reading


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _number(value: Any) -> str:
    """A readable rendering of a summary or config value."""
    if isinstance(value, bool) or value is None:
        return _json(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        if magnitude == 0 or 1e-3 <= magnitude < 1:
            return f"{value:.4f}".rstrip("0").rstrip(".") or "0"
        if magnitude < 100:
            return f"{value:.2f}"
        if magnitude < 1e6:
            return f"{value:.1f}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _value_cell(run: RunRecord, key: str, value: Any, source: str, tag: str = "td",
                extra: str = "") -> str:
    """One value in an element that carries its exact value for a reader of the page."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    kind = ' class="num"' if numeric else ""
    return (f'<{tag}{kind} data-source="{source}" data-run="{_text(run.label)}" '
            f'data-key="{_text(key)}" data-value="{_text(_json(value))}"{extra}>'
            f"{_text(_number(value))}</{tag}>")


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def _image(data: bytes, alt: str, min_width: int = 0) -> str:
    """A PNG as a data: URI; with ``min_width`` a small image is scaled up by a whole
    factor (pixelated, so the gallery's cells stay crisp)."""
    encoded = base64.b64encode(data).decode("ascii")
    size = ""
    # A PNG's width is the big-endian uint32 at byte 16 (the IHDR chunk).
    width = int.from_bytes(data[16:20], "big") if data[:8] == b"\x89PNG\r\n\x1a\n" else 0
    if min_width and 0 < width < min_width:
        size = f' width="{width * (min_width // width)}"'
    return f'<img src="data:image/png;base64,{encoded}" alt="{_text(alt)}"{size}>'


# --------------------------------------------------------------------------- sections


def _comparison_section(runs: list[RunRecord]) -> str:
    protocols: list[tuple[str, str]] = []
    for run in runs:
        for row in run.evaluations:
            column = (row["protocol"], row["init"])
            if column not in protocols:
                protocols.append(column)
    summary_keys = [key for key in _SUMMARY_TOP1_KEYS
                    if any(run.summary and key in run.summary for run in runs)]
    heads = ["run", "method", "masking", "backbone", "dataset", "epochs"]
    labels = {(row["protocol"], row["init"]): headline(row)
              for run in runs for row in run.evaluations}
    heads += [f"{labels[column][1]} ({column[0]}"
              f"{'' if column[1] == 'pretrained' else ', ' + column[1]} eval)"
              for column in protocols]
    heads += [f"{key} (end of pretraining)" for key in summary_keys]
    rows = []
    for run in runs:
        summary = run.summary or {}
        cells = [f'<th scope="row"><a href="#{_anchor(run)}">{_text(run.label)}</a></th>']
        for key, fallback in (("method", "method.name"), ("masking", "method.masking"),
                              ("backbone", "model.backbone"), ("dataset", "data.dataset"),
                              ("epochs", "train.epochs")):
            if key in summary:
                cells.append(_value_cell(run, key, summary[key], "summary"))
            else:
                cells.append(f"<td>{_text(flatten(run.config).get(fallback, '-'))}</td>")
        for protocol, init in protocols:
            found = [row for row in run.evaluations
                     if (row["protocol"], row["init"]) == (protocol, init)]
            cells.append(_eval_cell(run, found[-1], labels[(protocol, init)][0]) if found
                         else "<td>-</td>")
        for key in summary_keys:
            cells.append(_value_cell(run, key, summary[key], "summary") if key in summary
                         else "<td>-</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_text(name)}</th>" for name in heads)
    return (f'<section class="comparison"><h2>Comparison of {len(runs)} runs</h2>'
            f"<p>Percent on the test set: top-1 for classification, box / mask AP (COCO "
            f"protocol) for detection, mIoU for segmentation. A column per protocol of "
            f"<code>RUN/eval/*.json</code>, then the evaluations at the end of pretraining "
            f"(summary.json).</p><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></section>")


def _anchor(run: RunRecord) -> str:
    return "run-" + "".join(char if char.isalnum() else "-" for char in run.label)


def _run_section(run: RunRecord) -> str:
    flat = flatten(run.config)
    facts = " · ".join(f"{name} <b>{_text(flat.get(key, '-'))}</b>" for name, key in (
        ("method", "method.name"), ("masking", "method.masking"), ("backbone", "model.backbone"),
        ("dataset", "data.dataset"), ("epochs", "train.epochs")) if key in flat)
    parts = [f'<section class="run" id="{_anchor(run)}">',
             f"<header><h2>{_text(run.label)}</h2><p class=path>{_text(run.path.resolve())}</p>"
             f"<p>{facts}</p></header>",
             _summary_part(run), _evaluation_part(run), _config_part(run), _plots_part(run),
             _gallery_part(run), _checkpoints_part(run), "</section>"]
    return "\n".join(parts)


def _summary_part(run: RunRecord) -> str:
    if run.summary is None:
        return f'<h3>Summary</h3><p class="note">{_text(run.summary_note)}</p>'
    rows = []
    for key, value in flatten(run.summary).items():
        if isinstance(value, list) and (len(value) > _MAX_LIST_ITEMS or any(
                isinstance(item, (dict, list)) for item in value)):
            rows.append(f'<tr><th scope="row">{_text(key)}</th><td class="note">'
                        f"{len(value)} entries (in summary.json)</td></tr>")
        elif isinstance(value, list):
            text = ", ".join(_number(item) for item in value) or "none"
            rows.append(f'<tr><th scope="row">{_text(key)}</th><td data-source="summary" '
                        f'data-run="{_text(run.label)}" data-key="{_text(key)}" '
                        f'data-value="{_text(_json(value))}">{_text(text)}</td></tr>')
        else:
            rows.append(f'<tr><th scope="row">{_text(key)}</th>'
                        f"{_value_cell(run, key, value, 'summary')}</tr>")
    return ('<h3>Summary <span class="note">(summary.json)</span></h3>'
            f'{_collapse_note(run.summary)}'
            f'<table class="summary"><tbody>{"".join(rows)}</tbody></table>')


def _collapse_note(summary: dict[str, Any]) -> str:
    """A warning above the summary of a run whose collapse monitor said so."""
    if summary.get("collapsed") is not True:
        return ""
    dims = summary.get("collapse_dims") if isinstance(summary.get("collapse_dims"), dict) else {}
    spreads = ", ".join(
        f"{name} {_number(summary[name])} (about {_number(1 / dims[name] ** 0.5)} when spread)"
        for name in ("feature_std", "embedding_std")
        if isinstance(summary.get(name), (int, float)) and isinstance(dims.get(name), int)
        and dims[name] > 0)
    return ('<p class="warning"><b>Collapsed:</b> at the end of training every image mapped '
            f"to nearly the same point{': ' + _text(spreads) if spreads else ''}. Usual "
            "causes: too high a learning rate, a missing predictor or stop-gradient, too "
            "small a batch for the method.</p>")


def _eval_cell(run: RunRecord, row: dict[str, Any], metric: str) -> str:
    value = row.get(metric)
    if value is None:
        return "<td>-</td>"
    return (f'<td class="num" data-source="eval" data-run="{_text(run.label)}" '
            f'data-protocol="{_text(row["protocol"])}" data-init="{_text(row["init"])}" '
            f'data-file="{_text(row.get("file", ""))}" data-key="{metric}" '
            f'data-value="{_text(_json(value))}" title="{_text(row["protocol"])} {metric}">'
            f'{_text(_number(value))} <span class="protocol">{_text(row["protocol"])}</span>'
            "</td>")


def _evaluation_part(run: RunRecord) -> str:
    note = (f'<p class="note">{_text(run.evaluation_note)}</p>' if run.evaluation_note
            else "")
    if not run.evaluations and note:
        return f"<h3>Evaluations</h3>{note}"
    if not run.evaluations:
        return ('<h3>Evaluations</h3><p class="note">No evaluation in eval/*.json (run '
                "<code>mixmask knn RUN</code>, <code>mixmask linear RUN</code> or "
                "<code>mixmask finetune RUN</code>).</p>")
    metrics = ("top1", "ci95", "top5", "best_top1", "box_ap", "mask_ap", "miou")
    head = "".join(f"<th>{name}</th>" for name in (
        "protocol", "init", "top-1 %", "95% interval +-", "top-5 %", "best top-1 %", "box AP",
        "mask AP", "mIoU %", "pretrain step", "wall time s", "file"))
    rows = []
    for row in run.evaluations:
        cells = [f'<th scope="row" class="protocol">{_text(row["protocol"])}</th>',
                 f"<td>{_text(row['init'])}</td>"]
        cells += [_eval_cell(run, row, metric) for metric in metrics]
        cells += [f"<td class=num>{_text(_number(row[key]) if row[key] is not None else '-')}"
                  "</td>" for key in ("pretrain_step", "wall_time_s")]
        cells.append(f"<td><code>{_text(row.get('file', ''))}</code></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<h3>Evaluations <span class="note">(eval/*.json; test-set scores)</span></h3>'
            f"{note}<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"
            "</table>")


def _config_part(run: RunRecord) -> str:
    lines = []

    def walk(tree: dict[str, Any], prefix: str, depth: int) -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            indent = "  " * depth
            if isinstance(value, dict) and value:
                lines.append(f"{indent}{_text(key)}:")
                walk(value, dotted + ".", depth + 1)
                continue
            changed = dotted in run.changed
            title = ""
            if changed and dotted in run.recipe_values:
                title = f' title="recipe: {_text(_yaml_scalar(run.recipe_values[dotted]))}"'
            lines.append(f'<span class="line{" changed" if changed else ""}" '
                         f'data-config-key="{_text(dotted)}"{title}>{indent}{_text(key)}: '
                         f"{_text(_yaml_scalar(value))}</span>")

    walk(run.config, "", 0)
    changes = ""
    if run.changed:
        rows = "".join(
            f'<tr><th scope="row"><code>{_text(key)}</code></th>'
            f"<td><code>{_text(_yaml_scalar(flatten(run.config)[key]))}</code></td>"
            + (f"<td><code>{_text(_yaml_scalar(run.recipe_values[key]))}</code></td>"
               if run.recipe_values else "") + "</tr>"
            for key in sorted(run.changed))
        recipe_head = "<th>recipe</th>" if run.recipe_values else ""
        changes = (f"<table class=changes><thead><tr><th>key</th><th>this run</th>"
                   f"{recipe_head}</tr></thead><tbody>{rows}</tbody></table>")
    return ('<h3>Config <span class="note">(config.yaml, resolved)</span></h3>'
            f'<p class="note">{_text(run.recipe_note)}</p>{changes}'
            "<details><summary>The whole config</summary>"
            f'<pre class="config">{chr(10).join(lines)}</pre></details>')


def _plots_part(run: RunRecord) -> str:
    plots = sorted((run.path / "plots").glob("*.png"))
    if not plots:
        return ('<h3>Plots</h3><p class="note">No plots in plots/ (draw them with '
                "<code>mixmask plot RUN</code>).</p>")
    figures = []
    for plot in plots:
        try:
            data = plot.read_bytes()
        except OSError as error:
            figures.append(f'<p class="note">{_text(plot.name)} is not readable '
                           f"({_text(error.strerror or error)}).</p>")
            continue
        figures.append(f"<figure>{_image(data, plot.stem)}"
                       f"<figcaption>{_text(plot.stem)}</figcaption></figure>")
    return f'<h3>Plots</h3><div class="plots">{"".join(figures)}</div>'


def _gallery_part(run: RunRecord) -> str:
    try:
        # In a child process: a crash inside matplotlib or the data costs this picture
        # (said on the page), never the report.
        data, rows = run_isolated(_mask_gallery, run.path, what="drawing the mask gallery")
    except MixmaskError as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - the page says why instead of failing
        reason = f"{type(error).__name__}: {error}"
    else:
        return (f"<h3>Mask gallery</h3><p class=note>Rows: {_text(rows)}; the first "
                f"{_GALLERY_IMAGES} training images, seeded by train.seed "
                "(<code>mixmask show-masks</code>).</p>"
                f'<figure class="gallery">{_image(data, "mask gallery", min_width=720)}</figure>')
    return f'<h3>Mask gallery</h3><p class="note">Not drawn: {_text(reason)}</p>'


def _mask_gallery(run: Path) -> tuple[bytes, str]:
    """The PNG of ``mixmask show-masks RUN/config.yaml`` (never downloading data), and
    its row names."""
    import torch


    config = load_config(run / "config.yaml", ["data.download=false"])
    mim = is_mim_method(config.method.name)
    draw = mim_gallery_from_config if mim else gallery_from_config
    rows = ("original, mask, input, low-pass" if mim else ", ".join(GALLERY_ROWS))
    # The gallery seeds torch's global generator; the caller's stream is left as it was.
    with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng(devices=[]):
        path = draw(config, Path(folder) / "gallery.png", num_images=_GALLERY_IMAGES)
        return path.read_bytes(), rows


def _checkpoints_part(run: RunRecord) -> str:
    checkpoints = sorted((run.path / "checkpoints").glob("*.ckpt"))
    if not checkpoints:
        return '<h3>Checkpoints</h3><p class="note">None saved.</p>'
    items = "".join(f"<li><code>{_text(path.name)}</code> "
                    f"({path.stat().st_size / 2**20:.1f} MiB)</li>" for path in checkpoints)
    return f"<h3>Checkpoints</h3><ul class=checkpoints>{items}</ul>"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 72rem; padding: 1rem 2rem 4rem; color: #1d232a; line-height: 1.4; }
h1 { font-size: 1.6rem; }
section { margin: 2rem 0; }
section.run { border-top: 3px solid #2c6e91; padding-top: .5rem; }
section.run header h2 { margin-bottom: .2rem; }
.path { color: #5b6770; font-family: ui-monospace, monospace; font-size: .85rem; margin: 0; }
h3 { margin-top: 1.6rem; border-bottom: 1px solid #dde3e8; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .92rem; }
th, td { border: 1px solid #dde3e8; padding: .25rem .6rem; text-align: left;
         vertical-align: top; }
thead th { background: #eef3f6; }
tbody th { font-weight: 500; background: #f8fafb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.protocol { color: #2c6e91; font-size: .8rem; }
th.protocol { font-size: .92rem; }
.note { color: #5b6770; font-size: .9rem; }
.warning { background: #fdecea; border-left: 4px solid #c0392b; padding: .5rem .75rem; }
pre.config { background: #f8fafb; border: 1px solid #dde3e8; padding: .6rem;
             font-size: .85rem; overflow-x: auto; }
pre.config .line { display: block; }
.changed { background: #ffe9a8; font-weight: 600; }
table.changes td, table.changes th { background: #fff6d6; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #dde3e8; }
.plots figure { max-width: 34rem; }
figcaption { text-align: center; color: #5b6770; font-size: .85rem; }
.gallery img { image-rendering: pixelated; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
