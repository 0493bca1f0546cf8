"""The models people already hold: an ONNX file, a timm or torchvision name with a weights
file, a RobustBench zoo entry in its own folder layout, and --mean/--std. Every model is
built here with random or freshly trained weights; nothing is downloaded. Each shape must
give the same per-sample verdicts as the same weights behind a plain factory."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bench
from bench.core.data import get_spec, load_dataset
from bench.run.training import load_model as load_checkpoint
from bench.store.db import Store
from bench.store.sources import zoo

BENCH = str(Path(sys.executable).with_name("bench"))
MODELS = """
import torch

from bench.core.data import get_spec
from bench.core.models import build_model


def digits_cnn():
    return build_model("digits_cnn", get_spec("digits"))


def timm_net():
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
"""


def _verdicts(results: Path, name: str) -> dict[str, bytes]:
    """Per cell key, the per-sample bits of the model stored under `name`."""
    store = Store.for_results(results)
    (ck,) = [c for c in store.checkpoints() if c.defense == name]
    return {r.cell_key: bytes(r.correct_bits) for r in store.evaluations([ck.id])}


def _export_onnx(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    # The TorchScript exporter: the dynamo one needs onnxscript, which the bench does not use.
    torch.onnx.export(
        model.eval(),
        (torch.rand(2, *shape),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
        dynamo=False,
    )


def _hardmax_onnx(path: Path) -> None:
    """A valid ONNX graph whose Hardmax onnx2torch has no converter for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((64, 10), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["z"]),
            helper.make_node("Hardmax", ["z"], ["logits"]),
        ],
        "hardmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, natural_model):
    d = tmp_path_factory.mktemp("shapes")
    (d / "my_models.py").write_text(MODELS)
    save_file({k: v.contiguous() for k, v in natural_model.state_dict().items()}, str(d / "cnn.safetensors"))
    _export_onnx(natural_model, d / "cnn.onnx", (1, 8, 8))
    (d / "corrupt.onnx").write_bytes((d / "cnn.onnx").read_bytes()[:300])
    _hardmax_onnx(d / "hardmax.onnx")
    return d


def test_onnx_gives_onnxruntime_logits_and_a_factory_verdicts_through_the_cli(folder, natural_model, tmp_path):
    import onnxruntime

    from bench.store.sources.onnx_file import convert

    x, _ = load_dataset("digits", "test")
    converted = convert(folder / "cnn.onnx", "cnn.onnx")
    reference = onnxruntime.InferenceSession(str(folder / "cnn.onnx")).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ours = converted(x).numpy()
        torch_logits = natural_model(x).numpy()
    assert np.abs(ours - reference).max() < 1e-5 and np.abs(ours - torch_logits).max() < 1e-5

    results = tmp_path / "results"
    proc = subprocess.run(
        [BENCH, "eval", "--model", "cnn.onnx", "--name", "onnx_cnn", "--matrix", "quick", "--results", str(results),
         "--device", "cpu"],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bench.evaluate(
        f"{folder / 'my_models.py'}:digits_cnn",
        name="factory_cnn",
        matrix="quick",
        weights=str(folder / "cnn.safetensors"),
        results=results,
        device="cpu",
    )
    onnx_bits, factory_bits = _verdicts(results, "onnx_cnn"), _verdicts(results, "factory_cnn")
    assert len(onnx_bits) == 3 and onnx_bits == factory_bits
    store = Store.for_results(results)
    (ck,) = [c for c in store.checkpoints() if c.defense == "onnx_cnn"]
    assert ck.meta["outside"]["weights_sha256"] == hashlib.sha256((folder / "cnn.onnx").read_bytes()).hexdigest()
    assert (Path(ck.path) / "model.onnx").read_bytes() == (folder / "cnn.onnx").read_bytes()
    # Rebuilt from the folder's copy alone (as `bench transfer` does), it answers the same.
    rebuilt = load_checkpoint(ck, "cpu")
    with torch.no_grad():
        assert torch.allclose(rebuilt(x[:16]), torch.from_numpy(torch_logits[:16]), atol=1e-5)


def test_timm_by_name_with_a_torch_checkpoint_matches_a_factory_behind_the_same_normalization(folder, tmp_path):
    import timm

    torch.manual_seed(1)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # A training script's checkpoint: the weights under `state_dict`, DataParallel's prefix on.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "net.pt")
    save_file(state, str(tmp_path / "net.safetensors"))
    results = tmp_path / "results"
    common = {"matrix": "quick", "results": results, "device": "cpu", "mean": (0.5,), "std": (0.25,)}
    bench.evaluate("timm:resnet10t", name="timm_net", weights=str(tmp_path / "net.pt"), **common)
    bench.evaluate(
        f"{folder / 'my_models.py'}:timm_net", name="factory_net", weights=str(tmp_path / "net.safetensors"), **common
    )
    assert _verdicts(results, "timm_net") == _verdicts(results, "factory_net")
    store = Store.for_results(results)
    (ck,) = [c for c in store.checkpoints() if c.defense == "timm_net"]
    outside = ck.meta["outside"]
    assert outside["source"] == {"kind": "hub", "library": "timm", "name": "resnet10t", "version": timm.__version__}
    assert outside["normalize"] == {"mean": [0.5], "std": [0.25], "origin": "mean/std"}
    # The normalization is part of the identity: without it, the same weights are another model.
    x, _ = load_dataset("digits", "test")
    rebuilt = load_checkpoint(ck, "cpu")
    with torch.no_grad():
        assert torch.allclose(rebuilt(x[:8]), net.eval()((x[:8] - 0.5) / 0.25), atol=1e-5)


def _cifar_folder(root: Path, per_batch: int = 12) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
            pickle.dump({"data": data, "labels": [i % 10 for i in range(per_batch)]}, f)
    return root


def test_a_robustbench_entry_from_its_folder_layout_gives_its_weights_logits_and_reported_numbers(tmp_path):
    data = _cifar_folder(tmp_path / "data", per_batch=4)  # admission's traced PGD runs on every test image
    torch.manual_seed(2)
    net = zoo.entry("cifar10", "Linf", "Wong2020Fast")["model"]()
    state = net.state_dict()
    # RobustBench's own file: a torch checkpoint with the tensors under `state_dict`,
    # DataParallel's prefix on, and the normalization constants (mu, sigma) left to the code.
    models = tmp_path / "robustbench" / "models"
    (models / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items() if k not in ("mu", "sigma")}},
        models / "cifar10" / "Linf" / "Wong2020Fast.pt",
    )
    info = tmp_path / "robustbench" / "model_info" / "cifar10" / "Linf"
    info.mkdir(parents=True)
    (info / "Wong2020Fast.json").write_text(json.dumps({"clean_acc": "83.34", "autoattack_acc": "43.21"}))
    results = tmp_path / "results"
    rows = bench.evaluate(
        "robustbench:cifar10/Linf/Wong2020Fast",
        name="wong_zoo",
        robustbench_models=str(models),
        matrix="quick",
        results=results,
        device="cpu",
        data_root=str(data),
    )
    assert rows[-1]["dataset"] == "cifar10"  # the entry names its dataset
    (ck,) = Store.for_results(results).checkpoints()
    assert ck.meta["paper"] == {"clean": pytest.approx(0.8334), "autoattack": pytest.approx(0.4321)}
    # The model the cells ran on is the zoo's architecture with these weights and its own
    # normalization constants, which the file left out (one bench.evaluate: admission on a
    # PreAct ResNet-18 costs half a minute on this machine, so no second run of a factory).
    x, _ = load_dataset("cifar10", "test", str(data))
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(ck, "cpu")(x), net.eval()(x), atol=1e-5)


def test_torchvision_takes_its_normalization_from_its_weights_metadata(folder, tmp_path):
    from torchvision.models import get_model

    data = _cifar_folder(tmp_path / "data")
    torch.manual_seed(3)
    net = get_model("resnet18", weights=None, num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    results = tmp_path / "results"
    bench.evaluate(
        "torchvision:resnet18",
        name="vision",
        dataset="cifar10",
        matrix="quick",
        weights=str(tmp_path / "r18.safetensors"),
        results=results,
        device="cpu",
        data_root=str(data),
    )
    (ck,) = Store.for_results(results).checkpoints()
    norm = ck.meta["outside"]["normalize"]
    assert norm["mean"] == pytest.approx([0.485, 0.456, 0.406]) and norm["std"] == pytest.approx([0.229, 0.224, 0.225])
    x, _ = load_dataset("cifar10", "test", str(data))
    mean, std = torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(ck, "cpu")(x), net.eval()((x - mean) / std), atol=1e-4)


BAD = [
    (["--model", "corrupt.onnx"], "is not a valid ONNX model"),
    (["--model", "hardmax.onnx"], "Hardmax (opset 17)"),
    (["--model", "timm:resnet10tt", "--weights", "cnn.safetensors"], "did you mean resnet10t"),
    (["--model", "timm:resnet10t", "--weights", "cnn.safetensors", "--mean", "0.5", "--std", "0.5"],
     "do not fit the model"),
    (["--model", "timm:resnet10t"], "needs --weights FILE"),
    (["--model", "cnn.onnx", "--mean", "0.5,0.5", "--std", "0.5,0.5"], "mean has 2 values and digits images have 1"),
    (["--model", "cnn.onnx", "--mean", "0.5"], "--mean and --std go together"),
    (["--model", "robustbench:cifar10/Linf/Wong2020Fastt"], "did you mean Wong2020Fast"),
    (["--model", "robustbench:cifar10/Linf/Wong2020Fast", "--robustbench-models", "nowhere"],
     "nowhere/cifar10/Linf/Wong2020Fast.pt"),
]  # fmt: skip


def test_bad_model_shapes_exit_2_with_one_line_through_the_installed_script(folder, tmp_path):
    results = tmp_path / "results"
    procs = [
        subprocess.Popen(
            [BENCH, "eval", *args, "--name", "bad", "--matrix", "quick", "--results", str(results), "--device", "cpu"],
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for args, _ in BAD
    ]  # fmt: skip
    for proc, (args, message) in zip(procs, BAD, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not results.exists()  # nothing half-written


def test_normalization_lengths_are_checked_against_the_dataset():
    from bench.errors import BenchError
    from bench.store.sources import Normalization

    spec = get_spec("digits")
    assert Normalization((0.5,), (0.5,), "t").checked(spec).mean == (0.5,)
    with pytest.raises(BenchError, match=r"std .* must be positive"):
        Normalization((0.5,), (0.0,), "t").checked(spec)


def test_the_verifier_takes_a_converted_relu_network_like_the_same_weights_in_torch(tmp_path):
    """The exporter writes the model's Normalize as Sub and Div by constants; the converted
    graph gets the bench's Normalize back, so the verifier encodes it exactly, and its
    verdicts are those of the same weights in torch. On digits_mlp, the network the MILP is
    sized for (the CNN's MILP takes minutes per image)."""
    from bench.engine.train import TrainConfig, train_model
    from bench.registry import DEFENSES
    from bench.store.sources.onnx_file import convert
    from bench.verify import to_graph, verify_images

    spec, entry = get_spec("digits"), DEFENSES.get("natural")
    x, y = load_dataset("digits", "train")
    model, _ = train_model("digits_mlp", spec, entry.fn, entry.make_config({}), TrainConfig(epochs=5), x, y, seed=0)
    _export_onnx(model, tmp_path / "mlp.onnx", (1, 8, 8))
    converted = convert(tmp_path / "mlp.onnx", "mlp.onnx")
    assert any(type(m).__name__ == "Normalize" for m in converted.modules())
    x, y = load_dataset("digits", "test")
    ours = verify_images(to_graph(converted), converted, x[:8], y[:8], 0.1, time_limit=10)
    theirs = verify_images(to_graph(model.eval()), model, x[:8], y[:8], 0.1, time_limit=10)
    assert [v.status for v in ours] == [v.status for v in theirs]
    assert {v.status for v in ours} == {"robust", "not_robust"}  # both kinds decided, none left unknown


def test_the_site_names_each_shape_without_the_users_folders():
    from bench.reporting.site.names import outside_name
    from bench.reporting.site.records import portable_outside

    onnx_info = {"reference": "/home/me/nets/cnn.onnx", "source": {"kind": "onnx", "file_name": "cnn.onnx"}}
    assert outside_name(onnx_info) == "cnn.onnx"
    assert portable_outside(onnx_info)["reference"] == "cnn.onnx"
    hub_info = {"reference": "timm:resnet10t", "source": {"kind": "hub"}}
    assert outside_name(hub_info) == "timm:resnet10t"
    assert outside_name({"factory": "/home/me/my_models.py:build"}) == "my_models.py:build"  # stored before sources
