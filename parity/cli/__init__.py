"""Tier 2, what the command lines of both frameworks share: arguments, input checks, error handling.

Each framework's `__main__` parses with these, runs its own model, and lets `run`
turn a `UserError` into one line on stderr and exit code 2. A command that both
frameworks have is written here once (`logits_main`, `predict.main`, `evaluate.main`),
and each framework only hands in its forward pass, a `Forward`. The names of the
first five modules are used as `from parity import cli; cli.NAME`; the others are
imported as modules:

    contract  the error contract: `run`, `dispatch`, `say`, DEBUG_ENV
    types     the argparse types (positive_float, seed_int, positive_int)
    loading   a checkpoint read for inference: `load_model` -> `LoadedCheckpoint`, its arguments and checks
    arrays    the --input and --output .npy arrays
    logits    the commands both frameworks share (`SHARED`, `framework_command`) and `logits`
    plotting  matplotlib without a display, and the atomic figure save
    predict   top-k classes for image files, the head checks and the printed table
    evaluate  accuracy of a checkpoint on a dataset split
    remote    checkpoint names and URLs resolved into the download cache (`load_model` calls `remote.resolve`)
    models    the `models` command: the catalogue, AugReg's index, the cache
"""

from parity.cli.arrays import load_input, npy_image_size, read_npy, save_output
from parity.cli.contract import DEBUG_ENV, dispatch, run, say
from parity.cli.loading import (
    CHECKPOINT_HELP,
    LoadedCheckpoint,
    add_checkpoint_argument,
    add_config_argument,
    add_numerics_argument,
    check_inference,
    check_outputs,
    describe_config,
    load_checkpoint,
    load_model,
    say_config,
)
from parity.cli.logits import SHARED, Forward, add_logits_arguments, framework_command, logits_main
from parity.cli.types import positive_float, positive_int, seed_int

__all__ = [
    'CHECKPOINT_HELP', 'DEBUG_ENV', 'SHARED', 'Forward', 'LoadedCheckpoint', 'add_checkpoint_argument',
    'add_config_argument', 'add_logits_arguments', 'add_numerics_argument', 'check_inference', 'check_outputs',
    'describe_config', 'dispatch', 'framework_command', 'load_checkpoint', 'load_input', 'load_model', 'logits_main',
    'npy_image_size', 'positive_float', 'positive_int', 'read_npy', 'run', 'save_output', 'say', 'say_config',
    'seed_int',
]
