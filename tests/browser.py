"""What a person sees of a run in the MLflow UI, in a real browser: headless Debian chromium driven
by Playwright (`.ci/run` installs chromium; the playwright package is in the `test` extra, and
`playwright install`, which downloads a browser of its own, is never used). Screenshots go to
`test-artifacts/mlflow-ui/` (or $DITFORGE_TEST_ARTIFACTS). The test that uses it:
tests/e2e/test_jobs_e2e.py::test_the_demo_run_in_the_mlflow_ui."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO

CHROMIUM = os.environ.get("DITFORGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",  # as root (CI), chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("DITFORGE_TEST_ARTIFACTS") or REPO / "test-artifacts") / "mlflow-ui"


def skip_without_browser() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"no browser: {CHROMIUM} not found (Debian's chromium: `apt-get install -y chromium`, which .ci/run does as root)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("no browser driver: the playwright package is missing (pip install -e '.[test]')")


@contextmanager
def page() -> Iterator[Any]:
    """A fresh profile each time (no switch position remembered from an earlier visit)."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="ditforge-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000}
            )
            try:
                yield ctx.new_page()
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def shot(pg: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path


def run_page_checks(link: str, params: list[str], grid: str, grid_px: tuple[int, int]) -> list[Path]:
    """Open a run's page at `link` (what ditforge prints: `.../#/experiments/E/runs/R?workflowType=...`)
    and check what a person looks for: the model-training view (runs and models, no GenAI pages),
    the parameters, the metric charts with loss, learning rate and throughput first, and the sample
    grid `grid` (an artifact path) drawn at its size `grid_px` (width, height). → the screenshots."""
    run, query = link.split("?", 1)
    view = "?" + query
    shots = []
    with page() as pg:
        pg.set_default_timeout(90_000)  # the first load reads the UI's bundle on a busy 2-core machine
        pg.goto(link, wait_until="load")
        pg.get_by_text("Parameters (", exact=False).first.wait_for()
        nav = pg.locator("aside, nav").first.inner_text()
        assert "Runs" in nav and "Models" in nav, nav
        body = pg.inner_text("body")
        for genai in ("Judges", "Evaluation runs", "Prompts"):
            assert genai not in body, f"GenAI view: {genai!r} on the run page"
        shown = [p for p in params if p in body]
        assert len(shown) >= 3, (params[:10], body[:2000])
        shots.append(shot(pg, "1-run-overview"))
        pg.get_by_text("Parameters (", exact=False).first.scroll_into_view_if_needed()
        shots.append(shot(pg, "2-run-parameters"))

        pg.goto(f"{run}/model-metrics{view}", wait_until="load")
        pg.get_by_text("samples_per_s", exact=True).first.wait_for()
        pg.wait_for_function("() => document.querySelectorAll('.js-plotly-plot path.js-line').length >= 3")
        titles = pg.evaluate(
            "() => Array.from(document.querySelectorAll('h1,h2,h3,h4,[role=heading]')).map(e => e.textContent.trim())"
        )
        charts = [t for t in titles if t and t != pg.title()]
        first = charts[charts.index("loss") :][:3] if "loss" in charts else charts
        assert first == ["loss", "lr", "samples_per_s"], charts
        text = pg.inner_text("body")
        sections = [s for s in ("train\n", "train_checkpoint\n", "train_data\n", "validation\n") if s in text]
        assert sections[0] == "train\n" and [text.index(s) for s in sections] == sorted(
            text.index(s) for s in sections
        ), sections
        shots.append(shot(pg, "3-model-metrics"))

        pg.goto(f"{run}/artifacts/{grid}{view}", wait_until="load")
        pg.get_by_text(grid.rsplit("/", 1)[-1]).first.wait_for()
        pg.wait_for_function(
            "([w, h]) => Array.from(document.images).some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth === w && i.naturalHeight === h)",
            arg=list(grid_px),
        )
        shots.append(shot(pg, "4-sample-grid"))
    return shots
