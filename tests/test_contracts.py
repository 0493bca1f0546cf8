"""The contract between the harness and the attack plugins (bench.core.contract), held
over the whole attack registry: every registered attack, a new one included, is checked
the moment it is registered."""

from __future__ import annotations

import pytest

from bench.core import contract
from bench.core.data import DATASETS
from bench.core.kinds import CellKind, Role
from bench.registry import ATTACKS

NAMES = ATTACKS.names()


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("name", NAMES)
def test_config_keeps_the_contract(name, dataset):
    threat = DATASETS[dataset].threat
    config = contract.with_threat(ATTACKS.get(name).make_config({}), threat)
    key = config.threat_key()
    assert isinstance(key, str) and key
    declared = contract.hooks(config)
    assert isinstance(declared.role, Role)
    assert isinstance(declared.kind, CellKind)
    assert isinstance(declared.verifier, bool) and isinstance(declared.queries_only, bool)
    if declared.verifier:
        assert declared.kind in (CellKind.VERIFY, CellKind.CERTIFY)
        assert declared.role is Role.TRUTH
    else:
        assert declared.kind is CellKind.ATTACK
    if declared.batch_limit is not None:
        assert isinstance(declared.batch_limit, int) and declared.batch_limit >= 1
    # The ball the harness holds it to: a finite radius once the threat is filled in.
    assert declared.eps is None or declared.eps > 0
    assert declared.norm in (None, "linf", "l2")
    for make in (contract.for_transfer, contract.for_randomized):
        other = make(config)
        assert other is None or type(other) is type(config)


def test_defaults_of_a_bare_config():
    class Bare:
        def threat_key(self) -> str:
            return "linf-0.1"

    assert contract.hooks(Bare()) == contract.Hooks()
    assert contract.with_threat(Bare, None) is Bare
    assert contract.for_transfer(Bare()) is None and contract.for_randomized(Bare()) is None
