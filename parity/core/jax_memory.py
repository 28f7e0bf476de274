"""JAX's GPU memory options for the commands that run JAX and PyTorch in one process.

JAX preallocates 75% of the GPU's memory when its first operation runs, and
`XLA_PYTHON_CLIENT_PREALLOCATE=false` makes it allocate as needed instead
(https://docs.jax.dev/en/latest/gpu_memory_allocation.html). PyTorch, started after
JAX in the same process, would otherwise find a quarter of the card left. JAX reads
these variables once, when its backend starts, so they are set before `jax` is imported.
Only preallocation is turned off: the allocator stays JAX's default (BFC), since
`XLA_PYTHON_CLIENT_ALLOCATOR=platform` frees memory but is, in the same docs, very slow,
and a smaller `XLA_CLIENT_MEM_FRACTION` would cap JAX's own models.
"""

import os
import sys
from typing import MutableMapping, Optional

PREFIXES = ('XLA_PYTHON_CLIENT_', 'XLA_CLIENT_')
# What the shared-GPU commands set, where the user has not set it.
SHARED_GPU = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}

_set_by_parity: dict = {}


def share_gpu_with_torch(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Sets SHARED_GPU's variables the user left unset; a no-op once JAX is imported, as JAX has read them."""
    environ = os.environ if environ is None else environ
    if 'jax' in sys.modules:
        return
    for name, value in SHARED_GPU.items():
        if name not in environ:
            environ[name] = value
            _set_by_parity[name] = value


def in_force(environ: Optional[MutableMapping[str, str]] = None) -> dict:
    """Each of JAX's memory variables set now: {name: {'value': ..., 'set_by': 'parity' or 'user'}}."""
    environ = os.environ if environ is None else environ
    return {name: {'value': value, 'set_by': 'parity' if _set_by_parity.get(name) == value else 'user'}
            for name, value in sorted(environ.items()) if name.startswith(PREFIXES)}
