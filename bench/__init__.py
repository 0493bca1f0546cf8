"""The robustness bench: train defended classifiers, attack them, keep every number.

For scripts and notebooks:

    from bench import load_dataset, load_checkpoint
    x, y = load_dataset("digits", split="test")     # x in [0, 1], (N, C, H, W)
    model = load_checkpoint("results/checkpoints/digits/natural/<key>")  # eval mode
    rows = evaluate(my_model, name="mine", dataset="digits", matrix="full")  # your own model
"""
__all__ = ["evaluate", "load_checkpoint", "load_dataset"]


def __getattr__(name: str):
    # Imported on first use, so that the command line's --help and usage errors answer
    # at once instead of after importing torch (seconds).
    if name == "load_checkpoint":
        from bench.store.checkpoints import load_checkpoint

        return load_checkpoint
    if name == "load_dataset":
        from bench.core.data import load_dataset

        return load_dataset
    if name == "evaluate":
        from bench.run.outside import evaluate

        return evaluate
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
