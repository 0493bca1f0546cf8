"""Per-sample bits as the store keeps them: np.packbits of a bool vector, in test-set
(or subset) order."""

from __future__ import annotations

import numpy as np


def pack_bits(correct: np.ndarray) -> bytes:
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes()


def unpack_bits(bits: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool)
