"""The docs describe the product as it is: short enough to read, and free of the project's own history.

Who measured what and when, and how a fault was found, belong in git; docs and comments say what holds.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
CODE_DIRS = ("api", "service", "worker", "dpo_core", "dpo_client", "tests", "benchmarks")
PERFORMANCE_MAX_BYTES = 12_000

# Phrases that narrate how the project was made rather than what the product does.
NARRATION = re.compile(
    r"\bthis session\b|\b(?:earlier|previous|first|second|third|fourth|fifth) (?:session|box)\b"
    r"|\b(?:this|that|earlier|previous|first|second|third|fourth|fifth|next) round\b|\brounds of\b"
    r"|\bwe found\b|\bseen once\b|\bonce here\b|\bin one CI run\b|\bbefore the fix\b|\bbuild machine\b",
    re.IGNORECASE,
)


def _hits(path: Path, lines: list[tuple[int, str]]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{n + text.count(chr(10), 0, m.start())}: {m.group(0)!r}"
            for n, text in lines for m in NARRATION.finditer(text)]


def _comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a module, not of its other strings."""
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            out.append((body[0].lineno, body[0].value.value))
    return out


def test_performance_doc_stays_short():
    size = (REPO / "docs" / "performance.md").stat().st_size
    assert size < PERFORMANCE_MAX_BYTES, f"docs/performance.md is {size} bytes: keep the latest figures, drop history"


def test_no_doc_narrates_the_project_history():
    hits = [h for doc in DOCS for h in _hits(doc, list(enumerate(doc.read_text().splitlines(), 1)))]
    assert hits == []


def test_no_comment_or_docstring_narrates_the_project_history():
    hits = []
    for top in CODE_DIRS:
        for path in sorted((REPO / top).rglob("*.py")) if (REPO / top).is_dir() else ():
            hits += _hits(path, _comments_and_docstrings(path.read_text()))
    assert hits == []


def test_the_narration_check_catches_what_it_is_for():
    caught = ["measured this session", "on the earlier box", "the third round", "seen once in a test run",
              "In one CI run it hung", "before the fix it stalled", "on the 2-core build machine"]
    kept = ["rounded up to a multiple of 64", "three round trips", "round-robin", "a database session"]
    assert [bool(NARRATION.search(s)) for s in caught] == [True] * len(caught)
    assert [bool(NARRATION.search(s)) for s in kept] == [False] * len(kept)
    source = '"""Seen once here."""\nX = "this session"  # before the fix\n'
    assert [text for _, text in _comments_and_docstrings(source)] == ["# before the fix", "Seen once here."]
