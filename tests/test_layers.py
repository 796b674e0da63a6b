"""The layers of docs/architecture.md, enforced: a module imports jaxlmc modules of its own layer or below, never
above (so no cycle can form across layers), and every module has its layer."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxlmc"

# Bottom to top; docs/architecture.md draws the same table.
LAYERS = {
    "foundation": ["registry", "lazy", "settings", "faults", "memory", "shard", "files", "manifest", "pair_sets",
                   "ckpt"],
    "models and data": ["models", "optimizers", "labels", "train", "loop", "tokens", "builders", "data", "hf_files",
                        "hf"],
    "engines": ["permute", "repair", "paths", "curves", "measures", "reference", "spec_check", "analysis", "merges",
                "decide", "grid", "stats", "interpolation", "planner", "trends"],
    "config and run directory": ["config", "config_doc", "lock", "layout", "rundir", "sizes", "size_axes", "tasks"],
    "library": ["trainer", "layerwise", "library", "noreturn", "verdicts", "calibration", "scaling"],
    "stages": ["pretraining", "finetuning", "barrier_stage", "refine", "soups", "similarity", "sharpness"],
    "report": ["figures", "figures_trends", "report", "report_scaling"],
    "study": ["study"],
    "front": ["ui", "api", "cli", "jaxlmc"],
}
LAYER_OF = {module: k for k, modules in enumerate(LAYERS.values()) for module in modules}


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[0] == "models":
        return "models"
    return "jaxlmc" if parts == ("__init__",) else parts[0]


def _imports(path: pathlib.Path) -> set[str]:
    """The jaxlmc modules `path` imports, lazily declared ones (jaxlmc.lazy.module("jaxlmc.…")) included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxlmc":
            sub = node.module.split(".")[1:]
            found.update([sub[0]] if sub else [alias.name for alias in node.names])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "module" and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("jaxlmc.")):
            found.add(node.args[0].value.split(".")[1])
    return found


def test_every_module_imports_only_its_own_layer_or_below():
    uphill = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        assert module in LAYER_OF, f"{module} has no layer: add it to LAYERS (and to docs/architecture.md)"
        for imported in _imports(path) - {module}:
            if LAYER_OF[imported] > LAYER_OF[module]:
                uphill.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not uphill, uphill


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
