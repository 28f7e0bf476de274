"""Tier 1, what both models and everything else stand on. NumPy only, no framework.

    config         ViTConfig (frozen, framework-neutral) and the official variant table
    errors         UserError, the one exception for mistakes a user can fix
    files          atomic writes, JSON read and written, whether a process still runs
    intermediates  the names and order of the intermediates both models hand out
    jax_memory     JAX's GPU memory options for the commands that run JAX and PyTorch in one process
    posemb         the fixed sincos2d position-embedding table both models add
    weights/       the shared weight layer: the canonical form, file containers and formats
"""
