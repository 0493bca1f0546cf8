"""The robustness bench: train defended classifiers, attack them, keep every number.

For scripts and notebooks:

    from bench import load_dataset, load_checkpoint
    x, y = load_dataset("digits", split="test")     # x in [0, 1], (N, C, H, W)
    model = load_checkpoint("results/checkpoints/digits/natural/<key>")  # eval mode
    rows = evaluate(my_model, name="mine", dataset="digits", matrix="full")  # your own model
"""
from bench.checkpoint import load_checkpoint
from bench.data import load_dataset
from bench.outside import evaluate

__all__ = ["evaluate", "load_checkpoint", "load_dataset"]
