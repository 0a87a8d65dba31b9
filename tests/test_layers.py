"""The package's layers: no module imports one of a higher layer (errors -> model_files ->
config_checks -> ... -> data -> retrieval -> sampling / prompts -> llm / train -> rank -> report
-> pipeline -> cli), read from the source's imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "recranker_jax"
# Lowest first; modules in one entry may import each other.
LAYERS = [
    {"errors"}, {"signals"}, {"run_lock"}, {"model_files"}, {"config_checks"}, {"run"}, {"config"}, {"config_keys"}, {"hardware", "metrics", "instruments"}, {"parallel"},
    {"data"}, {"retrieval"}, {"sampling", "prompts"}, {"llm"}, {"train"}, {"rank"}, {"report", "plan", "compile"},
    {"pipeline", "launch_check"}, {"bench"}, {"cli"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def top_level(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "recranker_jax" and len(parts) > 1 else None


def test_every_module_of_the_package_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert names == set(LEVEL), names ^ set(LEVEL)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        importer = top_level(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if importer not in LEVEL:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                       [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                imported = top_level(module)
                if imported in LEVEL and LEVEL[imported] > LEVEL[importer]:
                    upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward, upward
