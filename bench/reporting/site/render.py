"""Rendering every page of the site with the jinja2 templates in bench/templates.

What a page shows is computed in its own module (board, checkpoint_page, transfer_page,
attacks_page, diagnostics; pandas for the tables); the templates, with autoescape on,
only loop and print.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from bench.core.provenance import package_version
from bench.reporting.site.attacks_page import attacks
from bench.reporting.site.board import boards
from bench.reporting.site.checkpoint_page import checkpoint_page, preset_text
from bench.reporting.site.diagnostics import compare_page
from bench.reporting.site.load import SiteData
from bench.reporting.site.names import compare_path, page_path
from bench.reporting.site.publish import MARKER, write
from bench.reporting.site.transfer_page import transfer_grids
from bench.science.flags import FLAG_TEXT

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
"""bench/templates, where PackageLoader("bench", "templates") finds the pages and site.css is copied from."""


def environment() -> Environment:
    return Environment(
        loader=PackageLoader("bench", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(data: SiteData, out: Path) -> None:
    """Write every page of the site into the (new, empty) folder `out`."""
    env = environment()
    built = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    common = {"built": built, "version": package_version()}
    by_id = {ck.id: ck for ck in data.checkpoints}
    (out / MARKER).write_text("written by `bench site`; this folder is replaced on every build\n")
    shutil.copyfile(TEMPLATES / "site.css", out / "site.css")
    write(
        out / "index.html",
        env.get_template("index.html").render(
            root="",
            title="Leaderboard",
            boards=boards(data),
            checkpoints=len(data.checkpoints),
            flag_text=sorted(FLAG_TEXT.items()),
            columns=_column_help(),
            **common,
        ),
    )
    write(
        out / "transfer.html",
        env.get_template("transfer.html").render(root="", title="Transfer", grids=transfer_grids(data), **common),
    )
    write(
        out / "attacks.html",
        env.get_template("attacks.html").render(
            root="", title="Attacks", attacks=attacks(data), columns=_column_help(), **common
        ),
    )
    _render_compare(data, out, env, common)
    page = env.get_template("checkpoint.html")
    presets = preset_text()
    (out / "ck").mkdir()
    for ck in data.checkpoints:
        write(out / page_path(ck), page.render(**checkpoint_page(ck, data, by_id, "../", presets), **common))


def _render_compare(data: SiteData, out: Path, env: Environment, common: dict) -> None:
    """compare-<dataset>.html for every dataset with a checkpoint (bench.reporting.site.diagnostics)."""
    template = env.get_template("compare.html")
    for dataset in dict.fromkeys(ck.dataset for ck in data.checkpoints):
        cks = [ck for ck in data.checkpoints if ck.dataset == dataset]
        write(
            out / compare_path(dataset),
            template.render(
                root="",
                title=f"Why it is robust: {dataset}",
                **compare_page(dataset, cks, data.diagnostics, data.cells, ""),
                **common,
            ),
        )


def _column_help() -> list[tuple[str, str]]:
    return [
        ("Clean", "accuracy on the unperturbed test set, measured when the checkpoint was stored"),
        ("FGSM", "one signed-gradient step of the full budget (label fgsm)"),
        ("PGD-20", "20 steps of PGD in the board's norm on cross-entropy, one random start (label pgd20)"),
        ("PGD longest", "the single-start cross-entropy PGD cell with the most steps (label pgdN)"),
        ("CW-20", "20 steps of PGD on the Carlini-Wagner margin (label cw20)"),
        ("SPSA", "the gradient-free SPSA attack, on the fixed subset of test images it ran on"),
        ("Square", "the query-based Square attack, which needs no gradients (label square)"),
        (
            "Transfer",
            (
                "the lowest accuracy under a black-box transfer attack, i.e. the strongest one: "
                "adversarial examples crafted on another checkpoint (the surrogate named under the "
                "number), then evaluated on this one; all of them are on the transfer page"
            ),
        ),
        ("AutoAttack", "the AutoAttack ensemble"),
        (
            "Worst case",
            "a sample counts as robust only if every cell of the threat model failed on it, "
            "transfer cells included: the per-sample AND over all cells",
        ),
    ]
