"""The docs run as written: every ```bash block of docs/*.md, every code line they cite is where they say,
and every relative link of README.md and docs/*.md points at a file that exists.

The blocks run in file order and, within a file, top to bottom, in one temporary working
directory (a later block may use what an earlier one made), each in its own
`bash -eo pipefail` with the repo on PYTHONPATH and `python` the interpreter running the tests.
Blocks fenced as ```shell need a download and are not run.

Code citations name the quoted code and its symbol (`docs/citations.py`):
[L42](../vit_jax/model.py#L42 "EncoderBlock.__call__") followed by the code in backticks. The
quote must still be in that symbol, and the line anchor must be where it is now, which
`make docs-links` keeps true.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location('citations', REPO / 'docs' / 'citations.py')
citations = sys.modules['citations'] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(citations)

DOCS = sorted((REPO / 'docs').glob('*.md'))
BASH = re.compile(r'^```bash\n(.*?)^```', re.M | re.S)


def blocks() -> list[tuple[str, int, str]]:
    """(doc name, block number, script) for every bash block, in order."""
    return [(doc.name, i, m.group(1)) for doc in DOCS for i, m in enumerate(BASH.finditer(doc.read_text()), 1)]


def test_docs_exist_and_hold_commands():
    assert DOCS, 'no docs/*.md'
    assert len(blocks()) >= 10


# Pages that work in a folder of their own and read nothing the other pages write: each block starts by
# going there. They run beside the others (the suite's longest test otherwise), the rest in order.
ON_THEIR_OWN = {'05-trained-digits.md': 'digits32', '06-your-own-images.md': 'own', 'errors-and-limits.md': 'errors',
                'harness.md': 'harness', 'training.md': 'training'}


def _run_blocks(page_blocks: list[tuple[str, int, str]], cwd: Path, env: dict) -> list[str]:
    """Each block in order; the failures, described (the first stops the page: later blocks need it)."""
    for name, i, script in page_blocks:
        proc = subprocess.run(['bash', '-eo', 'pipefail', '-c', script], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode:
            return [f'docs/{name}, bash block {i} exited {proc.returncode}:\n{script}\n'
                    f'--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}']
    return []


@pytest.mark.slow
def test_every_bash_block_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND='Agg',
               PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}')
    alone = [b for b in blocks() if b[0] in ON_THEIR_OWN]
    for name, i, script in alone:  # the promise that lets them run beside the others
        folder = ON_THEIR_OWN[name]
        assert script.startswith((f'cd {folder}\n', f'mkdir -p {folder} && cd {folder}\n')), (name, i)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        beside = pool.submit(_run_blocks, alone, tmp_path, env)
        failures = _run_blocks([b for b in blocks() if b[0] not in ON_THEIR_OWN], tmp_path, env)
        failures += beside.result()
    assert not failures, '\n\n'.join(failures)


LINK = re.compile(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
FENCE = re.compile(r'^```[^`\n]*\n.*?^```[ \t]*$', re.M | re.S)


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r'^#+\s+(.*)$', FENCE.sub('', page.read_text()), re.M)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


@pytest.mark.parametrize('doc', [REPO / 'README.md', *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(doc):
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading anchor
    (`page.md#section`) one of that page's headings; line anchors (#L42) are the citations' test's."""
    bad = []
    for target in LINK.findall(FENCE.sub('', doc.read_text())):
        if re.match(r'[a-z][a-z0-9+.-]*:', target):  # https:, mailto:: not ours to check offline
            continue
        path, _, anchor = target.partition('#')
        page = (doc.parent / path).resolve() if path else doc
        if not page.exists():
            bad.append(f'{target}: no such file')
        elif anchor and not re.fullmatch(r'L\d+', anchor) and page.suffix == '.md' and anchor not in _anchors(page):
            bad.append(f'{target}: {page.name} has no heading #{anchor}')
    assert not bad, f'{doc.name}: ' + '; '.join(bad)


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_cited_code_still_exists_in_its_symbol(doc):
    bad = [f'{c.where()}: {c.problem}' for c in citations.citations(doc) if c.problem]
    bare = citations.BARE.findall(doc.read_text())
    assert not bad and not bare, '\n'.join(bad + [f'{b} names no symbol' for b in bare])


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_line_anchors_are_current(doc):
    """`make docs-links` would change nothing: every anchor is the line its quote is on now."""
    text, _ = citations.rewrite(doc)
    assert text == doc.read_text(), '\n'.join(citations.problems(doc))


def test_a_quote_that_is_gone_fails(tmp_path):
    doc = tmp_path / 'page.md'
    doc.write_text('[L1](../vit_jax/model.py#L1 "Attention.__call__") `q = q * 2  # no such line`\n'
                   '[L1](../vit_jax/model.py#L1 "NoSuchClass") `B, N, D = x.shape`\n'
                   '[L1](../vit_jax/model.py#L1 "EncoderBlock.__call__") `x = x + DropPath(self.drop_path_rate`\n'
                   '[L1](../vit_jax/model.py#L1) `B, N, D = x.shape`\n')
    found = citations.problems(doc)
    assert any('no longer exists anywhere in vit_jax/model.py' in p for p in found), found
    assert any('has no symbol NoSuchClass' in p for p in found), found
    assert any('2 times' in p and 'name the one with #k' in p for p in found), found
    assert any('names no symbol' in p for p in found), found
    text, bad = citations.rewrite(doc)
    assert len(bad) == 3 and text == doc.read_text()  # nothing it cannot place is touched
