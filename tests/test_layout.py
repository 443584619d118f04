"""The package's layering, read from the source with `ast`: no import cycle, and each layer
imports only from itself and the layers below it (README "Design")."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fqgan_jax"

# Lowest first. A module's top-level imports may reach its own rank or lower; config_lib's
# lazy lookups of the teacher registry are the one upward reach (they are inside functions).
RANKS = {
    "xla_flags": 0, "atomic_file": 0, "config_lib": 0, "sharding": 0,
    "data": 1, "quantizers": 1,
    "models": 2, "frozen": 2,
    "architecture": 3, "checkpointing": 3, "materialize": 4,
    "objectives": 4, "eval": 4,
    "training": 5,
    "inference": 6, "tools": 6, "main": 6, "run_log": 6, "__init__": 6,
}
# The rule, kept as its own check: what serves eval and inference never needs training.
NEVER_IMPORT_TRAINING = ("eval", "inference", "frozen")


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported fqgan_jax module, whether at module level) for every import in `name`."""
    tree = ast.parse(MODULES[name].read_text())
    top_level = {id(node) for node in tree.body}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import module` imports the module; `from module import name` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        found += [(target, id(node) in top_level) for target in targets
                  if target.split(".")[0] == "fqgan_jax" and target != name]
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert {_layer(m) for m in MODULES} <= RANKS.keys(), "add the new module to RANKS"


def test_no_import_cycle():
    graph = {name: {t for t, _ in _imports(name) if t in MODULES} for name in MODULES}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_import_only_downwards(name):
    upward = [target for target, top_level in _imports(name)
              if top_level and RANKS[_layer(target)] > RANKS[_layer(name)]]
    assert not upward, f"{name} (layer {_layer(name)}) imports the higher layer(s) {upward}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _layer(m) in NEVER_IMPORT_TRAINING))
def test_eval_inference_and_frozen_never_import_training_or_objectives(name):
    assert not [target for target, _ in _imports(name)
                if _layer(target) in ("training", "objectives")]


def test_the_checks_see_imports():
    """The walk finds what a module imports, whichever form the import takes."""
    loop_imports = {target for target, _ in _imports("fqgan_jax.training.loop")}
    assert {"fqgan_jax.training.build", "fqgan_jax.eval.evaluate",
            "fqgan_jax.checkpointing"} <= loop_imports
