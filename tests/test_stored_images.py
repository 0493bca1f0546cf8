"""Crafted sets kept on disk: a safetensors file written a batch at a time is the file
safetensors itself reads, a failed write leaves nothing behind, a stored set reads like
the tensor it holds, and a transfer's examples and breaks pass through memory a batch at
a time, with the very bits the whole-set path gave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.core.cells import make_cell
from bench.core.data import get_spec
from bench.core.images import Picked, StoredImages
from bench.engine.cell import craft, run_cell
from bench.engine.passes import counting
from bench.run.jobs import EXAMPLES, CraftJob, read_cost
from bench.store.examples import Breaks, broken_by, examples_path, read_examples, write_examples
from bench.store.streamed import HEADER_RESERVE, Streamed, write_streamed

THREAT = get_spec("digits").threat


class Counted(StoredImages):
    """A stored set that remembers the most rows one read returned."""

    def __init__(self, path, name: str):
        super().__init__(path, name)
        self.most = 0

    def __getitem__(self, index):
        rows = super().__getitem__(index)
        self.most = max(self.most, len(rows) if rows.dim() == 4 else 1)
        return rows


def _in_batches(t: torch.Tensor, size: int):
    return (t[i : i + size] for i in range(0, len(t), size))


def test_a_streamed_file_is_read_by_safetensors_as_the_tensors_written(tmp_path):
    x = torch.rand(37, 1, 8, 8)
    idx = torch.arange(37, dtype=torch.int64) * 3
    path = tmp_path / "s.safetensors"
    write_streamed(
        path,
        [Streamed("idx", torch.int64, (37,), [idx]), Streamed("x", torch.float32, (37, 1, 8, 8), _in_batches(x, 10))],
        lambda: {"cell": "pgd:steps=3", "forward_passes": "4.0"},
    )
    loaded = load_file(str(path))
    assert torch.equal(loaded["x"], x) and torch.equal(loaded["idx"], idx)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"cell": "pgd:steps=3", "forward_passes": "4.0"}
    # The data after the header is byte for byte what safetensors' own writer puts there.
    save_file({"idx": idx, "x": x}, str(tmp_path / "ref.safetensors"))
    ours, ref = path.read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    n_ours, n_ref = int.from_bytes(ours[:8], "little"), int.from_bytes(ref[:8], "little")
    assert ours[8 + n_ours :] == ref[8 + n_ref :]
    empty = write_streamed(tmp_path / "e.safetensors", [Streamed("x", torch.float32, (0, 3), iter(()))], dict)
    assert load_file(str(empty))["x"].shape == (0, 3)


def test_a_failed_stream_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"x": torch.ones(2, 2)}, str(path))
    before = path.read_bytes()

    def failing():
        yield torch.zeros(1, 2)
        raise RuntimeError("the attack failed mid-set")

    with pytest.raises(RuntimeError, match="mid-set"):
        write_streamed(path, [Streamed("x", torch.float32, (2, 2), failing())], dict)
    with pytest.raises(ValueError, match="gave 1 rows of 2"):
        write_streamed(path, [Streamed("x", torch.float32, (2, 2), [torch.zeros(1, 2)])], dict)
    with pytest.raises(ValueError, match="metadata"):
        write_streamed(path, [Streamed("x", torch.float32, (1, 2), [torch.zeros(1, 2)])], lambda: {"m": "." * 5000})
    assert HEADER_RESERVE < 5000
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_stored_images_read_like_the_tensor_they_hold(tmp_path):
    x = torch.rand(300, 1, 4, 4)
    save_file({EXAMPLES: x}, str(tmp_path / "x.safetensors"))
    stored = StoredImages(tmp_path / "x.safetensors", EXAMPLES)
    assert len(stored) == 300 and stored.shape == x.shape
    far = torch.tensor([299, 0, 150, 7, 0])  # unsorted, repeated, and further apart than one read
    near = torch.arange(40, 100).flip(0)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[[3, 200]] = True
    for index in (slice(3, 40), slice(None), slice(10, 50, 7), slice(50, 10), far, near, np.array([5, -1]), mask, 9):
        assert torch.equal(stored[index], x[index]), index
    assert stored[torch.tensor([], dtype=torch.long)].shape == (0, 1, 4, 4)
    assert torch.equal(Picked(stored, far)[1:4], x[far][1:4]) and Picked(stored, far).shape == (5, 1, 4, 4)
    with pytest.raises(IndexError):
        stored[torch.tensor([300])]
    with pytest.raises(ValueError, match="no tensor 'other'"):
        StoredImages(tmp_path / "x.safetensors", "other")


def test_a_craft_job_streams_the_bits_craft_gives_into_its_file(natural_model, digits_test, tmp_path):
    x, y = digits_test
    cell = make_cell("pgd", {"steps": 5}, THREAT)
    with counting(natural_model) as count:
        whole = craft(natural_model, cell, x, y, device="cpu", batch_size=50, count=count)
    job = CraftJob(natural_model, cell, x, y, "cpu", 50, label="src", into=tmp_path / "c.safetensors")
    examples = job.run()
    assert isinstance(examples.x_adv, StoredImages) and torch.equal(examples.x_adv[:], whole)
    assert examples.passes.forward == count.forward / len(x) and examples.passes.backward == count.backward / len(x)
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["cell"] == cell.key and meta["source"] == "src" and read_cost(meta) == examples.passes
    assert read_cost({}) is None


def test_breaks_of_stored_examples_are_written_a_batch_at_a_time(tmp_path):
    x = torch.rand(300, 1, 4, 4)
    save_file({EXAMPLES: x}, str(tmp_path / "x.safetensors"))
    stored = Counted(tmp_path / "x.safetensors", EXAMPLES)
    clean = torch.ones(300, dtype=torch.bool)
    clean[::7] = False
    correct = torch.rand(300, generator=torch.Generator().manual_seed(0)) > 0.2
    breaks = broken_by(correct, clean, stored)
    assert stored.most == 0  # picking the breaks reads nothing
    write_examples(tmp_path / "ck", "transfer[src]:pgd", "linf-0.2", breaks)
    assert 0 < stored.most <= 2 * StoredImages.READ_ROWS
    kept = read_examples(tmp_path / "ck", "transfer[src]:pgd")
    at = (clean & ~correct).nonzero().squeeze(1)
    assert torch.equal(kept.indices, at) and torch.equal(kept.inputs, x[at])
    # A cell's breaks in memory are written as before.
    write_examples(tmp_path / "ck", "fgsm", "linf-0.2", Breaks(at, x[at]))
    assert torch.equal(read_examples(tmp_path / "ck", "fgsm").inputs, x[at])


def test_a_plain_cell_writes_its_breaks_as_it_judges_them(natural_model, digits_test, tmp_path):
    """Given the checkpoint's folder, a plain cell's breaks go to their file batch by batch
    and come back as that file's rows: the same bits, indices and inputs as in memory, for
    the whole set and for a cascade's images alike."""
    x, y = digits_test
    cell = make_cell("pgd", {"steps": 5}, THREAT)
    for images, folder in ((None, tmp_path / "all"), (np.arange(0, len(x), 3), tmp_path / "some")):
        memory = run_cell(natural_model, cell, x, y, device="cpu", batch_size=50, images=images)
        written = run_cell(natural_model, cell, x, y, device="cpu", batch_size=50, images=images, keep=folder)
        assert memory.breaks.kept is None and written.breaks.kept == examples_path(folder, cell.key)
        assert isinstance(written.breaks.inputs, StoredImages)
        assert written.correct_bits == memory.correct_bits and written.top5_bits == memory.top5_bits
        kept = read_examples(folder, cell.key)
        assert len(kept.indices) > 10
        assert torch.equal(kept.indices, memory.breaks.indices) and torch.equal(kept.inputs, memory.breaks.inputs)
        assert torch.equal(written.breaks.indices, kept.indices)
        if images is not None:
            assert set(kept.indices.tolist()) <= set(images.tolist())
    # A cell whose kind breaks nothing writes nothing.
    bound = make_cell("certify", {"method": "ibp"}, THREAT)
    assert run_cell(natural_model, bound, x, y, device="cpu", batch_size=50, keep=tmp_path / "ibp").breaks is None
    assert not (tmp_path / "ibp").exists()
