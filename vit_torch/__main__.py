"""`python -m vit_torch COMMAND ...`: see `python -m vit_torch --help`."""

from parity.cli import run
from vit_torch.cli import main

run(main)
