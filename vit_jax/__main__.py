"""`python -m vit_jax COMMAND ...`: see `python -m vit_jax --help`."""

from parity.cli import run
from vit_jax.cli import main

run(main)
