"""ImageNet read from disk: a tiny folder of real JPEG files in the ILSVRC-2012 layout,
run end to end through the installed script with a small architecture, the quick matrix,
a targeted cell (Kannan et al.'s protocol: toward a seeded random class per image) and
top-5; the evaluation set's ids recorded with the checkpoint; the layout's errors in one
line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_bench
from PIL import Image

from bench import load_checkpoint
from bench.core.data import load_dataset
from bench.core.folders import CROP, decode, evaluation_files
from bench.core.images import HeldImages, StoredImages
from bench.store.db import Store

pytestmark = pytest.mark.xdist_group("imagenet")  # one module fixture, run once
CLASSES = ("n01440764", "n01443537", "n01484850")
MATRIX = """include = ["quick"]

[[cell]]
attack = "pgd"
steps = 10
targeted = "random"
"""


def _write_imagenet(root: Path, train: int = 3, val: int = 2) -> Path:
    """Real JPEG files of several sizes, one folder per class, as ILSVRC-2012 is laid out."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(230, 330, 2))
                pixels = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
                pixels[..., c] += 150  # each class its own dominant channel
                Image.fromarray(pixels).save(folder / f"{split}_{name}_{i}.JPEG", quality=90)
    return root


def test_decode_is_the_reference_evaluation_transform(tmp_path):
    from torchvision import transforms

    data = _write_imagenet(tmp_path / "in", train=1, val=1)
    path = next((data / "val").rglob("*.JPEG"))
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    expected = reference(Image.open(path).convert("RGB"))
    got = decode(path)
    assert got.shape == (3, CROP, CROP) and got.dtype == torch.uint8
    assert (got.int() - expected.int()).abs().max() <= 1  # antialiasing on tensors vs PIL: rounding apart


def test_the_evaluation_subset_is_fixed_and_seeded():
    files = [(f"val/c/{i:05d}.JPEG", i % 3) for i in range(20)]
    picked = evaluation_files(files, size=7)
    assert picked == evaluation_files(files, size=7) and len(picked) == 7
    assert picked == sorted(picked) and set(picked) <= set(files)
    assert evaluation_files(files, size=50) == files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    data, results = _write_imagenet(root / "data"), root / "res"
    (root / "m.toml").write_text(MATRIX)
    done = run_bench(
        "run", "--defense", "natural", "--dataset", "imagenet", "--data-root", str(data), "--arch", "imagenet_tiny",
        "--set", "epochs=20", "--set", "batch_size=9", "--matrix", str(root / "m.toml"), "--results", str(results),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root, data, results, done.stdout


def test_a_run_on_imagenet_judges_top1_top5_and_a_targeted_cell(run):
    _, _, results, table = run
    assert "top-5 %" in table and "pgd10_tgt" in table
    rows = json.loads(run_bench("results", "--results", str(results), "--format", "json").stdout)
    (worst,) = [r for r in rows if r["attack"] == "worst_case"]
    cells = {r["label"]: r for r in rows if r["attack"] != "worst_case"}
    assert set(cells) == {"fgsm", "pgd10", "pgd20", "pgd10_tgt"}
    assert cells["pgd10_tgt"]["params"]["targeted"] == "random"
    assert all(r["n"] == len(CLASSES) * 2 for r in [*cells.values(), worst])  # every val image
    assert worst["cells"] == 4 and worst["threat"] == "linf-0.0156863"  # RobustBench's 4/255
    for r in [*cells.values(), worst]:
        assert r["robust_top5"] is not None and r["robust_top5"] >= r["robust_acc"]


def test_the_evaluation_set_is_recorded_with_the_checkpoint(run):
    _, data, results, _ = run
    (ck,) = Store.for_results(results).checkpoints()
    ids = json.loads((Path(ck.path) / "eval_ids.json").read_text())
    assert ids == sorted(str(p.relative_to(data)) for p in (data / "val").rglob("*.JPEG"))
    assert ck.meta["eval_set"] == {
        "size": len(ids),
        "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "ids": "eval_ids.json",
    }


def test_another_val_folder_is_refused_for_a_judged_checkpoint(run, tmp_path):
    root, _data, results, _ = run
    other = _write_imagenet(tmp_path / "other", train=3, val=1)
    done = run_bench(
        "run", "--defense", "natural", "--dataset", "imagenet", "--data-root", str(other), "--arch", "imagenet_tiny",
        "--set", "epochs=20", "--set", "batch_size=9", "--matrix", str(root / "m.toml"), "--results", str(results),
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "was judged on another evaluation set of imagenet (6 images" in done.stderr


def test_a_missing_or_wrong_layout_is_one_line(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.JPEG").write_bytes(b"")
    data = _write_imagenet(tmp_path / "data", train=1, val=1)
    for root, extra, message in (
        (tmp_path / "absent", (), "is not a folder; put ILSVRC-2012 under it as train/ and val/"),
        (tmp_path / "flat", (), "has no train/ or val/ class folders"),
        # The stream crops and flips: the loop's own augmentation is refused before anything runs.
        (data, ("--set", "augment=crop"), "imagenet's training images are cropped and flipped as they stream"),
    ):
        done = run_bench(
            "run", "--defense", "natural", "--dataset", "imagenet", "--data-root", str(root), *extra,
            "--results", str(tmp_path / "r"),
        )  # fmt: skip
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
        assert not (tmp_path / "r").exists()  # nothing written


# --- training streams train/ from disk ---------------------------------------------------------
def test_a_streamed_batch_is_the_reference_training_transform_whatever_the_decoding_processes(tmp_path):
    """Each image's random resized crop and flip is torchvision's, drawn from the image's own
    seed: the batches are the same decoded in the loop's process or in two workers, and the
    next epoch draws other crops."""
    from torchvision.transforms import v2

    from bench.core.folders import StreamedFolder, image_seed
    from bench.core.trainsets import TrainSet

    data = _write_imagenet(tmp_path / "in", train=4, val=1)
    files = tuple(
        (str(p.relative_to(data)), CLASSES.index(p.parent.name))
        for p in sorted((data / "train").rglob("*"))
        if p.is_file()
    )
    order = [torch.tensor([5, 0, 7]), torch.tensor([11, 2])]
    here: TrainSet = StreamedFolder(data, files, seed=3, workers=0)
    inline = list(here.batches(order, epoch=0, device=torch.device("cpu")))
    pooled = list(StreamedFolder(data, files, seed=3, workers=2).batches(order, epoch=0, device=torch.device("cpu")))
    for (xa, ya), (xb, yb), idx in zip(inline, pooled, order, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.float32 and xa.shape == (len(idx), 3, CROP, CROP) and 0 <= xa.min() <= xa.max() <= 1
        assert ya.tolist() == [files[i][1] for i in idx.tolist()]
    # Image 5 of epoch 0, by torchvision's transforms seeded as the loader seeds them.
    torch.manual_seed(image_seed(3, 0, 5))
    pil = Image.open(data / files[5][0]).convert("RGB")
    expected = v2.functional.pil_to_tensor(v2.RandomHorizontalFlip()(v2.RandomResizedCrop(CROP, antialias=True)(pil)))
    assert torch.equal((inline[0][0][0] * 255).round().to(torch.uint8), expected)
    later = next(here.batches(order[:1], epoch=1, device=torch.device("cpu")))[0]
    assert not torch.equal(later, inline[0][0])  # another epoch, other crops
    assert here.to("cpu") is here  # nothing held to move


def test_training_streams_a_train_folder_larger_than_memory_holds(tmp_path, monkeypatch):
    """With the in-memory limit at 2 images, loading train/ whole is refused, and training
    on it still runs: the loop reads it batch by batch from disk."""
    import bench.core.data as data_module
    from bench.engine.train import TrainConfig, train_set_model
    from bench.errors import BenchError
    from bench.registry import DEFENSES

    data = _write_imagenet(tmp_path / "in", train=4, val=1)
    monkeypatch.setattr(data_module, "TRAIN_LIMIT", 2)
    data_module._imagenet_set.cache_clear()
    with pytest.raises(BenchError, match="training streams them from disk"):
        data_module.load_dataset("imagenet", "train", str(data))
    streamed = data_module.training_set("imagenet", str(data), seed=0)
    assert len(streamed) == 4 * len(CLASSES) and streamed.augments
    entry, spec = DEFENSES.get("natural"), data_module.get_spec("imagenet")
    config = TrainConfig(epochs=2, batch_size=5, lr=0.01)
    _, result = train_set_model("imagenet_tiny", spec, entry.fn, entry.make_config({}), config, streamed, seed=0)
    again = train_set_model("imagenet_tiny", spec, entry.fn, entry.make_config({}), config, streamed, seed=0)[1]
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert result.losses == again.losses  # the seed fixes the crops as it fixes the order
    with pytest.raises(ValueError, match="leave augment at 'none'"):
        train_set_model(
            "imagenet_tiny",
            spec,
            entry.fn,
            entry.make_config({}),
            TrainConfig(epochs=1, augment="crop"),
            streamed,
            seed=0,
        )


def test_a_kannan_preset_stands_its_paper_numbers_beside_ours_at_16_255(tmp_path):
    """Kannan et al.'s M-PGD preset, trained briefly on the tiny folder (a patch CNN in place
    of InceptionV3) and judged by the `kannan_imagenet` matrix: the checkpoint page puts
    Table 3's targeted PGD numbers, top-1 and top-5, beside its own cells at 16/255, the
    radius the preset names, not the dataset's 4/255."""
    import re

    data, results = _write_imagenet(tmp_path / "data", train=3, val=2), tmp_path / "res"
    done = run_bench(
        "run", "--defense", "pgd_at", "--preset", "kannan_imagenet_mpgd", "--dataset", "imagenet",
        "--data-root", str(data), "--arch", "imagenet_tiny", "--set", "epochs=1", "--set", "batch_size=9",
        "--set", "attack_steps=2", "--matrix", "kannan_imagenet", "--results", str(results),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from bench import api

    # The results and the site in this process: the installed script's are tested above.
    rows = api.results(api.Where(results))
    (ck,) = Store.for_results(results).checkpoints()
    assert ck.meta["paper_threat"] == "linf-0.0627451" != ck.threat == "linf-0.0156863"
    (tgt,) = [r for r in rows if r.get("label") == "pgd10_tgt"]
    assert tgt["threat"] == "linf-0.0627451" and tgt["params"]["targeted"] == "random"
    site = api.site(tmp_path / "site", api.Where(results)).parent  # it returns the index page
    page = (site / "ck" / f"{ck.key}.html").read_text()
    paper = page[page.index('id="paper"') :]
    paper = paper[: paper.index("</section>")]
    assert "At linf-0.0627451, the radius the paper measured at." in paper
    found = dict(
        re.findall(r'<th scope="row">(\w+)</th><td class="num paper">[\d.]+</td><td class="num">([^<]+)</td>', paper)
    )
    assert found["pgd10_tgt"] == f"{100 * tgt['robust_acc']:.2f}"
    assert found["pgd10_tgt_top5"] == f"{100 * tgt['robust_top5']:.2f}"
    assert found["blackbox"] == "–"  # no column of ours is their transfer attack


def test_an_imagenet_worst_case_exports_from_the_held_set_and_judges_back(run):
    """The evaluation set is held as uint8 (bench.core.images); the export reads it whole,
    once, and a fresh load of the weights gets the worst case's accuracy from the file."""
    root, data, results, _ = run
    (ck,) = Store.for_results(results).checkpoints()
    out = root / "adv.pt"
    done = run_bench(
        "export", "--checkpoint", ck.key[:8], "--out", str(out), "--results", str(results), "--data-root", str(data)
    )
    assert done.returncode == 0, done.stderr
    inputs = torch.load(out)
    x, y = load_dataset("imagenet", "test", str(data))
    assert isinstance(x, HeldImages)
    assert inputs.shape == x.shape and inputs.dtype == torch.float32
    assert (inputs - x[:]).abs().max() <= 4 / 255 + 1e-6
    model = load_checkpoint(ck.path).eval()
    with torch.no_grad():
        judged = float((model(inputs).argmax(1) == y).float().mean())
    rows = json.loads(run_bench("results", "--results", str(results), "--format", "json").stdout)
    (worst,) = [r for r in rows if r["attack"] == "worst_case"]
    assert judged == pytest.approx(worst["robust_acc"])


def test_a_transfer_on_imagenet_crafts_judges_and_rereads_its_cache_from_the_held_set(run):
    """`bench transfer` on ImageNet through the installed script, then its cached examples
    read back against the held uint8 set (held to the ball a batch at a time)."""
    from bench.core.cells import transfer_cell
    from bench.core.data import get_spec
    from bench.run.transfer import DEFAULT_ATTACK, cached_examples
    from bench.run.workspace import Workspace

    _, data, results, _ = run
    done = run_bench(
        "transfer", "--source", "natural", "--target", "all", "--dataset", "imagenet",
        "--data-root", str(data), "--results", str(results),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "crafted 1 source set(s)" in done.stderr
    ws = Workspace.open(results, data_root=str(data))
    (source,) = ws.store.checkpoints(dataset="imagenet")
    x, _ = load_dataset("imagenet", "test", str(data))
    assert isinstance(x, HeldImages)
    cell = transfer_cell(DEFAULT_ATTACK, get_spec("imagenet").threat)
    examples = cached_examples(ws, source, cell, x)
    assert examples is not None and examples.x_adv.shape == x.shape
    assert isinstance(examples.x_adv, StoredImages)  # read from its file a batch at a time
    assert (examples.x_adv[:] - x[:]).abs().max() <= cell.config.eps + 1e-6
