"""index.html's boards: one per dataset and threat model, ranked by worst-case robust accuracy."""

from __future__ import annotations

import math
from collections import defaultdict

from bench.core.stats import SIGNIFICANCE, mcnemar
from bench.reporting.format import missing, passes, pct
from bench.reporting.site.board_plot import eps_plot
from bench.reporting.site.load import SiteData
from bench.reporting.site.names import (
    SURROGATE_TEXT,
    checkpoint_name,
    many_classes,
    outside_name,
    page_path,
)
from bench.store.bracket import Bracket
from bench.store.evidence import WorstCase

# Board columns after clean accuracy: (column id, header, cell label). The label is what
# `cell_label` calls a cell, and also the key of the paper's number in a preset
# (meta["paper"]); None is computed by column: `pgd_longest` is the longest PGD run,
# whatever its step count, and `transfer` the strongest stored transfer attack.
BOARD_COLUMNS = [
    ("fgsm", "FGSM", "fgsm"),
    ("pgd20", "PGD\u201120", "pgd20"),  # non-breaking hyphens: a header never splits there
    ("pgd_longest", "PGD longest", None),
    ("cw20", "CW\u201120", "cw20"),
    ("apgd_t", "APGD\u2011T", "apgd_t"),  # the strongest single white-box cell
    ("spsa", "SPSA", "spsa"),
    ("square", "Square", "square"),
    ("transfer", "Transfer", None),
    ("autoattack", "AutoAttack", "autoattack"),
]


def boards(data: SiteData) -> list[dict]:
    """One board per dataset and threat model, rows ranked by worst-case robust accuracy.

    A checkpoint's own threat model always has a board; another threat model (an L2
    budget, say) gets one where some cell of it falls in a board column.
    """
    frame = data.frame
    full = frame[~frame["subset"]]
    # The strongest (lowest) number per checkpoint, threat and column label.
    table = frame.groupby(["checkpoint_id", "threat", "label"])["robust_acc"].min().to_dict()
    subset_n = frame[frame["subset"]].groupby(["checkpoint_id", "threat", "label"])["n"].min().to_dict()
    pgd = full[full["pgd"] & (full["loss"] == "xent") & (full["restarts"] == 1)]
    pgd = pgd[pgd["label"].str.fullmatch(r"pgd\d+(_cos)?")]  # untargeted, on the model's own gradient
    longest = pgd.groupby(["checkpoint_id", "threat"])["steps"].max().to_dict()
    # The longest run's column label: pgd1000_cos where the long runs use the cosine schedule.
    longest_label = {
        (c, t, int(steps)): label
        for c, t, steps, label in pgd[["checkpoint_id", "threat", "steps", "label"]].itertuples(index=False)
    }
    column_labels = {label for _, _, label in BOARD_COLUMNS if label}
    by_id = {ck.id: ck for ck in data.checkpoints}

    members: dict[tuple[str, str], set[int]] = defaultdict(set)
    for ck in data.checkpoints:
        members[(ck.dataset, ck.threat)].add(ck.id)
    for cid, threat in {*longest, *((c, t) for c, t, label in table if label in column_labels)}:
        members[(by_id[cid].dataset, threat)].add(cid)

    def value(cid, threat, label):
        v = table.get((cid, threat, label))
        return None if v is None or math.isnan(v) else float(v)

    out = []
    own = {(ck.dataset, ck.threat) for ck in data.checkpoints}
    for dataset, threat in sorted(members, key=lambda k: (k[0], k not in own, k[1])):
        rows = []
        for cid in members[(dataset, threat)]:
            ck = by_id[cid]
            meta = data.evidence[cid].meta
            # The paper's numbers are for the threat model they were measured at: the
            # checkpoint's own unless its preset names another radius.
            paper = meta.paper if threat == (meta.paper_threat or ck.threat) else {}
            ev = data.evidence[cid]
            wc = ev.worst_case(threat)
            cols = [_cell("clean", meta.clean_acc, paper.get("clean"))]
            for col, _, label in BOARD_COLUMNS:
                note = ""
                if col == "transfer":
                    cols.append(_transfer(cid, threat, data, by_id))
                    continue
                if label is None:
                    steps = longest.get((cid, threat))
                    label = (
                        longest_label.get((cid, threat, int(steps)))
                        if steps is not None and not math.isnan(steps)
                        else None
                    )
                    note = f"{int(steps)} steps" if label else ""
                v = value(cid, threat, label) if label else None
                n = subset_n.get((cid, threat, label)) if label else None
                if n is not None and v is not None:
                    note = f"on {int(n)} images"
                cols.append(_cell(col, v, paper.get(label) if label else None, note))
            note = f"{len(wc.cells)} cell{'' if len(wc.cells) == 1 else 's'}" if wc else ""
            # Coverage of this threat model's cells (the run layer records each expected
            # cell's threat model: the L2 board's worst case is complete like the L-inf one).
            missing = list(wc.missing) if wc else []
            if missing:
                note += f" · incomplete: {len(missing)} missing"
            b = ev.bracket_of(threat) if wc else None
            if b and b.gap is not None:
                note += f" · gap {b.gap:.1f} pts" + (
                    f" · attacks missed {b.attacks_missed}" if b.attacks_missed else ""
                )
            cols.append(_floor(b, ev.not_verifiable if threat == ck.threat else None))
            title = ""
            if wc:
                low, high = wc.interval
                note += f" · 95% {pct(low)}–{pct(high)}"
                title = f"95% exact binomial interval on {wc.n} images: {pct(low)} to {pct(high)}"
            cols.append(_cell("worst", wc.robust_acc if wc else None, None, note, title))
            if many_classes(dataset):  # top-5 beside top-1, as Kannan et al.'s ImageNet tables
                cols.append(_cell("worst_top5", wc.top5_acc if wc else None, None))
            rows.append(
                {
                    "key": ck.key,
                    "href": page_path(ck),
                    "defense": ck.defense,
                    "preset": ck.preset or "",
                    "seed": ck.seed,
                    "short": ck.key[:8],
                    "arch": ck.arch,
                    "overrides": data.overrides.get(cid, ""),
                    "outside": outside_name(meta.outside),
                    "surrogate": meta.surrogate,
                    "id": cid,
                    "cols": cols,
                    "worst": wc.robust_acc if wc else None,
                    "bits": wc.bits if wc else None,
                    "missing": missing,
                    "flags": [
                        {"name": f.name, "href": f"{page_path(ck)}#flag-{f.name}"}
                        for f in data.flags[cid]
                        if f.threat(ck.threat) == threat
                    ],
                    "passes": _passes(wc),
                    "cost": {
                        "value": repr(float(ck.train_seconds)),
                        "text": f"{ck.train_seconds:,.1f} s",
                        "device": ck.device,
                    },
                }
            )
        bracketed = any(c["col"] == "certified" and (c["value"] or c.get("withheld")) for r in rows for c in r["cols"])
        if not bracketed:  # no verifier cell on this board: no column of blanks
            for r in rows:
                r["cols"] = [c for c in r["cols"] if c["col"] != "certified"]
        rows.sort(key=lambda r: (r["worst"] is None, -(r["worst"] or 0.0), r["defense"], r["key"]))
        rank_rows(rows)
        out.append(
            {
                "id": f"board-{dataset}-{threat}",
                "dataset": dataset,
                "threat": threat,
                "own": (dataset, threat) in own,
                "rows": rows,
                "plot": eps_plot(threat, rows, data),
                "surrogate": SURROGATE_TEXT if any(r["surrogate"] for r in rows) else "",
                "columns": [("clean", "Clean")]
                + [(c, h) for c, h, _ in BOARD_COLUMNS]
                + ([("certified", "Certified")] if bracketed else [])
                + [("worst", "Worst case")]
                + ([("worst_top5", "Worst top\u20115")] if many_classes(dataset) else []),
            }
        )
    return out


def rank_rows(rows: list[dict]) -> None:
    """Ranks, in the rows' order, with ties: a row whose worst-case bits do not differ at 5%
    (exact McNemar on the same test images) from the first row of the rank above shares
    that rank, so 31.4 and 30.3 on 360 images read as one rank. Each row is tested against
    its rank's first row, not merely the row above: adjacent tests would chain, and four
    rows spanning four points, each close to its neighbour, would all read as first."""
    leader: dict | None = None
    for i, r in enumerate(rows):
        bits = r.pop("bits", None)
        r["_bits"], r["tied"] = bits, None
        other = leader.get("_bits") if leader is not None else None
        if leader is not None and bits is not None and other is not None and len(bits) == len(other):
            p = mcnemar(other, bits)
            if p >= SIGNIFICANCE:
                r["tied"] = {"p": f"{p:.2g}", "with": leader["short"]}
        if r["tied"]:
            r["rank"] = leader["rank"]
        else:
            r["rank"], leader = i + 1, r
    for r in rows:
        r.pop("_bits", None)


def _transfer(cid: int, threat: str, data: SiteData, by_id: dict) -> dict:
    """The lowest accuracy under a transfer attack of the threat model (the strongest one),
    its surrogate named; a checkpoint attacked with its own examples is white-box, not counted."""
    hits = [t for t in data.incoming[cid] if t.threat == threat and t.source_id != cid]
    if not hits:
        return _cell("transfer", None, None)
    t = min(hits, key=lambda t: (t.robust_acc, t.source_id, t.cell_key))
    source = by_id.get(t.source_id)
    # The note names the surrogate by its defense, to keep the column narrow; the title in full.
    title = (
        f"crafted on {checkpoint_name(source, data.overrides)} [{source.key[:8]}] with {t.cell_key}"
        if source
        else f"crafted on checkpoint {t.source_id} with {t.cell_key}"
    )
    note = f"from {source.defense if source else f'checkpoint {t.source_id}'}"
    return _cell("transfer", t.robust_acc, None, note + ("" if t.indices is None else f" on {t.n} images"), title)


def _passes(wc: WorstCase | None) -> dict:
    """What the worst case cost: the model's forward passes per test image over the cells it
    ANDs (the sort value), the backward passes in the title; a dash where a cell was stored
    before passes were counted."""
    forward = wc.forward_passes if wc else None
    backward = wc.backward_passes if wc else None
    if wc is None or forward is None or backward is None:
        title = "not counted: a cell of the worst case was stored before passes were counted" if wc else ""
        return {"value": "", "text": passes(None), "title": title}
    cells = f"{len(wc.cells)} cell{'' if len(wc.cells) == 1 else 's'}"
    title = (
        f"{forward:,.1f} forward and {backward:,.1f} backward passes per test image, over the {cells} of the worst case"
    )
    return {"value": repr(float(forward)), "text": passes(forward), "title": title}


def _floor(b: Bracket | None, not_verifiable: str | None) -> dict:
    """The certified floor beside the worst case: the exact figure where the verifier
    decided every image, else the floor with the images still unknown."""
    if not b:
        return _cell("certified", None, None, "not verifiable" if not_verifiable else "", not_verifiable or "")
    if b.withheld:
        return {
            **_cell(
                "certified",
                None,
                None,
                f"withheld: {b.withheld}",
                "a verifier and an attack (or two verifiers) contradict each other: no figure is shown",
            ),
            "withheld": True,
        }
    if b.exact is not None:
        return _cell("certified", b.exact, None, "exact", "every image decided by the complete verifier")
    note = f"{b.unknown} unknown" if b.unknown else ""
    return _cell("certified", b.certified, None, note, "a lower bound: images proven robust")


def _cell(col: str, value: float | None, paper: float | None, note: str = "", title: str = "") -> dict:
    # No paper number prints no note at all, not a dash (the template tests for the text).
    return {
        "col": col,
        "value": "" if value is None else repr(float(value)),
        "text": pct(value),
        "paper": "" if missing(paper) else pct(paper),
        "note": note,
        "title": title,
    }
