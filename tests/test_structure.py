"""The shape of the code, checked: no import circle between streamprune's modules (counting imports
inside functions too), and no function longer than about a screen, except the CLI's declarative
option lists."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamprune"
MAX_FUNCTION_LINES = 80
DECLARATIVE = {("run.py", "run"), ("plan.py", "plan_command")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """streamprune modules that `path` imports, anywhere in it."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("streamprune")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("streamprune"):
                continue
            for alias in node.names:  # `from . import buffers` imports a module, not a name
                candidate = f"{base}.{alias.name}"
                path_of = PACKAGE.parent / candidate.replace(".", "/")
                is_module = path_of.with_suffix(".py").exists() or (path_of / "__init__.py").exists()
                found.add(candidate if is_module else base)
    return found - {name}


def test_no_import_circles():
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    # the package face imports its public names; nothing inside imports the face back
    assert not [m for m, deps in graph.items() if "streamprune" in deps and m != "streamprune.__main__"]
    graph.pop("streamprune")
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if dep not in graph:
                continue
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_function_over_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (path.name, node.name) not in DECLARATIVE:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over a screen: " + ", ".join(long)


def test_the_method_registry_is_the_only_place_a_method_is_named():
    """Outside methods/, no code compares a method's name: it asks the method."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                names = [s.attr if isinstance(s, ast.Attribute) else getattr(s, "id", None) for s in sides]
                if "method" in names and any(isinstance(s, ast.Constant) for s in sides):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


MAX_FILE_LINES = 600
MAX_CLASS_LINES = 250


def test_no_file_or_class_out_of_proportion():
    """A file holds one idea and a class one job: past these sizes, they hold several."""
    large = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        if source.count("\n") > MAX_FILE_LINES:
            large.append(f"{path.relative_to(PACKAGE)} ({source.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                large.append(f"{path.relative_to(PACKAGE)}:{node.lineno} class {node.name}")
    assert not large, "out of proportion: " + ", ".join(large)


def test_the_run_settings_are_never_written_after_construction(tmp_path):
    """PruneConfig and its groups are frozen: what a run decides for itself is returned by its setup
    steps, not written back into the user's settings."""
    import dataclasses

    import pytest

    from streamprune.config import GROUPS, PruneConfig

    config = PruneConfig.from_flags("m", tmp_path / "out", nsamples=4, reconstruct=True, reconstruct_lr=0.5)
    assert config.calibration.nsamples == 4 and config.reconstruction.lr == 0.5
    for group in ("model", *GROUPS):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, group, None)
    for group in GROUPS:
        field = dataclasses.fields(getattr(config, group))[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(config, group), field, None)
    # the record names each setting by its flag
    assert config.as_record()["reconstruct_lr"] == 0.5 and config.as_record()["out"] == str(tmp_path / "out")
    with pytest.raises(TypeError, match="nsample"):
        PruneConfig.from_flags("m", tmp_path, nsample=4)
