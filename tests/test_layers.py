"""The import graph and the size of the parts: every module imports only its own layer or the layers below,
nothing is circular, recipes import no recipe, no module imports another's private names, only recipes and the
cli see the whole Config, and no module or function outgrows what a reader holds in their head.

Layers, bottom up (docs/architecture.md): plain parts, storage and data, model parts and the training
engine, tasks, a run's files and shared steps, the scoring pipeline, recipes, the command line and the benchmarks,
the job entry points. Run `python -m pytest tests/test_layers.py` to check a change.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    ("binllm.config", "binllm.cache", "binllm.codes", "binllm.metrics", "binllm.blend", "binllm.ray_env",
     "binllm.paper_rows"),
    ("binllm.storage", "binllm.assets", "binllm.plots", "binllm.data", "binllm.tracking"),
    ("binllm.prompts", "binllm.candidates", "binllm.llm", "binllm.train"),
    ("binllm.encoder", "binllm.tune"),
    ("binllm.sources", "binllm.prompt_spec", "binllm.run_steps", "binllm.evaluation"),
    ("binllm.pipeline",),
    ("binllm.recipes",),
    ("binllm.cli", "binllm.benchmarks"),
    ("jobs",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for top in ("binllm", "jobs") for p in (REPO / top).rglob("*.py")}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
SEES_WHOLE_CONFIG = ("binllm.config", "binllm.recipes", "binllm.cli", "binllm.benchmarks", "jobs")


def imports(name: str) -> set[str]:
    """Project modules imported by `name` (`from pkg import sub` counts as pkg.sub when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m.split(".")[0] in ("binllm", "jobs") and m in MODULES}


def layer(name: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"module {name} is in no layer: add it to LAYERS (and docs/architecture.md)")


def test_every_module_has_a_layer():
    assert len(MODULES) > 40
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(name):
    upward = sorted(m for m in imports(name) if layer(m) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports {upward} from above"


def test_job_entry_points_import_no_other_job():
    for name in MODULES:
        if name.startswith("jobs."):
            others = sorted(m for m in imports(name) if m.startswith("jobs"))
            assert not others, f"{name} imports the job modules {others}"


def test_no_import_cycles():
    graph = {name: imports(name) - {name} for name in MODULES}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_job_entry_points_are_thin():
    for path in (REPO / "jobs").glob("*.py"):
        assert len(path.read_text().splitlines()) < 40, f"{path.name} has grown past 40 lines"


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text())


def test_recipes_import_no_recipe():
    for name in MODULES:
        if name.startswith("binllm.recipes.") or name.startswith("binllm.benchmarks"):
            recipes = sorted(m for m in imports(name) if m.startswith("binllm.recipes.") and m != name)
            assert not recipes, f"{name} imports the recipes {recipes}: move what they share into the library"


def test_no_module_imports_another_modules_private_names():
    for name in MODULES:
        for node in ast.walk(_tree(name)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("binllm", "jobs"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{name} imports private names {private} from {node.module}"


def test_only_recipes_and_the_cli_see_the_whole_config():
    """Library parts get the config sections they use (DataConfig, TuneConfig, RunLayout, ...), not Config."""
    for name in MODULES:
        if name.startswith(SEES_WHOLE_CONFIG):
            continue
        for node in ast.walk(_tree(name)):
            if isinstance(node, ast.ImportFrom) and node.module == "binllm.config":
                assert "Config" not in [a.name for a in node.names], f"{name} imports the whole Config"


def test_no_module_or_function_outgrows_a_reader():
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (at most {MAX_MODULE_LINES})"
        for node in ast.walk(_tree(name)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, \
                    f"{name}.{node.name} has {length} lines (at most {MAX_FUNCTION_LINES})"
