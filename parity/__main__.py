"""`python -m parity COMMAND ...`: compare, verify, grad, bench, explain."""

from parity.cli import dispatch, run

COMMANDS = {
    'compare': ('parity.harness:compare_main', 'one checkpoint through vit_jax and vit_torch, layer by layer'),
    'verify': ('parity.harness:verify_main', 'your own implementation against vit_jax, layer by layer'),
    'grad': ('parity.harness:grad_main', 'one training step in both frameworks: loss and every gradient'),
    'bench': ('parity.bench:main', 'inference and training speed and memory of each implementation'),
    'explain': ('parity.explain:main', "attention rollout and the paper's figures for an image"),
}

run(lambda argv: dispatch('python -m parity', __doc__, COMMANDS, argv))
