"""Know the truth: exact robustness of small ReLU networks under an L-inf box, and a sound
certified floor.

- `to_graph(model)`: the model as a flat numeric DAG (graph.py), or `Unsupported` naming
  the first layer that is not Linear, Conv2d, BatchNorm, Normalize, ReLU, MaxPool2d,
  Flatten or a residual add;
- `certify(g, x, y, eps)`: CROWN's linear-relaxation bound on the margin, batched
  (bounds.py); `interval_margin` is plain IBP's, for comparison;
- `verify_images(g, model, x, y, eps)`: a complete verifier (clean check, CROWN, a seeded
  PGD search, then LP-tightened bounds and Tjeng et al.'s MILP on HiGHS, or, for chains of
  Linear and ReLU layers with many unstable ReLUs, branch and bound on optimized
  alpha-beta-CROWN bounds), one `Verdict` per image (complete.py, milp.py, search.py,
  bab.py, alpha.py);
- `ibp_bounds(model, x, eps)`: differentiable interval bounds for IBP training, on the
  model's traced forward pass (interval.py).

Robust and certified are claims about the model as it runs, in fp32: each proven margin
must exceed a rigorous bound on the model's fp32 rounding over the box (rounding.py),
and the graph is held to the model: hooks refused, Normalize by exact type, logits
compared on points of the box (faithful.py).

No maintained verifier installs beside torch 2.14 (auto_LiRPA on PyPI pins torch < 1.13),
so the encodings are written here, on torch, numpy and scipy's HiGHS.
"""

from bench.verify.bab import BaBConfig
from bench.verify.bounds import certify, interval_margin
from bench.verify.complete import Verdict, verify_images
from bench.verify.graph import Graph, Node, Unsupported
from bench.verify.interval import ibp_bounds
from bench.verify.search import SearchConfig
from bench.verify.trace import to_graph

__all__ = [
    "BaBConfig",
    "Graph",
    "Node",
    "SearchConfig",
    "Unsupported",
    "Verdict",
    "certify",
    "ibp_bounds",
    "interval_margin",
    "to_graph",
    "verify_images",
]
