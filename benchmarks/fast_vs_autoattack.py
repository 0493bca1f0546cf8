"""The `fast` cascade against AutoAttack on every honest checkpoint of a zoo: is its worst
case at or below AutoAttack's, within AutoAttack's own seed spread, at a tenth of its
forward passes or less?

    bench run --dataset digits --defense all --matrix full --results /tmp/res   # AutoAttack's cell among them
    bench run --dataset digits --defense all --matrix fast --results /tmp/res
    python benchmarks/fast_vs_autoattack.py --results /tmp/res --dataset digits

Per checkpoint it reads from the store AutoAttack's cell (the standard version on the
checkpoint's own threat model, whole test set: its robust accuracy and forward passes per
image) and the cascade's cells (their per-sample AND and their passes, as
benchmarks/cost.py reads them), then runs AutoAttack's standard version again at `--seeds`
seeds the matrix never draws (benchmarks/worst_vs_autoattack.py) to measure its
seed-to-seed spread in samples on that checkpoint. It prints one row per checkpoint:

- AutoAttack's robust accuracy (the matrix's cell) and its forward passes per image;
- the spread: max - min in samples over the matrix's run and the independent ones;
- `fast`'s worst case and forward passes per image (its own cells'; where it escalated,
  the full matrix's come on top and the row says so), and AutoAttack / `fast`;
- `at or below`: `fast`'s surviving samples at most AutoAttack's plus the spread;
- `tenth`: the ratio at least 10;
- whether `fast` escalated, and why;
- what AutoAttack's own checks said on its cell: its Square breaking images its white-box
  attacks left is the package's own sign of masking, which `fast`'s short Square cannot see.

Exit status 1 if an honest checkpoint misses either target. A checkpoint whose cascade
escalated is not honest by the bench's own judgement: its row is printed and left out of
the verdict (benchmarks/fast_zoo.py holds those to the truth instead). The store is only read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost import CASCADE_KEY, checkpoint_costs, per_test_image, total
from worst_vs_autoattack import autoattack_runs, independent_seeds

from bench.core.data import get_spec, load_dataset
from bench.core.matrix import load_matrix
from bench.run.training import load_model
from bench.store.db import Store

TENTH = 10.0
"""AutoAttack's forward passes over `fast`'s must be at least this."""


SQUARE_CHECK = re.compile(r"Square Attack has decreased the robust accuracy of ([0-9.]+)%")
"""pyautoattack's words when its Square broke images its white-box attacks left (it warns
from 0.2 points on): the package's sign of masking. It gives no code for its warnings, so
its sentence is matched."""


def own_checks(row) -> str:
    """What AutoAttack's own checks said on its cell: `square -P pts` for its Square check,
    a count of any other warning, or `none`."""
    said = row.warnings
    square = [m.group(1) for m in map(SQUARE_CHECK.search, said) if m]
    words = [f"square -{square[0]} pts"] if square else []
    if len(said) > len(square):
        words.append(f"{len(said) - len(square)} other")
    return ", ".join(words) or "none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--matrix", default="fast", help="the cascade matrix whose rows are read (default fast)")
    ap.add_argument("--seeds", type=int, default=3, help="independent AutoAttack seeds for the spread (default 3)")
    ap.add_argument("--data-root", default=None, help="folder of the dataset's files, where it is not embedded")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="a JSON file of the independent AutoAttack runs' robust counts by checkpoint and seed, "
        "read where it has them and written with the new ones (they do not depend on the cascade)",
    )
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    torch.set_num_threads(1)
    store = Store.for_results(Path(args.results))
    spec = get_spec(args.dataset)
    x, y = load_dataset(args.dataset, "test", args.data_root)
    seeds = independent_seeds(args.seeds)
    matrix = load_matrix(args.matrix)
    marker = f"{CASCADE_KEY}{matrix.name}"  # a TOML file's cells carry its name, not its path
    # Only the cascade's cells as the matrix has them today: a store may hold an earlier
    # version's beside them, under the same marker.
    keys = {c.key for c in matrix.cells(spec.threat)}
    costs = [c for c in checkpoint_costs(store, args.dataset, marker, keys) if c.fast and c.autoattack]
    if not costs:
        sys.exit(f"no checkpoint of {args.dataset} in {args.results} has both AutoAttack's cell and `{marker}` cells")
    print(
        f"{args.dataset}: {len(x)} test images; AutoAttack standard at the matrix's seed and at seeds "
        f"{', '.join(map(str, seeds))}; cascade cells keyed `{marker}`\n"
    )
    head = [
        "defense",
        "AutoAttack %",
        "AutoAttack fwd/img",
        "AA spread (samples)",
        "fast %",
        "fast fwd/img",
        "AA / fast, fwd",
        "at or below",
        "tenth",
        "escalated",
        "AA's own checks",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    misses = 0
    for c in costs:
        model = load_model(next(ck for ck in store.checkpoints(dataset=args.dataset) if ck.key == c.key), "cpu").eval()
        aa_n = round(c.autoattack.robust_acc * c.test_size)
        known = cache.get(c.key, {})
        missing = tuple(s for s in seeds if str(s) not in known)
        if missing:
            for s, (_, bits, _) in zip(
                missing, autoattack_runs(model, x, y, spec.threat, missing, plus=False), strict=True
            ):
                known[str(s)] = int(bits.sum())
            cache[c.key] = known
            if args.cache:
                args.cache.write_text(json.dumps(cache, indent=1, sort_keys=True))
        runs = [known[str(s)] for s in seeds]
        spread = max([aa_n, *runs]) - min([aa_n, *runs])
        fast_n = int(c.fast_worst.bits.sum())
        aa_fwd = per_test_image(c.autoattack, c.test_size)[0]
        fast_fwd = total(c.fast, c.test_size)[0]
        ratio = aa_fwd / fast_fwd
        at_or_below = fast_n <= aa_n + spread
        tenth = ratio >= TENTH
        honest = not c.escalated.startswith("yes")
        misses += honest and not (at_or_below and tenth)
        print(
            f"| {c.defense} | {100 * aa_n / c.test_size:.2f} | {aa_fwd:,.1f} | {spread} ({min(runs)}–{max(runs)} "
            f"at seeds {','.join(map(str, seeds))}) | {100 * fast_n / c.test_size:.2f} | {fast_fwd:,.1f} "
            f"| {ratio:.1f}x | {'yes' if at_or_below else f'NO (+{fast_n - aa_n} samples)'} "
            f"| {'yes' if tenth else 'NO'} | {c.escalated} | {own_checks(c.autoattack)} |",
            flush=True,
        )
    print(f"\n{misses} honest checkpoint(s) miss a target (at or below AutoAttack within its spread; a tenth)")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
