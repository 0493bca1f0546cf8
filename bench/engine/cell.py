"""Crafting (`craft`) and running (`run_cell`) one cell: the path every stored number takes.

Attacks run in large batches with the model frozen (eval mode, no weight gradients), and,
where the caller asks (the Workspace sets it from the device), in NHWC memory, in bf16
autocast, on a copy with batch norm folded into the convolutions, or compiled
(bench.engine.fastmodel). On the CPU none of these is on by default, so fp32 results stay
what they were. Verdicts are always taken in fp32 (bench.engine.verdicts).

A set given as a tensor stays on the device for the whole call. Held images
(bench.core.images: ImageNet's evaluation set, uint8) move a batch at a time, and a plain
cell judges each crafted batch as it comes, keeping only the inputs that broke an image,
and writes even those as they come where it is given the checkpoint's folder
(bench.engine.judged): the set's float32 is never whole, nor is its adversarial copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.core import contract
from bench.core.cells import Cell
from bench.core.images import Images, as_tensor
from bench.core.kinds import CellKind
from bench.engine.budget import check_budget
from bench.engine.device import autocast, frozen, on_device, seeded_noise
from bench.engine.fast import PLAIN, FastPath
from bench.engine.fastmodel import FAITHFUL_BATCH, faithful, fast_model, last_word
from bench.engine.judged import judge_plain
from bench.engine.logits import histogram, logit_stats
from bench.engine.outcome import CellOutcome
from bench.engine.passes import PassCount, counting
from bench.engine.selection import nearest_images, probe_cell, subset_indices
from bench.engine.verdicts import EOT, in_top5, majority_correct, predict
from bench.engine.verified import verified
from bench.registry import ATTACKS
from bench.store.bits import pack_bits
from bench.store.examples import Breaks


def craft(
    model,
    cell: Cell,
    x: Images,
    y,
    *,
    device: str,
    batch_size: int,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    fast: FastPath = PLAIN,
    verdicts: list[contract.CompleteVerdicts | contract.CertifiedVerdicts] | None = None,
    count: PassCount | None = None,
) -> torch.Tensor:
    """Adversarial examples for (x, y) from one cell, in batches, on `device`, returned
    whole on the CPU: `crafted_batches`, joined."""
    batches = crafted_batches(
        model,
        cell,
        x,
        y,
        device=device,
        batch_size=batch_size,
        seed=seed,
        on_batch=on_batch,
        fast=fast,
        verdicts=verdicts,
        count=count,
    )
    return _joined(batches)


def _joined(batches: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Crafted batches as one tensor on the CPU."""
    return torch.cat([x_adv for _, x_adv in batches]).cpu().contiguous()


def crafted_batches(
    model,
    cell: Cell,
    x: Images,
    y,
    *,
    device: str,
    batch_size: int,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    fast: FastPath = PLAIN,
    verdicts: list[contract.CompleteVerdicts | contract.CertifiedVerdicts] | None = None,
    count: PassCount | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, adversarial examples of x[start : start + batch]) for one cell, batch after
    batch, on `device`.

    A tensor moves to the device once and comes back once; held images (bench.core.images)
    move a batch at a time, so a caller that keeps only what it needs of each batch never
    holds the set's float32. `fast` selects the fast path (bench.engine.fast); the default
    is the plain fp32 path. The fast model is used
    only where it computes the model's own logits and gradients (`faithful`); every batch gets the
    reported model's last word (`last_word`) and is held to the cell's threat model by
    the harness itself (bench.engine.budget), whatever the attack plugin did.

    Every attack returns a `Crafted` (bench.core.contract); a verifier cell's carries
    per-image verdicts, which are appended to `verdicts` batch by batch, and its batches
    are at most `config.batch_limit` images, so its progress moves while it verifies.
    `count` (bench.engine.passes), hooked on the model by the caller, is hooked on the
    fast copy too where the attack runs on one.
    """
    perturb = ATTACKS.get(cell.attack).fn
    seed = cell.seed if seed is None else seed
    verifier = cell.verifier
    if verifier:
        limit = contract.hooks(cell.config).batch_limit
        batch_size = batch_size if limit is None else min(batch_size, limit)
        # Verification is exact arithmetic on the model as it is: no fast copy.
        fast = PLAIN
    gen = torch.Generator(device=device).manual_seed(seed)
    xd = on_device(x, device, fast.channels_last) if isinstance(x, torch.Tensor) else x
    yd = y.to(device)
    with frozen(model), fast_model(model, fast) as net, contextlib.ExitStack() as hooks:
        with count.pause() if count is not None else contextlib.nullcontext():
            first = on_device(xd[:FAITHFUL_BATCH], device, fast.channels_last)
            if not faithful(model, net, first, yd[:FAITHFUL_BATCH]):
                net = model
        if count is not None and net is not model:  # a folded or compiled copy: its passes count too
            hooks.enter_context(counting(net, count=count))
        # Only a folded or compiled copy computes other bits than the model: the exact
        # rewrites change no bit of any logit (bench.engine.rewrite), so a break on them is one.
        approximate = net is not model and fast.copies_model
        for i in range(0, len(x), batch_size):
            xb, yb = on_device(xd[i : i + batch_size], device, fast.channels_last), yd[i : i + batch_size]
            with autocast(device, fast.precision):
                crafted = perturb(net, xb, yb, cell.config, generator=gen)
            if not isinstance(crafted, contract.Crafted):  # the plugin contract, held like the budget below
                raise RuntimeError(
                    f"attack {cell.attack!r} returned {type(crafted).__name__}; an attack's perturb "
                    "returns bench.plugin.Crafted(x_adv) (and a verifier its verdicts beside it)"
                )
            if verifier and verdicts is not None:
                if crafted.verdicts is None:
                    raise RuntimeError(f"verifier {cell.attack!r} returned no verdicts with its inputs")
                verdicts.append(crafted.verdicts)
            x_adv = crafted.x_adv.detach()
            if x_adv.shape != xb.shape:
                raise RuntimeError(f"attack {cell.attack!r} returned inputs of the wrong shape")
            x_adv = x_adv.float()
            if approximate:
                x_adv = last_word(model, net, perturb, cell, xb, yb, x_adv, gen)
            check_budget(cell, xb, x_adv)
            if on_batch:
                on_batch(len(xb))
            yield i, x_adv


def _no_images(cell: Cell, test_size: int, shape: tuple[int, ...], device: str, fast: FastPath) -> CellOutcome:
    """A cascade cell after the earlier ones broke every image, or one whose gate stayed shut
    (bench.core.gate): nothing to attack, no pass spent. Its accuracies are 0 of 0 images
    (its n says so)."""
    return CellOutcome(
        cell_key=cell.key,
        kind=cell.kind,
        attack=cell.attack,
        threat=cell.threat,
        params=dataclasses.asdict(cell.config),
        clean_acc=0.0,
        robust_acc=0.0,
        n=0,
        seconds=0.0,
        correct_bits=pack_bits(np.zeros(0, dtype=bool)),
        proven_bits=None,
        indices=[],
        test_size=test_size,
        forward_passes=0.0,
        backward_passes=0.0,
        extra={"warnings": [], "precision": fast.precision},
        device=device,
        top5_bits=None if cell.verifier or cell.votes > 1 else pack_bits(np.zeros(0, dtype=bool)),
        breaks=Breaks(torch.zeros(0, dtype=torch.long), torch.zeros(0, *shape)) if cell.kind.breaks else None,
    )


VERDICT_SEED = 0
"""The seed of the passes that judge a randomized model: one for every cell and transfer
(bench.engine.verdicts.majority_correct), so that every verdict of a checkpoint comes from
the same passes while each cell's attack draws from its own stream."""


def run_cell(
    model,
    cell: Cell,
    x,
    y,
    *,
    device: str,
    batch_size: int,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    fast: FastPath = PLAIN,
    images: np.ndarray | None = None,
    keep: Path | None = None,
) -> CellOutcome:
    """One cell on (x, y): crafted on the fast path, verified in fp32 (so a low-precision
    craft can only make the attack weaker, which `bench perf` measures, never the model
    look broken by rounding). `seed` seeds the attack (unset: the cell's own seed).
    `images` (test-set indices) runs it on those alone: a cascade's cell, on what the
    earlier cells left standing. `keep` (the checkpoint's folder) is where a plain cell
    writes the inputs that broke an image as it judges them (its `Breaks` say so); the
    others' breaks are returned in memory for the caller to write."""
    seed = cell.seed if seed is None else seed
    test_size = len(x)
    # A plain cell judges each crafted batch as it comes and keeps only the inputs that
    # broke an image (bench.engine.judged), so held images (ImageNet's) are never whole in
    # float32.
    streamed = cell.votes <= 1 and cell.eot <= 1 and not cell.verifier
    idx = subset_indices(len(x), cell.subset) if images is None else np.asarray(images, dtype=np.int64)
    if idx is not None and len(idx) == 0:
        return _no_images(cell, test_size, tuple(x.shape[1:]), device, fast)
    if idx is not None:
        x, y = x[idx], y[idx]
    target = model
    if cell.eot > 1:  # a randomized model: attacked through its mean logits, plainly
        target = EOT(model, cell.eot)
        fast = fast.on_the_model()
    if cell.view is not None:  # crafted through a view of the model, judged on the model below
        target = cell.view(target)
        fast = fast.on_the_model()
    # A randomized model draws its noise from torch's global generators: seeded from the
    # cell's seed for the craft (and restored), so its cells are reproducible too.
    noise = seeded_noise(device, seed) if cell.votes > 1 else contextlib.nullcontext()
    start = time.perf_counter()
    verdicts: list[contract.CompleteVerdicts | contract.CertifiedVerdicts] = []
    # Every warning of the cell's work (its craft, the later rounds of a randomized model,
    # its verdicts) is recorded with the cell, not printed to the caller.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Every pass of the model while the cell crafts (the EOT passes, the extra rounds, a
        # verifier's search), counted at the model itself; the verdicts below are not the
        # attack's cost and are taken outside.
        with noise, counting(model) as count:
            if cell.nearest:  # its selection passes (a forward pass, a probe's) count toward its cost
                at = x
                if cell.nearest.probe:
                    probe = probe_cell(cell)
                    at = craft(target, probe, x, y, device=device, batch_size=batch_size, fast=fast, count=count)
                pick = nearest_images(
                    model,
                    cell.nearest.share,
                    at,
                    y,
                    device=device,
                    batch_size=batch_size,
                    channels_last=fast.channels_last,
                )
                idx = (np.arange(test_size) if idx is None else idx)[pick]
                x, y = x[torch.from_numpy(pick)], y[torch.from_numpy(pick)]
            if not streamed:  # the rounds of a randomized model and a verifier's verdicts read x_adv whole
                x = as_tensor(x)
            batches = crafted_batches(
                target,
                cell,
                x,
                y,
                device=device,
                batch_size=batch_size,
                seed=seed,
                on_batch=on_batch,
                fast=fast,
                verdicts=verdicts,
                count=count,
            )
            if streamed:
                judged = judge_plain(
                    model,
                    cell,
                    batches,
                    x,
                    y,
                    device=device,
                    channels_last=fast.channels_last,
                    count=count,
                    idx=idx,
                    keep=keep,
                )
                clean_logits, adv_logits = judged.clean_logits, judged.adv_logits
            else:
                x_adv = _joined(batches)
        seconds = time.perf_counter() - start
        if streamed:
            seconds -= judged.seconds
        else:
            clean_logits = predict(model, x, device=device, batch_size=batch_size, channels_last=fast.channels_last)
            adv_logits = predict(model, x_adv, device=device, batch_size=batch_size, channels_last=fast.channels_last)
        clean = clean_logits.argmax(1) == y
        # A sample the model already gets wrong is not robust, whatever the attack returned.
        robust = (adv_logits.argmax(1) == y) & clean
        if cell.votes > 1:  # a randomized model: each verdict is the majority of cell.votes passes
            clean = majority_correct(model, x, y, cell.votes, device=device, batch_size=batch_size, seed=VERDICT_SEED)
            robust = (
                majority_correct(model, x_adv, y, cell.votes, device=device, batch_size=batch_size, seed=VERDICT_SEED)
                & clean
            )
            # An attack stops at the first iterate its noisy view misclassifies, right at the
            # boundary, where the verdict is a coin flip; so what the verdict leaves standing
            # is attacked again (the craft with a fresh seed), `cell.rounds` times in all.
            for again_round in range(1, cell.rounds):
                left = robust.nonzero().squeeze(1)
                if len(left) == 0:
                    break
                with seeded_noise(device, seed + again_round), counting(model, count=count):
                    again = craft(
                        target,
                        cell,
                        x[left],
                        y[left],
                        device=device,
                        batch_size=batch_size,
                        seed=seed + again_round,
                        fast=fast,
                        count=count,
                    )
                x_adv[left] = again
                # Judged on the whole set with the verdict seed: every verdict of the cell
                # comes from the same passes (the noise a pass draws depends on a sample's
                # place in the batch), and what is broken stays broken.
                robust &= majority_correct(
                    model, x_adv, y, cell.votes, device=device, batch_size=batch_size, seed=VERDICT_SEED
                )
            seconds = time.perf_counter() - start
    messages = sorted({str(w.message) for w in caught})
    extra: dict[str, Any] = {
        "logit_hist": histogram(clean_logits, adv_logits),
        "adv_logit_stats": logit_stats(adv_logits, y),
        "warnings": messages,
        "precision": fast.precision,
    }
    proven = None
    if verdicts:  # a verifier cell: its per-image verdicts, held to what the model does
        robust, proven, verdict_extra = verified(cell.kind, verdicts, clean, robust)
        extra.update(verdict_extra)
    # A complete verifier's figure is what it proved: an unknown image is not robust.
    figure = proven if proven is not None and cell.kind is CellKind.VERIFY else robust
    # Top-5 beside top-1 (Kannan et al.'s tables), where the verdict is one pass's logits.
    top5 = None
    if cell.votes <= 1 and not verdicts:
        clean5 = in_top5(clean_logits, y)
        top5 = in_top5(adv_logits, y) & clean5
        extra["clean_top5"] = float(clean5.float().mean()) if len(y) else 0.0
    # The inputs that broke what the cell broke (a verifier's counterexamples); an image the
    # model already gets wrong is its own example. A certified bound breaks nothing.
    breaks = None
    if streamed:
        breaks = judged.breaks
    elif cell.kind.breaks:
        broke = (clean & ~robust).nonzero().squeeze(1)
        at = broke if idx is None else torch.as_tensor(idx, dtype=torch.long)[broke]
        breaks = Breaks(at, x_adv[broke].detach().float().cpu())
    return CellOutcome(
        cell_key=cell.key,
        kind=cell.kind,
        attack=cell.attack,
        threat=cell.threat,
        params=dataclasses.asdict(cell.config),
        clean_acc=float(clean.float().mean()),
        robust_acc=float(figure.float().mean()),
        n=len(y),
        seconds=seconds,
        correct_bits=pack_bits(robust.numpy()),
        proven_bits=None if proven is None else pack_bits(proven.numpy()),
        indices=None if idx is None else idx.tolist(),
        test_size=test_size,
        forward_passes=count.forward / len(y) if len(y) else 0.0,
        backward_passes=count.backward / len(y) if len(y) else 0.0,
        extra=extra,
        device=device,
        top5_bits=None if top5 is None else pack_bits(top5.numpy()),
        breaks=breaks,
    )
