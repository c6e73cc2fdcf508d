"""Which package may import which: ``server.cluster`` builds on ``server.service`` and
never the reverse, so the single server neither imports the cluster nor sits in an
import circle with it (a function-level import hides one from a plain import check,
hence the scan of every import statement)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement in ``path`` names, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_service_module_imports_the_cluster():
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(name for name in imported_modules(path)
                                                 if name.startswith("server.cluster"))
        for path in sorted((REPO_ROOT / "server" / "service").glob("*.py"))}
    assert not {path: names for path, names in offenders.items() if names}


def test_importing_the_single_server_loads_nothing_of_the_cluster():
    check = ("import sys, server.service.app, server.serve_cmd; "
             "loaded = sorted(m for m in sys.modules if m.startswith('server.cluster')); "
             "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, check=True, timeout=120)
