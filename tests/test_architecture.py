"""The layout's rules, checked on every run: dependencies point one way, imports sit at module top unless a
comment gives the measured reason, shared utilities exist once, and modules stay small."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "basemodel", "convlog", "classifier", "adapters", "training", "router", "loop", "cli")
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "router/v1" not in p.as_posix())


def test_import_contracts_hold():
    """import-linter: cli -> router | training -> classifier | adapters | convlog | basemodel -> core; no cycles."""
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "broken" not in r.stdout.split("Contracts:")[-1].replace("0 broken", "")


def _lazy_reason(lines: list[str], node: ast.stmt) -> bool:
    """An in-function import is fine when its block of imports carries a `# lazy: <reason>` comment: on one of
    its lines, or on the line right above the block."""
    i = node.lineno - 1
    while i > 0 and re.match(r"\s*(import |from \S+ import )", lines[i - 1]):
        i -= 1
    block = lines[i:node.end_lineno]
    return any("# lazy" in line for line in block) or (i > 0 and lines[i - 1].strip().startswith("# lazy:"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_at_module_top_unless_a_reason_is_given(path):
    src = path.read_text()
    lines = src.splitlines()
    bad = []
    for fn in ast.walk(ast.parse(src)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not _lazy_reason(lines, node):
                    bad.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "imports inside functions need a `# lazy: <measured reason>` comment:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_modules_stay_small(path):
    n = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert n <= MAX_LINES or "Long module:" in doc, \
        f"{path.name} has {n} lines: split it, or say why it is one module in its docstring ('Long module: ...')"


def test_shared_utilities_exist_once():
    """One sha256 of a file, one atomic write (os.replace), one env-var reader: all in core."""
    found: dict[str, list[str]] = {"def sha256_file": [], "os.replace(": [], "os.environ.get(": [], "os.getenv(": []}
    for path in _modules():
        text = path.read_text()
        for needle in found:
            if needle in text:
                found[needle].append(path.relative_to(ROOT).as_posix())
    assert found["def sha256_file"] == ["core/files.py"]
    assert found["os.replace("] == ["core/files.py"]
    # the SDK reads its token variable itself: it must import nothing but grpc and the stubs (client-only install)
    assert found["os.environ.get("] + found["os.getenv("] == ["core/envs.py", "router/client.py"]
