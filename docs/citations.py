"""Code citations in docs/*.md: found by the quoted code and its symbol, line anchors regenerated.

A citation is a link to a line of a Python file with the symbol it lives in as the
link's title, followed by the quoted code in backticks:

    [L42](../vit_jax/model.py#L42 "EncoderBlock.__call__") `x = x + y`

The symbol is a dotted path of classes and functions (`Attention.__call__`), or a
module-level name (`TORCH_LAYOUT`). Where the quote appears more than once inside the
symbol, `#k` picks the k-th (`"EncoderBlock.__call__#2"`). The line number is derived
data: `python docs/citations.py` (`make docs-links`) rewrites every `L42` to the line
that holds the quote now, and changes nothing on an unchanged tree; `--check` only
reports, and `tests/test_docs.py` fails on a quote that no longer exists in its file or
symbol, and on an anchor that `make docs-links` would move.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
CITE = re.compile(r'\[L(?P<shown>\d+)\]\(\.\./(?P<path>[\w/.]+)#L(?P<anchor>\d+) '
                  r'"(?P<symbol>[\w.]+)(?:#(?P<nth>\d+))?"\)'
                  r'(?P<gap>\s*)`(?P<code>[^`]+)`')
# A link to a line that does not name its symbol: an old-style citation, always a problem.
BARE = re.compile(r'\[L\d+\]\(\.\./[\w/.]+#L\d+\)')


@dataclasses.dataclass
class Citation:
    doc: str
    path: str
    symbol: str
    nth: Optional[int]  # which occurrence inside the symbol; None: the quote must be unique there
    code: str
    anchor: int
    line: Optional[int] = None  # where the quote is now, when found
    problem: Optional[str] = None  # why it cannot be found

    def where(self) -> str:
        return f'docs/{self.doc}: {self.path} {self.symbol}{f"#{self.nth}" if self.nth else ""} `{self.code}`'


def _spans(tree: ast.Module) -> dict[str, tuple[int, int]]:
    """Every class, function and module-level assignment by dotted name: its first and last line."""
    spans = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                spans[name] = (child.lineno, child.end_lineno)
                visit(child, name + '.')
            elif prefix == '' and isinstance(child, (ast.Assign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        spans[t.id] = (child.lineno, child.end_lineno)

    visit(tree, '')
    return spans


_SOURCES: dict[Path, tuple[list[str], dict[str, tuple[int, int]]]] = {}


def _source(path: Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    if path not in _SOURCES:
        text = path.read_text()
        _SOURCES[path] = text.splitlines(), _spans(ast.parse(text))
    return _SOURCES[path]


def locate(c: Citation) -> Citation:
    """Fills in `c.line`, or `c.problem` when the file, the symbol or the quote cannot be found."""
    path = REPO / c.path
    if not path.is_file():
        c.problem = f'{c.path} does not exist'
        return c
    lines, spans = _source(path)
    quote = c.code.strip()
    if not any(quote in line for line in lines):
        c.problem = f'`{c.code}` no longer exists anywhere in {c.path}'
        return c
    if c.symbol not in spans:
        c.problem = f'{c.path} has no symbol {c.symbol}'
        return c
    first, last = spans[c.symbol]
    hits = [n for n in range(first, last + 1) if quote in lines[n - 1]]
    if len(hits) < (c.nth or 1):
        c.problem = f'`{c.code}` is not in {c.symbol} (lines {first} to {last}) {c.nth or 1} time(s); it is on ' \
                    f'line(s) {[k + 1 for k, line in enumerate(lines) if quote in line]}'
    elif len(hits) > 1 and c.nth is None:
        c.problem = f'`{c.code}` is in {c.symbol} {len(hits)} times (lines {hits}); name the one with #k'
    else:
        c.line = hits[(c.nth or 1) - 1]
    return c


def _citation(doc: Path, m: re.Match) -> Citation:
    c = Citation(doc.name, m['path'], m['symbol'], int(m['nth']) if m['nth'] else None, m['code'], int(m['anchor']))
    if m['shown'] != m['anchor']:
        c.problem = f'link text L{m["shown"]} points at #L{m["anchor"]}'
        return c
    return locate(c)


def citations(doc: Path) -> list[Citation]:
    """Every citation of one doc, located, in order."""
    return [_citation(doc, m) for m in CITE.finditer(doc.read_text())]


def problems(doc: Path) -> list[str]:
    """What is wrong with one doc's citations: missing code or symbols, stale anchors, bare links."""
    cited = citations(doc)
    found = [f'{c.where()}: {c.problem}' for c in cited if c.problem]
    found += [f'{c.where()}: anchored at L{c.anchor}, the code is on L{c.line}; run `make docs-links`'
              for c in cited if not c.problem and c.line != c.anchor]
    found += [f'docs/{doc.name}: {m.group(0)} names no symbol; write [L..](../FILE#L.. "Symbol") `code`'
              for m in BARE.finditer(doc.read_text())]
    return found


def rewrite(doc: Path) -> tuple[str, list[str]]:
    """The doc with every locatable anchor set to its quote's line, and the citations that could not be."""
    bad = []

    def fix(m: re.Match) -> str:
        c = locate(Citation(doc.name, m['path'], m['symbol'], int(m['nth']) if m['nth'] else None, m['code'],
                            int(m['anchor'])))
        if c.problem:
            bad.append(f'{c.where()}: {c.problem}')
            return m.group(0)
        nth = f'#{m["nth"]}' if m['nth'] else ''
        return f'[L{c.line}](../{m["path"]}#L{c.line} "{m["symbol"]}{nth}"){m["gap"]}`{m["code"]}`'

    return CITE.sub(fix, doc.read_text()), bad


def main(argv: list[str]) -> int:
    """`python docs/citations.py [--check]`: rewrite (or only check) the anchors of every docs/*.md."""
    check = '--check' in argv
    failed = []
    for doc in sorted(DOCS.glob('*.md')):
        if check:
            failed += problems(doc)
            continue
        text, bad = rewrite(doc)
        failed += bad
        failed += [f'docs/{doc.name}: {m.group(0)} names no symbol' for m in BARE.finditer(text)]
        if text != doc.read_text():
            doc.write_text(text)
            print(f'docs-links: re-anchored docs/{doc.name}')
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
