"""The engine: device handling, prediction and verdicts (EOT, majority votes), crafting
and evaluating one cell, the attack losses, exact graph rewrites and the training loop.
Imports the store and the core; knows nothing of runs, science or pages."""
