"""The project's layering: command-line scripts share code through the package, never by importing each other,
and the torch-only package modules import no MMDetection."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "tools").rglob("*.py"))


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Top-level package names a file imports (with ``top_level_only``, only at module level: imports inside
    functions run only when that function is called)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_another_script():
    stems = {p.stem for p in SCRIPTS}
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & stems) for p in SCRIPTS}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_torch_only_modules_import_no_mmdetection_at_module_level():
    torch_only = [
        ROOT / "projects/tokenprune/benchmarking.py",
        *sorted((ROOT / "projects/tokenprune/models").rglob("*.py")),
    ]
    heavy = {"mmdet", "mmengine", "mmcv"}
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p, top_level_only=True) & heavy) for p in torch_only}
    assert {k: v for k, v in offenders.items() if v} == {}


OUTSIDE = ("METHODS.md", "STACK.md", "../shared")  # notes beside the repository, not in it
CHECKED = ("README.md", "setup.py", "pyproject.toml", "docs", "configs", "projects", "tools", "tests", "requirements")


def test_docs_and_code_cite_no_file_outside_the_repository():
    """The project's docs carry their own method facts: no text file of the README, docs/, configs/, projects/,
    tools/, tests/ or requirements/ points to notes outside the repository."""
    files = [p for name in CHECKED for p in ([ROOT / name] if (ROOT / name).is_file() else (ROOT / name).rglob("*"))]
    assert {"docs", "configs"} <= {p.relative_to(ROOT).parts[0] for p in files}
    this = Path(__file__).resolve()
    offenders = {}
    for p in files:
        if p == this or not p.is_file() or "__pycache__" in p.parts:
            continue
        data = p.read_bytes()
        if b"\0" in data[:8192]:  # binary (images)
            continue
        cited = [s for s in OUTSIDE if s in data.decode(errors="ignore")]
        if cited:
            offenders[str(p.relative_to(ROOT))] = cited
    assert offenders == {}


def test_no_reducer_method_file_imports_another():
    """Shared reducer code lives in the shared files (base, toolkit, gated, gates, merging, windowed,
    sparse_train): a method file (the module of a registered reducer) imports none of the other method files."""
    from tokenprune.models.reducers import REDUCERS

    folder = ROOT / "projects/tokenprune/models/reducers"
    methods = {cls.__module__.rsplit(".", 1)[1] for cls in REDUCERS.values()}
    assert methods <= {p.stem for p in folder.glob("*.py")}
    offenders = {}
    for stem in sorted(methods):
        tree = ast.parse((folder / f"{stem}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokenprune.models."):
                imported.add(node.module.rsplit(".", 1)[1])
        if imported & (methods - {stem}):
            offenders[stem] = sorted(imported & (methods - {stem}))
    assert offenders == {}
