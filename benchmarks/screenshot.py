"""Regenerate docs/board.png: a screenshot of one board of the leaderboard, from a real store.

    bench run --defense natural --matrix full          # whatever the results should show
    python benchmarks/screenshot.py                    # ./results -> docs/board.png
    python benchmarks/screenshot.py --results /tmp/res --dataset digits --out docs/board.png

Builds the site into a temporary folder (the store is only read), opens it from file://
in Debian's chromium through playwright (`apt-get install -y chromium`,
`pip install playwright`; BENCH_CHROMIUM names another executable), and captures the
dataset's main board: its heading and its table. The README shows the picture, so it
is kept small (a warning says when it passes 300 KB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.errors import BenchError
from bench.reporting.site import build_site
from bench.store.db import Store

LIMIT = 300 * 1024


def chromium() -> str:
    for name in (os.environ.get("BENCH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and (shutil.which(name) or (name if Path(name).is_file() else None))
        if path:
            return path
    raise BenchError("no chromium found: `apt-get install -y chromium`, or set BENCH_CHROMIUM to a browser")


def screenshot(store: Store, out: Path, dataset: str = "digits", width: int = 1280) -> int:
    """Write the PNG of `dataset`'s first board to `out`; returns its size in bytes."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BenchError("the playwright package is missing: `pip install playwright`") from exc
    with tempfile.TemporaryDirectory(prefix="board-shot-") as tmp:
        index = build_site(store, Path(tmp) / "site")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium())
            page = browser.new_page(viewport={"width": width, "height": 800}, device_scale_factor=1)
            page.goto(index.as_uri())
            board = page.locator(f"section.board-section[id^='board-{dataset}-']").first
            if board.count() == 0:
                raise BenchError(f"the store has no {dataset} board: run `bench run --dataset {dataset} ...` first")
            out.parent.mkdir(parents=True, exist_ok=True)
            board.screenshot(path=str(out))
            browser.close()
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--results",
        default=os.environ.get("BENCH_RESULTS", "results"),
        help="results folder holding bench.db (default ./results)",
    )
    ap.add_argument("--db", help="SQLAlchemy URL of the store instead of --results")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "board.png"))
    ap.add_argument("--width", type=int, default=1280, help="browser window width in CSS pixels")
    args = ap.parse_args(argv)
    try:
        if not args.db and not (Path(args.results) / "bench.db").is_file():
            raise BenchError(f"no store at {args.results}/bench.db: run `bench run` first or pass --results/--db")
        store = Store.for_results(Path(args.results), args.db)
        size = screenshot(store, Path(args.out), args.dataset, args.width)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({size / 1024:.0f} KB)")
    if size > LIMIT:
        print(f"warning: over {LIMIT // 1024} KB; try a smaller --width", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
