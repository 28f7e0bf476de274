"""`python -m parity COMMAND ...`: compare, verify, grad, bench, explain."""

from parity.core import jax_memory

# Every command here puts JAX and PyTorch on one GPU; JAX reads its memory options when it starts.
jax_memory.share_gpu_with_torch()

from parity.cli import dispatch, run  # noqa: E402  (after the memory options, should the CLI ever import jax)

COMMANDS = {
    'compare': ('parity.harness.compare:main', 'one checkpoint through vit_jax and vit_torch, layer by layer'),
    'verify': ('parity.harness.verify:main', 'your own implementation against vit_jax, layer by layer'),
    'grad': ('parity.harness.grad:main', 'one training step in both frameworks: loss and every gradient'),
    'bench': ('parity.tools.bench:main', 'inference and training speed and memory of each implementation'),
    'explain': ('parity.tools.explain:main', "attention rollout and the paper's figures for an image"),
}

run(lambda argv: dispatch('python -m parity', __doc__, COMMANDS, argv))
