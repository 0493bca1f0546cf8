"""Which stored checkpoints a command's NAME selects: `all`, a defense name (every
checkpoint of it), or a checkpoint key prefix. One rule for every command."""

from __future__ import annotations

from bench.errors import BenchError
from bench.store.db import Checkpoint, Store


def select_checkpoints(store: Store, name: str, dataset: str | None, *, option: str = "--defense") -> list[Checkpoint]:
    """The checkpoints `name` selects on `dataset` (None: every dataset), or a one-line
    error naming the option it came from."""
    cks = store.checkpoints(dataset=dataset)
    if name == "all":
        chosen = cks
    else:
        chosen = [c for c in cks if c.defense == name] or [c for c in cks if name and c.key.startswith(name)]
    if not chosen:
        where = f" on {dataset}" if dataset else ""
        train = f"bench run --defense {name if name != 'all' else 'NAME'}" + (
            f" --dataset {dataset}" if dataset else ""
        )
        raise BenchError(
            f"no stored checkpoint{where} matches {option} {name!r} (a defense name, a checkpoint "
            f"key or all): train one with `{train}`, or see `bench results`"
        )
    return chosen
