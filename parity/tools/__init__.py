"""Tier 4, the tools that stand on both models and the harness.

    bench     `python -m parity bench`: speed and peak memory of each implementation, side by side
    explain   `python -m parity explain`: attention maps and the paper's figures for an image, from both frameworks
    figures   the figures' arrays (NumPy) and their pictures (matplotlib)
    demo      `make demo`: train on the bundled digits through XLA, score in both frameworks
"""
