"""Built-in defenses: one module each, registered with `bench.plugin.register_defense`.

A defense is a frozen config dataclass (its own hyperparameters, a docstring on each
field) and `loss(model, x, y, cfg, ctx) -> Tensor`, the scalar the shared training loop
in `bench/engine/train.py` minimizes for one minibatch. The pieces defenses share (smoothed
targets, Gaussian noise, mixup, logit penalties, the PGD training adversary) live in
`defenses/_parts.py`, so each defense reads as the sum of its parts.
"""
