"""ViT Mirror's framework-neutral side, in four tiers; each imports only from the tiers above it.

    core/     tier 1, what both models import: config, errors, atomic files, intermediates' names,
              and the shared weight layer (weights/: the canonical form, containers, one module per format)
    data/     tier 2, the data both frameworks read: datasets, image files, class names
    cli/      tier 2, what both frameworks' command lines share: arguments, checks, logits, predict, eval
    harness/  tier 3, stands on both models: compare, verify and grad, with tolerance, diagnosis, counterparts
    tools/    tier 4, stands on both models and the harness: bench, explain and figures, the demo

`python -m parity COMMAND` runs the harness and the tools.
"""
