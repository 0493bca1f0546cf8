"""Built-in attacks: one module each, registered with `bench.plugin.register_attack`.

Every attack is `perturb(model, x, y, cfg, *, generator) -> Crafted` on inputs in [0, 1]
(bench.plugin.Crafted: `x_adv`, and a verifier's per-image verdicts).
The model is passed on every call, already in eval mode with weights that need no
gradient. A sample counts as broken as soon as any iterate misclassifies it, and
`x_adv` then holds that iterate. A config may define `with_threat(threat)` to fill its
unset budget from the dataset's threat model, and `threat_key()` naming the threat
model its cell counts toward (cells of the dataset's own threat model make up the
worst case).
"""
