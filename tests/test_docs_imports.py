"""The names the README and docs/ show users import, from the paths they show, without a
deprecation warning (old module paths forward for one release but the docs use the new ones)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
IMPORT = re.compile(r"^\s*(from lightning_ncnnqat[\w.]* import [\w, ]+|import lightning_ncnnqat[\w.]*)", re.M)


def _doc_imports() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for m in IMPORT.finditer(doc.read_text()):
            found.append((doc.name, m.group(1).strip().rstrip(",")))
    return found


def test_the_docs_show_imports() -> None:
    names = {doc for doc, _ in _doc_imports()}
    assert "README.md" in names and len(_doc_imports()) >= 4


def test_every_documented_import_works_without_deprecation() -> None:
    """One child process (a fresh interpreter, as a user's script) tries every line."""
    lines = sorted({line for _, line in _doc_imports()})
    code = (
        "import json, sys, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "bad = {}\n"
        "for line in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        exec(line, {})\n"
        "    except Exception as e:\n"
        "        bad[line] = repr(e)\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(lines)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-1500:]
    bad = json.loads(out.stdout.strip().splitlines()[-1])
    where = {line: doc for doc, line in _doc_imports()}
    assert bad == {}, {f"{where[k]}: {k}": v for k, v in bad.items()}
