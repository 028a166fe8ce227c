"""Every DVC stage depends on the project code it runs: the ``ptame`` modules its script imports,
directly or through other ``ptame`` modules (lazy imports inside functions included), so that a
change to how maps are made re-runs the stages that use them instead of keeping stale results."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from ptame.maps import MapSettings

ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    """``ptame.a.b`` -> ``ptame/a/b.py`` or ``ptame/a/b/__init__.py`` (``None``: not a project module)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(path: Path) -> set[str]:
    """Dotted names of the ``ptame`` modules (and ``_stage``) one file imports anywhere in its body."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]) if path.name != "__init__.py" else ".".join(
        path.relative_to(ROOT).parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from ptame import explainer`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ptame."):
            names.add(node.value)  # importlib.import_module("ptame.batch") (ptame.cli's subcommands)
    wanted = set()
    for name in names:
        if name == "_stage":
            wanted.add("pipelines._stage")
        elif name.split(".")[0] == "ptame" and _module_file(name) is not None:
            parts = name.split(".")
            wanted.update(".".join(parts[: i + 1]) for i in range(len(parts)))  # parents' __init__ run first
    return wanted


def code_closure(script: Path) -> set[str]:
    """The project files (relative paths) that running ``script`` can execute."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(p for name in _imported(path) if (p := _module_file(name)) is not None)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_the_walker_follows_lazy_and_relative_imports() -> None:
    train = code_closure(ROOT / "pipelines/train.py")
    assert {"pipelines/_stage.py", "ptame/train/__init__.py", "ptame/train/worker.py", "ptame/explainer.py", "ptame/head.py",
            "ptame/__init__.py"} <= train
    assert "ptame/metrics/common.py" in code_closure(ROOT / "ptame/metrics/road.py")  # `from .common import ...`
    assert "ptame/serve.py" not in train


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_each_stage_depends_on_every_project_file_it_runs(stage: str) -> None:
    spec = _stages()[stage]
    script = spec["cmd"].split()[-1]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    missing = sorted(p for p in code_closure(ROOT / script) if not _covered(p, deps))
    assert not missing, f"dvc.yaml: stage {stage!r} runs {missing} but does not list them under deps"


def test_map_settings_retrain_and_reach_the_maps_stage() -> None:
    """The head is trained on the explained maps (``train.loss.maps``), so a map setting retrains; the maps stage applies it."""
    stages = _stages()
    train_params = stages["train"]["params"]
    assert "model" not in train_params  # not the whole section: model settings that change nothing learned stay out
    for key in (f"model.{f.name}" for f in fields(MapSettings)):  # a new map setting must reach both stages
        assert key in train_params and key in stages["maps"]["params"]
