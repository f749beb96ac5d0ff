"""A one-file HTML report of an evaluation: metrics table, caption gallery, training curves.

The page is self-contained: images and charts are base64 data URIs, the CSS and the one
small script are inline, and a Content-Security-Policy forbids loading anything else, so
the file opens from disk, offline, and can be attached or archived as it is.

Sections::

    #metrics    one row per metric key, one column per policy (in the order given)
    #gallery    each image with every policy's caption under it, references folded away
    #curves     reward and loss curves from a training run's metrics.jsonl (optional)

After the page loads, the script counts the images that decoded and those that did not into
``document.body.dataset.imagesLoaded`` / ``imagesBroken`` (and shows a warning if any broke),
so a headless browser can check the page.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import frozen

from vlrm.errors import is_finite_real

DASH = "\u2014"
THUMBNAIL_SIZE = 256
MAX_REWARD_CURVES = 8
MAX_LOSS_CURVES = 8


@frozen
class GalleryItem:
    """One image of the gallery.

    Attributes:
        image_id: Shown under the image and used as its alt text.
        image: A PIL image (converted to RGB and shrunk to a thumbnail for the page).
        captions: Policy name -> its caption for this image.
        references: Reference captions, if the dataset has them.
    """

    image_id: str
    image: Any
    captions: Mapping[str, str]
    references: Sequence[str] | None = None


def write_report(path: str | Path, results: Mapping[str, Mapping[str, float | int | str]],
                 gallery: Sequence[GalleryItem], metrics_jsonl: str | Path | None = None,
                 title: str = "vlrm evaluation") -> Path:
    """Write the HTML report atomically.

    Args:
        path: The ``.html`` file to write; its folder is created if missing.
        results: Policy name -> flat metrics (e.g. ``clip_recall/r1``); policies become
            columns in this order.
        gallery: Images with each policy's caption.
        metrics_jsonl: A training run's ``metrics.jsonl``; draws reward and loss curves.
            Lines that are not JSON objects with a numeric ``step`` are skipped.
        title: Page title and heading.

    Returns:
        The written path.

    Raises:
        FileNotFoundError: ``metrics_jsonl`` is given but does not exist.
    """
    path = Path(path)
    if metrics_jsonl is not None and not Path(metrics_jsonl).is_file():
        raise FileNotFoundError(errno.ENOENT, "report: metrics_jsonl not found", str(metrics_jsonl))

    policies = list(results)
    for item in gallery:
        policies.extend(p for p in item.captions if p not in policies)

    sections = [_metrics_section(results), _gallery_section(gallery, policies)]
    if metrics_jsonl is not None:
        sections.append(_curves_section(Path(metrics_jsonl)))
    page = _page(title, policies, len(gallery), sections)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_value(value: Any) -> str:
    """A metric as table text: 4 significant digits for floats, an em dash for None."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "\u221e" if v > 0 else "\u2212\u221e"
        a = abs(v)
        if a == 0:
            return "0"
        if 1e-3 <= a < 1e4:
            return f"{v:.4g}"
        if 1e4 <= a < 1e9:
            return f"{v:.0f}"
        return f"{v:.3e}"
    return str(value)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _metrics_section(results: Mapping[str, Mapping[str, Any]]) -> str:
    policies = list(results)
    keys = sorted({k for metrics in results.values() for k in metrics},
                  key=lambda k: (k.partition("/")[0] if "/" in k else "", k))
    if not policies or not keys:
        body = '<p class="note">No metrics.</p>'
        return f'<section><h2>Metrics</h2>{body}<table id="metrics"></table></section>'

    head = "".join(f'<th scope="col">{_esc(p)}</th>' for p in policies)
    rows, group = [], None
    for key in keys:
        prefix, slash, name = key.rpartition("/")
        top = key.partition("/")[0] if slash else ""
        if top != group:
            group = top
            if top:
                rows.append(f'<tr class="group"><th colspan="{len(policies) + 1}">{_esc(top)}</th></tr>')
        label = f'<span class="prefix">{_esc(prefix + slash)}</span>{_esc(name)}'
        cells = []
        for p in policies:
            value = results[p].get(key)
            kind = "missing" if value is None else ("num" if isinstance(value, numbers.Number) else "text")
            cells.append(f'<td class="{kind}">{_esc(format_value(value))}</td>')
        rows.append(f'<tr data-key="{_esc(key)}"><th scope="row">{label}</th>{"".join(cells)}</tr>')
    return ('<section><h2>Metrics</h2>'
            f'<table id="metrics"><thead><tr><th scope="col">metric</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></section>')


def _jpeg_data_uri(image: Any) -> str:
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    thumb = image.convert("RGB")  # always a copy, so thumbnail() leaves the caller's image alone
    thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gallery_section(gallery: Sequence[GalleryItem], policies: Sequence[str]) -> str:
    figures = []
    for item in gallery:
        captions = "".join(
            f'<div class="caption" data-policy="{_esc(p)}"><div class="policy">{_esc(p)}</div>'
            f'<p>{_esc(item.captions[p]) if p in item.captions else DASH}</p></div>'
            for p in policies)
        refs = ""
        if item.references:
            lis = "".join(f"<li>{_esc(r)}</li>" for r in item.references)
            refs = (f'<details class="references"><summary>References ({len(item.references)})'
                    f"</summary><ol>{lis}</ol></details>")
        figures.append(
            f'<figure class="item" data-image-id="{_esc(item.image_id)}">'
            f'<img src="{_jpeg_data_uri(item.image)}" alt="{_esc(item.image_id)}">'
            f'<figcaption><div class="image-id">{_esc(item.image_id)}</div>'
            f'<div class="captions">{captions}</div>{refs}</figcaption></figure>')
    body = "".join(figures) if figures else '<p class="note">No images.</p>'
    return f'<section><h2>Captions</h2><div id="gallery">{body}</div></section>'


def read_curves(metrics_jsonl: Path) -> dict[str, dict[float, float]]:
    """Numeric ``reward/*`` and ``loss/*`` series from a metrics.jsonl: key -> step -> value.

    Malformed lines and non-finite values are skipped; a repeated step (a resumed run) keeps
    the later value.
    """
    series: dict[str, dict[float, float]] = {}
    with open(metrics_jsonl, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not is_finite_real(record.get("step")):
                continue
            step = float(record["step"])
            for key, value in record.items():
                if key.startswith(("reward/", "loss/")) and is_finite_real(value):
                    series.setdefault(key, {})[step] = float(value)
    return series


def _chart_data_uri(series: Mapping[str, Mapping[float, float]], title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in series.items():
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], label=key, linewidth=1.5,
                marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _curves_section(metrics_jsonl: Path) -> str:
    series = read_curves(metrics_jsonl)
    rewards = sorted((k for k in series if k.startswith("reward/")),
                     key=lambda k: (k != "reward/total", k))[:MAX_REWARD_CURVES]
    losses = sorted((k for k in series if k.startswith("loss/")),
                    key=lambda k: (k != "loss/total", k))[:MAX_LOSS_CURVES]
    charts = []
    for keys, name in ((rewards, "Reward"), (losses, "Loss")):
        if keys:
            uri = _chart_data_uri({k: series[k] for k in keys}, name)
            charts.append(f'<figure class="chart"><img src="{uri}" alt="{name} curves"></figure>')
    body = ("".join(charts) if charts
            else '<p class="note">No reward or loss values in this file.</p>')
    return (f'<section id="curves"><h2>Training curves</h2>'
            f'<p class="note">From <code>{_esc(metrics_jsonl.name)}</code>.</p>'
            f'<div class="charts">{body}</div></section>')


_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       padding: 1.5rem; max-width: 1200px; color: #1f2328; background: #fff; line-height: 1.4; }
h1 { margin: 0 0 0.25rem; font-size: 1.6rem; }
h2 { margin: 2rem 0 0.75rem; font-size: 1.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.25rem; }
.note { color: #59636e; margin: 0.25rem 0; }
.warning { background: #ffebe9; border: 1px solid #cf222e; color: #82071e; padding: 0.5rem 0.75rem; }
table { border-collapse: collapse; font-size: 0.95rem; }
th, td { padding: 0.3rem 0.8rem; border-bottom: 1px solid #eaeef2; }
thead th { text-align: right; border-bottom: 2px solid #d0d7de; }
thead th:first-child, tbody th { text-align: left; font-weight: normal; }
tr.group th { font-weight: 600; background: #f6f8fa; padding-top: 0.5rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { text-align: right; color: #59636e; }
td.missing { text-align: right; color: #8c959f; }
.prefix { color: #8c959f; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1rem; }
figure { margin: 0; }
figure.item { border: 1px solid #d0d7de; border-radius: 6px; padding: 0.75rem; }
figure.item > img { display: block; margin: 0 auto 0.5rem; max-width: 100%; }
.image-id { font-family: ui-monospace, monospace; font-size: 0.8rem; color: #59636e;
            word-break: break-all; margin-bottom: 0.4rem; }
.captions { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 0.5rem; }
.caption { background: #f6f8fa; border-radius: 4px; padding: 0.4rem 0.5rem; overflow-wrap: anywhere; min-width: 0; }
.caption .policy { font-size: 0.75rem; font-weight: 600; text-transform: uppercase; color: #0969da; }
.caption p { margin: 0.2rem 0 0; }
.references { margin-top: 0.5rem; font-size: 0.85rem; color: #59636e; }
.references ol { margin: 0.25rem 0 0; padding-left: 1.25rem; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
.chart img { max-width: 100%; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var loaded = 0, broken = 0;
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (img.complete && img.naturalWidth > 0) { loaded++; } else { broken++; }
  }
  document.body.dataset.imagesLoaded = String(loaded);
  document.body.dataset.imagesBroken = String(broken);
  if (broken > 0) {
    var warning = document.getElementById("image-warning");
    warning.textContent = broken + " of " + (loaded + broken) + " images failed to load.";
    warning.hidden = false;
  }
});
"""


def _page(title: str, policies: Sequence[str], n_images: int, sections: Sequence[str]) -> str:
    images = f"{n_images} image{'' if n_images == 1 else 's'}"
    summary = (f"{len(policies)} polic{'y' if len(policies) == 1 else 'ies'} "
               f"({', '.join(policies)}), {images}") if policies else images
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>\n"
        f"<body><h1>{_esc(title)}</h1><p class=\"note\">{_esc(summary)}</p>"
        '<p id="image-warning" class="warning" hidden></p>\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
