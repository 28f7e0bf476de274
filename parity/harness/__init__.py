"""Tier 3, the parity harness: where two implementations part ways, layer by layer, and why.

    compare      `python -m parity compare`: a checkpoint through vit_jax and vit_torch (or timm, transformers)
    verify       `python -m parity verify`: your own implementation against vit_jax
    grad         `python -m parity grad`: one training step in both frameworks, every gradient
    verdict      what the three share: arguments, the reference run, the rows, the verdict, the report
    tolerance    the tolerance policy: when two tensors count as the same, per precision
    diagnosis    where inside a layer a divergence starts, and which known cause reproduces it
    counterparts the candidates: vit_torch, timm, transformers, or a user's function, with their intermediates
"""
