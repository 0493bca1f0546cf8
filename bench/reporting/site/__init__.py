"""The static leaderboard: `bench site` reads the store and writes a folder of HTML.

Every number comes from each checkpoint's evidence (bench.store.evidence), built once
when the store is read (load.py). Pages are computed in this package (pandas for the tables) and rendered by the jinja2
templates in bench/templates with autoescape on; the templates only loop and print. The
site is:

- index.html: one board per dataset and threat model, checkpoints ranked by worst-case
  robust accuracy (rows a McNemar test cannot tell apart share a rank), each worst case
  with its 95% interval and the passes it cost, the paper's reported number beside ours
  where a preset carries one (board.py), and under each board its checkpoints' accuracy
  against eps (board_plot.py);
- ck/<key>.html: one page per checkpoint with its config, provenance, every cell and
  its cost, its flags explained, small plots drawn as inline SVG (the budget view among
  them, budget_view.py), and its stored diagnostics (checkpoint_page.py,
  diagnostics.py); a key that is not a safe file name gets ck/id-<id>.html instead;
- compare-<dataset>.html: one page per dataset with a checkpoint, every diagnosed
  checkpoint of it side by side on the quantities of Shafahi et al.'s Table 1, with
  their Fig. 1 and Fig. 2 histograms (diagnostics.py);
- transfer.html: source-by-target grids, laid out like Summers & Dinneen's Table 2
  (transfer_page.py);
- attacks.html: what every attack, parameter and stored cell key means (attacks_page.py);
- site.css, copied from bench/templates, and the MARKER file that marks the folder as a site.

Everything is linked relatively and no asset is fetched from anywhere, so the site
works from file:// with no network. It is written to a temporary folder beside --out
and renamed into place, so a failure leaves the previous site as it was (publish.py).
The site never runs a model: what a plot needs was stored with its cell.

Modules: load reads the store, names says what things are called and where pages go,
records shows what a run leaves in a checkpoint's meta (admission checks, an outside
model's factory, flag numbers) without the folders of the machine that ran it, svg
draws, render writes the pages; nothing here imports this __init__.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.reporting.site import render
from bench.reporting.site.load import load_data
from bench.reporting.site.publish import MARKER, check_target, publish, staging
from bench.store.db import Store

__all__ = ["MARKER", "build_site"]


def build_site(store: Store, out_dir: str | os.PathLike) -> Path:
    """Render the whole site from the store into `out_dir`; returns the index page's path."""
    out = Path(out_dir).expanduser().absolute()
    check_target(out)
    tmp = staging(out)
    try:
        # Looked up on the module at call time, so a test can swap in a failing render.
        render.render(load_data(store), tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"
