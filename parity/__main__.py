"""`python -m parity COMMAND ...`: compare, verify, grad, bench, explain."""

from parity.cli import dispatch, run

COMMANDS = {
    'compare': ('parity.harness.compare:main', 'one checkpoint through vit_jax and vit_torch, layer by layer'),
    'verify': ('parity.harness.verify:main', 'your own implementation against vit_jax, layer by layer'),
    'grad': ('parity.harness.grad:main', 'one training step in both frameworks: loss and every gradient'),
    'bench': ('parity.tools.bench:main', 'inference and training speed and memory of each implementation'),
    'explain': ('parity.tools.explain:main', "attention rollout and the paper's figures for an image"),
}

run(lambda argv: dispatch('python -m parity', __doc__, COMMANDS, argv))
