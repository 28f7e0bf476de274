"""The docs run as written: every ```bash block of docs/*.md, and every code line they cite is where they say.

The blocks run in file order and, within a file, top to bottom, in one temporary working
directory (a later block may use what an earlier one made), each in its own
`bash -eo pipefail` with the repo on PYTHONPATH and `python` the interpreter running the tests.
Blocks fenced as ```shell need a download and are not run.

Code citations are links of the form [L42](../vit_jax/model.py#L42) followed by the quoted
code in backticks; the quote must be on that line, so the walk-through cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCS = sorted((REPO / 'docs').glob('*.md'))
BASH = re.compile(r'^```bash\n(.*?)^```', re.M | re.S)
CITE = re.compile(r'\[L(\d+)\]\(\.\./([\w/.]+)#L(\d+)\)\s*`([^`]+)`')


def blocks() -> list[tuple[str, int, str]]:
    """(doc name, block number, script) for every bash block, in order."""
    return [(doc.name, i, m.group(1)) for doc in DOCS for i, m in enumerate(BASH.finditer(doc.read_text()), 1)]


def test_docs_exist_and_hold_commands():
    assert DOCS, 'no docs/*.md'
    assert len(blocks()) >= 10


def test_every_bash_block_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND='Agg',
               PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}')
    for name, i, script in blocks():
        proc = subprocess.run(['bash', '-eo', 'pipefail', '-c', script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f'docs/{name}, bash block {i} exited {proc.returncode}:\n{script}\n'
                                      f'--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}')


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_cited_lines_hold_the_quoted_code(doc):
    for shown, path, anchor, code in CITE.findall(doc.read_text()):
        assert shown == anchor, f'{doc.name}: link text L{shown} points at #L{anchor}'
        lines = (REPO / path).read_text().splitlines()
        n = int(anchor)
        assert n <= len(lines) and code.strip() in lines[n - 1], (
            f'{doc.name}: {path}:{n} no longer holds `{code}`; it is on line(s) '
            f'{[k + 1 for k, line in enumerate(lines) if code.strip() in line] or "none"}')
