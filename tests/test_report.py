"""`gendd report`: one self-contained HTML page from a tiny bench folder, checked in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_bench import make_bench_world, tiny_config


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    from gendd.bench import run_bench

    root = tmp_path_factory.mktemp("report")
    cfg = tiny_config(make_bench_world(root / "world"), root, repeats=1)
    run_bench(cfg, root / "bench", progress=False)
    return root / "bench"


def chromium_console(html: Path, png: Path, tmp: Path, size: str = "1280,2000") -> list[str]:
    """Render ``html`` in headless Chromium, write a screenshot; return the page's console lines."""
    cmd = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           f"--screenshot={png}", f"--window-size={size}", html.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return [line for line in res.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_report_is_one_self_contained_page(bench_dir, tmp_path):
    from gendd.report import build_html, render_report

    out = render_report(bench_dir, tmp_path / "r" / "report.html")
    page = out.read_text()
    for section in ("results", "metrics", "plots", "images", "tsne", "config"):
        assert f'id="{section}"' in page
    assert "http://" not in page and "https://" not in page  # no external resources
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert page.count("data:image/png;base64,") == 3 * (1 + 4)  # per class: real + 4 sets
    assert page.count("<svg") == 1 + 3  # one accuracy plot (convnet3 x quick) + one t-SNE per class
    assert "random-ipc2" in page and "dit-ipc1" in page and "convnet3 · quick" in page
    assert build_html(bench_dir) == page  # t-SNE and everything else are deterministic
    assert 'id="tsne"' in build_html(bench_dir, tsne=False) and page.count("<svg") > build_html(
        bench_dir, tsne=False).count("<svg")


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not on PATH (Debian package `chromium`; scripts/setup.sh installs it)")
def test_report_loads_in_headless_chromium_without_console_errors(bench_dir, tmp_path):
    from gendd.report import render_report

    out = render_report(bench_dir, tmp_path / "report.html")
    png = tmp_path / "report.png"
    console = chromium_console(out, png, tmp_path)
    assert console == [], console
    shot = Image.open(png).convert("L")
    assert shot.size == (1280, 2000)
    lo, hi = shot.getextrema()
    assert hi - lo > 100  # something was drawn
    # the console check is live: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    assert any("Uncaught" in line for line in chromium_console(bad, tmp_path / "bad.png", tmp_path, "300,200"))
