"""The package's layers only point down: a module imports (at the top or inside a function) only from its own
layer or the ones below. The layers, bottom to top:

0 foundation: errors, io (atomic writes, recorded settings), storage (paths and object-store URIs), config, console,
  tracking, weights, cluster (the Ray connection)
1 models: models/, losses/, sampling, checkpoint (the file formats build models)
2 data: data/
3 eval: eval/ (metrics over data and models)
4 train: train/ (stages, loop, sessions, engines)
5 pipelines: pipelines/ (offline jobs over datasets)
6 tune: tune/ (sweeps over trainings and pipelines)
7 top: pipeline (the chain of stages), cli (the jobs' shared handling); jobs/ sit above the package
"""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ideal_ray")
LAYERS = {
    "errors": 0, "io": 0, "storage": 0, "config": 0, "console": 0, "tracking": 0, "weights": 0, "cluster": 0,
    "models": 1, "losses": 1, "sampling": 1, "checkpoint": 1,
    "data": 2, "eval": 3, "train": 4, "pipelines": 5, "tune": 6,
    "pipeline": 7, "cli": 7,
}


def _layer(module: str) -> int:
    """The layer of ``ideal_ray.x[.y]`` by its first component below the package."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__init__":
        return -1  # the package itself: nothing to check
    assert parts[1] in LAYERS, f"{module}: a new top-level module or package; give it a layer in {__file__}"
    return LAYERS[parts[1]]


def _modules():
    for folder, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(path: str):
    """Every ``ideal_ray`` module ``path`` imports, top-level or lazy (inside functions), with its line."""
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ideal_ray":
                yield from ((f"ideal_ray.{a.name}", node.lineno) for a in node.names)
            elif node.module.startswith("ideal_ray."):
                yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.startswith("ideal_ray."))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: a relative import; write it absolute")


def test_every_import_points_down_or_sideways():
    up = []
    for module, path in _modules():
        here = _layer(module)
        for target, line in _imports(path):
            if _layer(target) > here:
                up.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line}: {module} (layer {here}) imports "
                          f"{target} (layer {_layer(target)})")
    assert not up, "imports that run up the layers:\n" + "\n".join(up)


def test_the_walk_sees_lazy_imports():
    """The walk is not blind to imports inside functions (how most of the package imports heavy code)."""
    found = dict(_imports(os.path.join(ROOT, "checkpoint.py")))
    assert "ideal_ray.models.tokenizer" in found  # imported inside load functions only
