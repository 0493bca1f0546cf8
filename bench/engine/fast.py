"""The fast path's settings, as one value: how a cell's attack runs on the device.

A workspace sets it from the device (bench.run); craft and run_cell take it whole. Every
field off is the plain fp32 path (`PLAIN`), the path of the CPU, whose results stay bit
for bit what they were; verdicts are taken in fp32 whatever crafted the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FastPath:
    precision: str = "fp32"
    """The arithmetic of the craft: `fp32`, or `bf16` autocast (weights and iterates stay fp32)."""
    channels_last: bool = False
    """NHWC activations and weights for convolutions."""
    fold_bn: bool = False
    """Attack a copy of the frozen model with each eval-mode batch norm folded into the
    convolution before it (bench.engine.rewrite.fold_bn)."""
    compile: bool = False
    """torch.compile the model for attacks."""
    exact_rewrites: bool = False
    """Graph rewrites that change no bit of any logit or input gradient (bench.engine.rewrite)."""

    @property
    def copies_model(self) -> bool:
        """Whether the attack runs on a private copy of the model (folded or compiled),
        which may compute other bits than the model itself."""
        return self.fold_bn or self.compile

    def on_the_model(self) -> FastPath:
        """The settings with no copy or rewrite of the model: for an attack through a
        wrapper or a view of it (EOT, a mirrored backward), which a rewrite cannot see into."""
        return FastPath(self.precision, self.channels_last)


PLAIN = FastPath()
"""The plain fp32 path: the model itself, NCHW, no autocast."""
