"""Every preset under defenses/presets/ is a recipe the bench can run: it parses, names a
registered defense, dataset and architecture, builds its config and training schedule,
and records paper numbers only under leaderboard columns. Every defense has a digits
preset, and presets written from Shafahi et al.'s tables keep their units straight.
"""

from __future__ import annotations

import re

import pytest

from bench.core.data import DATASETS, get_spec
from bench.core.models import ARCHS
from bench.core.presets import PRESET_DIR, all_presets, default_preset
from bench.engine.train import TrainConfig
from bench.registry import DEFENSES, build_config
from bench.run.recipe import TrainRequest, resolve
from defenses._parts import alpha_to_smoothing

PAPER_COLUMNS = {
    "clean",
    "fgsm",
    "pgd5",
    "pgd10",
    "pgd20",
    "pgd40",
    "pgd50",
    "pgd100",
    "pgd200",
    "pgd1000",
    "cw20",
    "cw40",
    "cw50",
    "cw200",
    "spsa",
    "blackbox",
    "restarts10",
    "pgd10_tgt",  # Kannan et al.'s ImageNet white box: targeted PGD toward a random class
}
PAPER_COLUMNS |= {f"{c}_top5" for c in ("pgd10_tgt", "blackbox")}  # and their top-5
PRESETS = all_presets()


def test_presets_are_found():
    assert len(PRESETS) == len(list(PRESET_DIR.glob("*.toml"))) > len(DEFENSES.names())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds(name):
    preset = PRESETS[name]
    assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"{name}: preset names are lower_snake_case"
    assert preset.defense in DEFENSES, f"{name}: unknown defense {preset.defense!r}"
    assert preset.dataset in DATASETS, f"{name}: unknown dataset {preset.dataset!r}"
    assert preset.arch is None or preset.arch in ARCHS, f"{name}: unknown architecture {preset.arch!r}"
    assert preset.description and preset.source, f"{name}: needs a description and a source"
    DEFENSES.get(preset.defense).make_config(preset.config)
    build_config(TrainConfig, preset.train, what=f"{name} [train]")
    unknown = set(preset.paper) - PAPER_COLUMNS
    assert not unknown, f"{name}: [paper] keys must be leaderboard columns, not {sorted(unknown)}"
    for column, value in preset.paper.items():
        assert 0.0 <= value <= 1.0, f"{name}: paper {column} = {value} is not a fraction"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_resolves_as_a_recipe(name, monkeypatch):
    """What `bench train --preset NAME` resolves to, without loading any data. The
    architecture is checked by name above; building a WRN-28-10 per preset would take
    most of this file's time."""
    import bench.run.recipe

    monkeypatch.setattr(bench.run.recipe, "_check_fits", lambda arch, spec: None)
    preset = PRESETS[name]
    recipe = resolve(TrainRequest(defense=preset.defense, preset=name))
    assert recipe.dataset.name == preset.dataset
    assert recipe.arch == (preset.arch or get_spec(preset.dataset).default_arch)


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_every_defense_has_a_digits_preset(defense):
    preset = default_preset(defense, "digits")
    assert preset is not None, f"defenses/presets/{defense}_digits.toml is missing"
    assert preset.defense == defense and preset.dataset == "digits"
    assert not preset.paper, "digits presets are the bench's own; no paper reports them"
    assert resolve(TrainRequest(defense=defense)).preset.name == f"{defense}_digits"


def test_digits_presets_are_short():
    """Each trains in seconds on two CPU cores: natural and logit squeezing the shortest."""
    for defense in DEFENSES.names():
        train = build_config(TrainConfig, default_preset(defense, "digits").train, what=defense)
        assert train.epochs <= (20 if defense in ("natural", "logit_squeeze") else 30), defense


SHAFAHI_LS = re.compile(r"(shafahi_\w+|poster_\w+)_label_smoothing_a(\d{3})")


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if SHAFAHI_LS.match(n)))
def test_shafahi_alpha_is_converted_to_smoothing(name):
    """Shafahi et al.'s alpha in the name; the config holds s = alpha (C - 1) / C."""
    preset = PRESETS[name]
    alpha = int(SHAFAHI_LS.match(name).group(2)) / 100
    classes = get_spec(preset.dataset).num_classes
    assert preset.config["smoothing"] == pytest.approx(alpha_to_smoothing(alpha, classes))
    assert preset.config["smoothing"] == pytest.approx(alpha * 0.9)  # ten classes: 0.2 -> 0.18


CIFAR_SIGMA = re.compile(r"shafahi_cifar\d+_\w+_s(\d+)_\d+k$")


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if CIFAR_SIGMA.match(n)))
def test_shafahi_cifar_sigma_is_converted_to_unit_range(name):
    """Shafahi et al. give CIFAR sigma in 0-255 units (the name keeps them); configs use [0, 1]."""
    sigma_255 = int(CIFAR_SIGMA.match(name).group(1))
    assert PRESETS[name].config["sigma"] == pytest.approx(sigma_255 / 255)


ITERATIONS = re.compile(r"shafahi_(mnist|cifar10|cifar100)_\w+_(\d+)(k|m)$")


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if ITERATIONS.match(n)))
def test_shafahi_iterations_become_epochs(name):
    """k training iterations at batch 128: epochs = k * 128 / (training set size), rounded."""
    dataset, number, unit = ITERATIONS.match(name).groups()
    k = int(number) * (1000 if unit == "k" else 1_000_000)
    train = PRESETS[name].train
    assert train["batch_size"] == 128
    assert train["epochs"] == round(k * 128 / (60000 if dataset == "mnist" else 50000))


def test_summers_schedule():
    """Sec. 5.1: 200 epochs without adversarial examples, 101 with; decays at 100 and 150."""
    for name, preset in PRESETS.items():
        if not name.startswith("summers_cifar"):
            continue
        adversarial = preset.defense in ("pgd_at", "alp", "lrm")
        assert preset.train["epochs"] == (101 if adversarial else 200), name
        assert preset.train["milestones"] == [100, 150] and preset.train["warmup_epochs"] == 5, name
        assert preset.train["lr"] == 0.1 and preset.train["weight_decay"] == 2e-4, name
