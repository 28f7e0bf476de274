"""The error contract every command keeps: a user's mistake is one `error: ...` line and exit code 2.

`run` wraps each entry point (the three `__main__`s); `dispatch` serves `prog COMMAND ARGS...`,
importing only the module of the command asked for; `say` is where notes and progress go (stderr).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Optional, Sequence

from parity.core import files
from parity.core.errors import UserError

DEBUG_ENV = 'VIT_MIRROR_DEBUG'  # =1: every failure with its traceback (also `--debug` on any command)


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Runs a CLI entry point: the one place failures become the promised line.

    A `UserError`, an operating-system refusal (a full disk, a missing permission) and
    running out of memory end in one `error: ...` line, always the last line on stderr,
    and exit code 2. Anything else is a bug and keeps its traceback; `--debug` (or
    VIT_MIRROR_DEBUG=1) shows the traceback of every failure.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV) == '1' or '--debug' in argv
    argv = [a for a in argv if a != '--debug']
    try:
        code = main(argv)
    except KeyboardInterrupt:
        code = 130
    except (UserError, OSError, MemoryError) as e:
        if debug:
            raise
        _fail(_user_line(e))
    sys.exit(code)


def _user_line(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MemoryError):
        return ('out of memory; lower --batch-size or --image-size, or run on a machine with more memory '
                '(the limits are in the README, "Errors and limits")')
    if e.errno in files.WRITE_ERRNOS:  # a write the writers did not see themselves: say what to do all the same
        return str(files.write_error(e.filename or 'an output', e))
    where = f'{e.filename}: ' if getattr(e, 'filename', None) else ''
    return f'{where}{e.strerror or type(e).__name__} (errno {e.errno}); check the path and its permissions'


def _fail(message: str) -> None:
    """One line on stderr, the last thing the process prints, and exit code 2 (no exit handlers run after it)."""
    sys.stdout.flush()
    print('error: ' + ' '.join(message.split()), file=sys.stderr, flush=True)
    os._exit(2)


def dispatch(prog: str, description: str, commands: dict[str, tuple[str, str]],
             argv: Optional[Sequence[str]] = None) -> int:
    """`prog COMMAND ARGS...`: imports only the module that serves COMMAND and runs its `main(ARGS)`.

    `commands` maps a name to ('package.module:function', one-line help). Each command
    builds its own parser (with prog `prog COMMAND`), so commands live in their own modules.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog=prog, description=description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog='commands:\n'
                                         + '\n'.join(f'  {n:<10}{h}' for n, (_, h) in commands.items())
                                         + f'\n\n`{prog} COMMAND --help` for the arguments of each.')
        parser.add_argument('command', choices=list(commands), metavar='COMMAND')
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv[:1])  # --help prints help (exit 0); an unknown command is a usage error (exit 2)
        return 2
    target, _ = commands[argv[0]]
    return resolve(target)(argv[1:])


def resolve(target: str) -> Callable:
    """'package.module:function', imported now."""
    module, function = target.split(':')
    return getattr(importlib.import_module(module), function)


def say(message: str) -> None:
    """A note or progress line for the person at the terminal: stderr, so stdout stays the command's output."""
    print(message, file=sys.stderr)
