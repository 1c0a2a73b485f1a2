"""More unlabelled English text for KD recovery: first paragraphs of the docstrings of every
installed package (parsed with ``ast``, nothing imported), plus the ``stdlib-docs`` training
split; the ``stdlib-docs`` held-out split is never included, so scores on it stay held out.

    python benchmarks/docstring_corpus.py OUT.jsonl   # one {"text": ...} per line
"""

from __future__ import annotations

import ast
import json
import random
import site
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _first_paragraph(doc: str) -> str | None:
    """As stdlib-docs does, skipping doctest examples and lines that start with code or markup."""
    from plugins.data import first_paragraph

    sentence = None if ">>>" in doc[:200] else first_paragraph(doc)
    return sentence if sentence and sentence[0].isalpha() else None


def package_docstrings(roots: list[Path]) -> list[str]:
    """Public module / class / function docstrings under ``roots``, deduplicated, file order."""
    seen, out = set(), []
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if not isinstance(node, ast.Module) and node.name.startswith("_"):
                continue
            sentence = _first_paragraph(ast.get_docstring(node) or "")
            if sentence and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def write_corpus(out: Path, seed: int = 0) -> int:
    """Write the corpus (shuffled, fixed seed) as JSON lines; returns the number of sentences."""
    from plugins.data import stdlib_docs, stdlib_docs_texts

    stdlib = set(stdlib_docs_texts()[0])
    extra = [s for s in package_docstrings([Path(p) for p in site.getsitepackages()]) if s not in stdlib]
    texts = list(stdlib_docs().train.inputs) + extra
    random.Random(seed).shuffle(texts)
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return len(texts)


if __name__ == "__main__":
    print(write_corpus(Path(sys.argv[1])), "sentences")
