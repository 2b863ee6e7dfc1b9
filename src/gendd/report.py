"""``gendd report``: one self-contained HTML page from a ``gendd bench`` folder.

The page has no external resources: images are base64 PNG data URIs, plots are inline SVG drawn
here (no plotting library), and a few lines of inline JavaScript sort the tables. Sections:

1. the results table (accuracy mean ± std per method, IPC, student, protocol; scores) and the set
   metrics table (VAE latent space, one row per distilled set);
2. accuracy vs IPC, one line plot per (student, protocol), one line per method (error bars: ± std);
3. per class, every distilled set's images next to real training images of the class;
4. per class, a 2-D t-SNE (``sklearn.manifold.TSNE``, fixed ``random_state``) of real vs distilled
   VAE latents (the subsample of real latents saved by ``gendd bench`` with ``metrics = true``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from gendd.errors import DataError
from gendd.artifacts import atomic_write

#: Line/marker colours (sets, methods), cycled.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f")
REAL_COLOUR = "#9a9a9a"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{margin:18px 0 6px} .meta{color:#555;font-size:.9em} .note{color:#555;font-size:.88em;max-width:1000px}
table.data{border-collapse:collapse;font-size:.85em} table.data th,table.data td{border:1px solid #ddd;
padding:3px 7px;text-align:right;white-space:nowrap} table.data th{background:#f4f4f4;cursor:pointer;
user-select:none} table.data td.t{text-align:left} table.data tr:nth-child(even) td{background:#fafafa}
.plots{display:flex;flex-wrap:wrap;gap:16px} .plots figure{margin:0} figcaption{font-size:.85em;color:#444}
table.grid{border-collapse:collapse;margin-bottom:8px} table.grid th{text-align:right;padding:2px 10px 2px 0;
font-weight:normal;font-size:.85em;color:#333;white-space:nowrap} table.grid td{padding:2px 0}
img.px{image-rendering:pixelated;display:block} pre{background:#f6f6f6;padding:8px;font-size:.8em;overflow:auto}
nav a{margin-right:14px} .scroll{overflow-x:auto;max-width:100%}
"""

_JS = """
document.querySelectorAll('table.data').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.title = 'sort';
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-sort') !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-sort'); });
      th.setAttribute('data-sort', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def _fmt(v: Any, digits: int = 2) -> str:
    f = _num(v)
    return "–" if not math.isfinite(f) else f"{f:.{digits}f}"


# ---------------------------------------------------------------------- images
def png_data_uri(image: np.ndarray) -> str:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` array -> ``data:image/png;base64,...``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _sorted_pngs(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("*.png") if p.is_file()]
    return sorted(files, key=lambda p: (int(p.stem), p.name) if p.stem.isdigit() else (1 << 60, p.name))


def image_strip(files: list[Path], pad: int = 2) -> np.ndarray | None:
    """The images of ``files`` side by side on white (RGB uint8), or None if there are none."""
    from PIL import Image

    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    if not arrays:
        return None
    h = max(a.shape[0] for a in arrays)
    w = sum(a.shape[1] for a in arrays) + pad * (len(arrays) + 1)
    strip = np.full((h + 2 * pad, w, 3), 255, dtype=np.uint8)
    x = pad
    for a in arrays:
        strip[pad:pad + a.shape[0], x:x + a.shape[1]] = a
        x += a.shape[1] + pad
    return strip


def _img_tag(strip: np.ndarray, alt: str, scale: int) -> str:
    h, w = strip.shape[:2]
    return (f'<img class="px" alt="{_esc(alt)}" width="{w * scale}" height="{h * scale}" '
            f'src="{png_data_uri(strip)}">')


# ---------------------------------------------------------------------- SVG plots
def _nice_range(lo: float, hi: float) -> tuple[float, float, float]:
    """Axis limits and tick step covering [lo, hi] with 4-8 ticks of 1/2/5 x 10^k."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step, step


def svg_line_plot(series: dict[str, list[tuple[float, float, float]]], xs: list[Any], *, title: str,
                  xlabel: str, ylabel: str, width: int = 460, height: int = 300) -> str:
    """Inline SVG: one line per series over categorical x positions ``xs``; points ``(x, y, err)``
    with error bars ``y ± err``; a legend below the plot. NaN points are skipped."""
    ml, mr, mt = 52, 14, 28
    legend_rows = math.ceil(len(series) / 3)
    mb = 42 + 18 * legend_rows
    pw, ph = width - ml - mr, height - mt - mb
    ys = [v for pts in series.values() for (_, y, e) in pts if math.isfinite(y)
          for v in (y - (e if math.isfinite(e) else 0), y + (e if math.isfinite(e) else 0))]
    y0, y1, step = _nice_range(min(ys, default=0.0), max(ys, default=1.0))
    pos = {x: ml + (pw * (i + 0.5) / len(xs)) for i, x in enumerate(xs)}

    def py(v: float) -> float:
        return mt + ph * (1 - (v - y0) / (y1 - y0))

    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{_esc(title)}" font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13">{_esc(title)}</text>']
    t = y0
    while t <= y1 + step / 2:
        yy = py(t)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{ml - 5}" y="{yy + 4:.1f}" text-anchor="end">{t:g}</text>')
        t += step
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for x, px in pos.items():
        out.append(f'<text x="{px:.1f}" y="{mt + ph + 15}" text-anchor="middle">{_esc(x)}</text>')
    out.append(f'<text x="{ml + pw / 2:.1f}" y="{mt + ph + 30}" text-anchor="middle">{_esc(xlabel)}</text>')
    out.append(f'<text transform="translate(13 {mt + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{_esc(ylabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        col = PALETTE[i % len(PALETTE)]
        good = [(pos[x], py(y), y, e) for x, y, e in pts if x in pos and math.isfinite(y)]
        if len(good) > 1:
            d = " ".join(f"{'M' if k == 0 else 'L'}{gx:.1f},{gy:.1f}" for k, (gx, gy, _, _) in enumerate(good))
            out.append(f'<path d="{d}" fill="none" stroke="{col}" stroke-width="2"/>')
        for gx, gy, y, e in good:
            if math.isfinite(e) and e > 0:
                out.append(f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{py(y - e):.1f}" y2="{py(y + e):.1f}" '
                           f'stroke="{col}" stroke-width="1.2"/>')
            out.append(f'<circle cx="{gx:.1f}" cy="{gy:.1f}" r="3.5" fill="{col}"><title>{_esc(name)}: '
                       f'{y:.2f} ± {e if math.isfinite(e) else 0:.2f}</title></circle>')
        lx = ml + (i % 3) * (pw / 3)
        ly = mt + ph + 46 + 18 * (i // 3)
        out.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="12" height="4" fill="{col}"/>')
        out.append(f'<text x="{lx + 16:.1f}" y="{ly - 4}">{_esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_scatter(groups: list[tuple[str, str, np.ndarray, float]], *, title: str, size: int = 330) -> str:
    """Inline SVG scatter of 2-D point groups ``(name, colour, points (n, 2), radius)``; the first
    group is drawn first (underneath); a legend lists the groups."""
    legend_rows = math.ceil(len(groups) / 2)
    m, top = 10, 24
    h = size + 16 * legend_rows + 6
    allp = np.concatenate([g[2] for g in groups if len(g[2])]) if any(len(g[2]) for g in groups) \
        else np.zeros((1, 2))
    lo, hi = allp.min(0), allp.max(0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    inner = size - 2 * m - top + m

    def tx(p: np.ndarray) -> np.ndarray:  # 6 px inside the frame so edge markers stay whole
        return np.stack([m + 6 + (p[:, 0] - lo[0]) / span[0] * (size - 2 * m - 12),
                         top + (1 - (p[:, 1] - lo[1]) / span[1]) * inner], 1)

    out = [f'<svg width="{size}" height="{h}" viewBox="0 0 {size} {h}" role="img" aria-label="{_esc(title)}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{size / 2:.1f}" y="15" text-anchor="middle" font-size="12">{_esc(title)}</text>',
           f'<rect x="1" y="{top - 6}" width="{size - 2}" height="{inner + 12}" fill="none" stroke="#ccc"/>']
    for name, col, pts, r in groups:
        if not len(pts):
            continue
        real = col == REAL_COLOUR
        style = f'fill="{col}" fill-opacity="0.45"' if real else f'fill="{col}" stroke="#000" stroke-width="0.6"'
        out.append(f'<g {style}><title>{_esc(name)}</title>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}"/>' for x, y in tx(pts)]
        out.append("</g>")
    for i, (name, col, pts, _) in enumerate(groups):
        lx, ly = m + (i % 2) * (size / 2), size + 8 + 16 * (i // 2)
        out.append(f'<circle cx="{lx + 5:.1f}" cy="{ly - 4}" r="4" fill="{col}"/>')
        out.append(f'<text x="{lx + 13:.1f}" y="{ly}">{_esc(name)} ({len(pts)})</text>')
    out.append("</svg>")
    return "".join(out)


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding of ``x`` (``sklearn.manifold.TSNE``, PCA init, ``random_state=seed``;
    perplexity ``min(30, (n - 1) / 3)`` so that small sets work)."""
    from sklearn.manifold import TSNE

    n = len(x)
    if n < 3:
        return np.zeros((n, 2)) if n < 2 else np.array([[0.0, 0.0], [1.0, 0.0]])[:n]
    perplexity = float(max(1.0, min(30.0, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto").fit_transform(x.astype(np.float64))


# ---------------------------------------------------------------------- page sections
def _table(head: list[str], rows: list[list[tuple[str, Any]]], text_cols: int) -> str:
    """HTML table; each cell is ``(shown text, sort value)``."""
    out = ['<div class="scroll"><table class="data"><thead><tr>', *(f"<th>{_esc(h)}</th>" for h in head),
           "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>")
        for i, (text, v) in enumerate(r):
            cls = ' class="t"' if i < text_cols else ""
            out.append(f'<td{cls} data-v="{_esc(v)}">{_esc(text)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _results_section(rows: list[dict]) -> str:
    head = ["method", "IPC", "student", "protocol", "final acc %", "best acc %", "n", "s/student"]
    extra = [k for k in ("ior", "lrs", "ars") if any(k in r for r in rows)]
    head += [{"ior": "IOR (pts)", "lrs": "LRS", "ars": "ARS"}[k] for k in extra]
    body = []
    for r in rows:
        cells = [(r["method"], r["method"]), (str(r["ipc"]), r["ipc"]), (r["student"], r["student"]),
                 (r["protocol"], r["protocol"]),
                 (f"{_fmt(r['final_mean'])} ± {_fmt(r['final_std'])}", _num(r["final_mean"])),
                 (f"{_fmt(r['best_mean'])} ± {_fmt(r['best_std'])}", _num(r["best_mean"])),
                 (f"{r['n']}/{r.get('repeats', r['n'])}", r["n"]),
                 (_fmt(r.get("seconds_per_student"), 1), _num(r.get("seconds_per_student")))]
        cells += [(_fmt(r.get(k), 2 if k == "ior" else 3), _num(r.get(k))) for k in extra]
        body.append(cells)
    note = ("Mean ± std (population, ddof 0) over n students of the final-epoch and best-over-training "
            "test accuracy. IOR: accuracy gain over the random-subset baseline under the same protocol; LRS / "
            "ARS: DD-Ranking's label- and augmentation-robust scores (hard labels), see gendd.metrics.")
    return f'<h2 id="results">Results</h2>{_table(head, body, 4)}<p class="note">{_esc(note)}</p>'


_METRIC_COLS = (("mmd2", "MMD² (biased)", 4), ("mmd2_unbiased", "MMD² (unbiased)", 4), ("fd", "FD", 2),
                ("precision", "precision", 3), ("recall", "recall", 3), ("density", "density", 3),
                ("coverage", "coverage", 3), ("pairwise_dist", "mean pairwise dist", 3),
                ("pairwise_cos", "mean pairwise cos dist", 3), ("nn_dist", "mean NN dist", 3),
                ("representativeness", "real→distilled NN dist", 3))


def _metrics_section(set_metrics: dict[str, dict]) -> str:
    if not set_metrics:
        return ('<h2 id="metrics">Set metrics</h2><p class="note">No set metrics in this bench folder '
                "(run gendd bench with metrics = true).</p>")
    head = ["set", "latents"] + [h for _, h, _ in _METRIC_COLS]
    body = [[(name, name), (m.get("latent_source", ""), m.get("latent_source", ""))]
            + [(_fmt(m.get(k), d), _num(m.get(k))) for k, _, d in _METRIC_COLS]
            for name, m in set_metrics.items()]
    note = ("VAE latent space (flattened latents), each distilled class against a seeded subsample of the real "
            "class, averaged over classes. MMD²: RBF kernel, median-heuristic bandwidth (Gretton et al. 2012). "
            "FD: Fréchet distance of Gaussian fits. Precision / recall / density / coverage: Naeem et al. 2020 "
            "(k-NN radii). Diversity: mean pairwise (cosine) distance and mean nearest-neighbour distance within "
            "the set. Last column: mean distance of real points to their nearest distilled point (lower = more "
            "representative). 'stored' latents are the method's own; 'encoded' are VAE posterior means of the "
            "exported PNGs.")
    return f'<h2 id="metrics">Set metrics</h2>{_table(head, body, 2)}<p class="note">{_esc(note)}</p>'


def _plots_section(rows: list[dict]) -> str:
    out = ['<h2 id="plots">Accuracy vs IPC</h2><div class="plots">']
    keys = list(dict.fromkeys((r["student"], r["protocol"]) for r in rows))
    for student, proto in keys:
        sub = [r for r in rows if r["student"] == student and r["protocol"] == proto]
        xs = sorted({int(r["ipc"]) for r in sub})
        series: dict[str, list[tuple[float, float, float]]] = {}
        for r in sub:
            series.setdefault(r["method"], []).append((int(r["ipc"]), _num(r["final_mean"]), _num(r["final_std"])))
        for pts in series.values():
            pts.sort()
        svg = svg_line_plot(series, xs, title=f"{student} · {proto}", xlabel="images per class (IPC)",
                            ylabel="final test accuracy %")
        out.append(f"<figure>{svg}<figcaption>final-epoch accuracy, mean ± std over students"
                   "</figcaption></figure>")
    out.append("</div>")
    return "".join(out)


def _set_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(Path(r["set"]).name for r in rows))


def _images_section(bench: Path, sets: list[str], classes: list[str], max_images: int) -> str:
    out = ['<h2 id="images">Distilled images per class</h2>',
           f'<p class="note">Each row: up to {max_images} images of a set (first row: real training images of '
           "the class, a seeded random sample).</p>"]
    for name in classes:
        out.append(f'<h3>{_esc(name)}</h3><table class="grid">')
        rows = [("real", bench / "real" / name)] + [(s, bench / "sets" / s / name) for s in sets]
        for label, folder in rows:
            strip = image_strip(_sorted_pngs(folder)[:max_images]) if folder.is_dir() else None
            if strip is None:
                cell = '<span class="note">(none)</span>'
            else:
                scale = max(1, min(3, 64 // max(1, strip.shape[0])))
                cell = _img_tag(strip, f"{label} {name}", scale)
            out.append(f"<tr><th>{_esc(label)}</th><td>{cell}</td></tr>")
        out.append("</table>")
    return "".join(out)


def _load_class_latents(path: Path) -> tuple[list[str], dict[int, np.ndarray]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        classes = json.loads((f.metadata() or {}).get("classes", "[]"))
        arrays = {int(k.split("_", 1)[1]): f.get_tensor(k) for k in f.keys()}
    return classes, arrays


def _tsne_section(bench: Path, sets: list[str], classes: list[str], seed: int) -> str:
    mdir = bench / "metrics"
    head = '<h2 id="tsne">t-SNE of real vs distilled VAE latents</h2>'
    if not (mdir / "real-latents.safetensors").exists():
        return head + ('<p class="note">No latents saved in this bench folder (run gendd bench with '
                       "metrics = true).</p>")
    _, real = _load_class_latents(mdir / "real-latents.safetensors")
    dist = {s: _load_class_latents(mdir / f"{s}.safetensors")[1] for s in sets
            if (mdir / f"{s}.safetensors").exists()}
    out = [head, f'<p class="note">Per class: t-SNE (scikit-learn, PCA init, random_state={seed}) of the saved '
                 "real latents (grey) and every set's distilled latents, fitted jointly; axes are arbitrary.</p>",
           '<div class="plots">']
    for c, name in enumerate(classes):
        parts = [("real", REAL_COLOUR, real.get(c, np.zeros((0, 1))), 2.0)]
        parts += [(s, PALETTE[i % len(PALETTE)], dist[s].get(c, np.zeros((0, 1))), 4.0)
                  for i, s in enumerate(sets) if s in dist]
        parts = [p for p in parts if len(p[2])]
        if not parts:
            continue
        x = np.concatenate([p[2].reshape(len(p[2]), -1) for p in parts]).astype(np.float64)
        emb = tsne_2d(x, seed)
        groups, k = [], 0
        for label, col, pts, r in parts:
            groups.append((label, col, emb[k:k + len(pts)], r))
            k += len(pts)
        out.append(f"<figure>{svg_scatter(groups, title=name)}</figure>")
    out.append("</div>")
    return "".join(out)


def build_html(bench_dir: str | os.PathLike, *, tsne: bool = True, max_images: int = 20, seed: int = 0) -> str:
    """The report page of a bench folder as one HTML string (see the module docstring)."""
    bench = Path(bench_dir)
    res_path = bench / "results.json"
    if not res_path.exists():
        raise DataError(f"{bench} has no results.json; run `gendd bench CONFIG.toml --out {bench}` first")
    res = json.loads(res_path.read_text())
    rows = res.get("rows", [])
    sets = _set_names(rows)
    classes: list[str] = []
    for s in sets:
        mpath = bench / "sets" / s / "manifest.json"
        if mpath.exists():
            classes = json.loads(mpath.read_text()).get("dataset", {}).get("classes", [])
            break
    if not classes and (bench / "real").is_dir():
        classes = sorted(p.name for p in (bench / "real").iterdir() if p.is_dir() and not p.name.startswith("."))
    name = res.get("name", bench.name)
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>gendd bench report: {_esc(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>gendd bench report: {_esc(name)}</h1>",
        f'<p class="meta">git {_esc(res.get("git_rev", "unknown"))} · config {_esc(res.get("config_hash", "?"))} · '
        f'{_esc(res.get("created", ""))} · dataset {_esc(res.get("config", {}).get("data", "?"))} · '
        f"{len(sets)} sets, {len(rows)} result rows</p>",
        '<nav><a href="#results">results</a><a href="#metrics">set metrics</a><a href="#plots">accuracy vs IPC</a>'
        '<a href="#images">images</a><a href="#tsne">t-SNE</a><a href="#config">config</a></nav>',
        _results_section(rows), _metrics_section(res.get("set_metrics") or {}), _plots_section(rows),
        _images_section(bench, sets, classes, max_images),
        _tsne_section(bench, sets, classes, seed) if tsne else
        '<h2 id="tsne">t-SNE of real vs distilled VAE latents</h2><p class="note">Skipped (--no-tsne).</p>',
        '<h2 id="config">Config</h2><pre>' + _esc(json.dumps(res.get("config", {}), indent=2)) + "</pre>",
        f"<script>{_JS}</script></body></html>",
    ]
    return "\n".join(parts)


def render_report(bench_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, tsne: bool = True,
                  max_images: int = 20, seed: int = 0) -> Path:
    """Write the report of ``bench_dir`` to ``out`` (default ``<bench_dir>/report.html``); return its path."""
    page = build_html(bench_dir, tsne=tsne, max_images=max_images, seed=seed)
    out = Path(out) if out is not None else Path(bench_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_text(page, encoding="utf-8"))
    return out
