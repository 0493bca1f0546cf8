"""The robustness bench: train defended classifiers, attack them, keep every number.

For scripts and notebooks (bench.api holds every public call):

    from bench import load_dataset, load_checkpoint, evaluate
    x, y = load_dataset("digits", split="test")     # x in [0, 1], (N, C, H, W)
    model = load_checkpoint("results/checkpoints/digits/natural/<key>")  # eval mode
    rows = evaluate(my_model, name="mine", dataset="digits", matrix="full")  # your own model
    from bench import BPDA   # a non-differentiable step, attackable (Athalye et al. 2018)
"""

__all__ = ["BPDA", "evaluate", "load_checkpoint", "load_dataset"]


def __getattr__(name: str):
    # The public names are looked up in bench.api on first use, not imported here: every
    # `bench` command imports this package first, and its --help and usage errors must
    # answer at once instead of after importing torch (seconds).
    if name in __all__:
        from bench import api

        return getattr(api, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
