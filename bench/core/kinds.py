"""What a stored cell is, declared once: its kind (what its bits mean) and, for an attack,
its role among the attacks (what the masking checks compare it as).

Every layer that reads cells asks these, never an attack's name: a new attack plugin
declares its role in its config (bench.core.contract) and is compared like its peers.
The values are database strings: they never change.
"""

from __future__ import annotations

from enum import StrEnum


class CellKind(StrEnum):
    """What a cell's per-sample bits say."""

    ATTACK = "attack"
    """`correct_bits`: still classified correctly under the attack (an upper bound)."""
    TRANSFER = "transfer"
    """An attack crafted on another checkpoint: its bits read like an attack's."""
    VERIFY = "verify"
    """A complete verifier: `correct_bits` what it left standing (robust or unknown),
    `proven_bits` the images it proved robust. Its counterexamples break like an attack."""
    CERTIFY = "certify"
    """A sound relaxation: `proven_bits` (and `correct_bits`) the images it certified, a
    lower bound. It breaks nothing, so it never enters the worst case."""

    @property
    def breaks(self) -> bool:
        """Whether the cell's broken samples are broken (it enters the worst case)."""
        return self is not CellKind.CERTIFY

    @property
    def proves(self) -> bool:
        """Whether the cell carries proven bits (it enters the bracket's floor)."""
        return self in (CellKind.VERIFY, CellKind.CERTIFY)


class Role(StrEnum):
    """An attack's place among the attacks, as the masking checks and the board read it."""

    ONE_STEP = "one_step"
    """A single gradient step (FGSM): what the iterative attacks must beat."""
    ITERATIVE = "iterative"
    """An iterative white-box gradient attack (PGD, APGD, APGD-T, multi-targeted): with
    ONE_STEP, the white-box reference of the masking checks."""
    SWEEP = "sweep"
    """A budget sweep past the threat model (the unbounded sanity check)."""
    QUERY = "query"
    """A black-box search on the model's answers (Square), compared sample by sample."""
    GRADIENT_ESTIMATE = "gradient_estimate"
    """A gradient estimated from queries (SPSA), compared by accuracy on its images."""
    WITNESS = "witness"
    """A surrogate distilled from the model's answers (the masking witness)."""
    ENSEMBLE = "ensemble"
    """A packaged ensemble with a black-box member (AutoAttack): never a white-box reference."""
    TRUTH = "truth"
    """A verifier cell (complete or certified)."""
    OTHER = "other"
    """Anything else: counted in the worst case, compared with nothing."""

    @property
    def white_box(self) -> bool:
        """Follows the model's own gradients: the masking checks' reference."""
        return self in (Role.ONE_STEP, Role.ITERATIVE)
