import ast
import importlib
import pathlib
import re

import idefics2


def test_every_export_resolves_even_after_submodule_imports():
    for module in {m for m in idefics2._EXPORTS.values()}:
        importlib.import_module(module)  # importing a submodule must not shadow an exported name
    for name in idefics2.__all__:
        assert getattr(idefics2, name) is not None
    assert callable(idefics2.pipeline)


def test_package_never_imports_the_oracle_or_pickle():
    src = pathlib.Path(idefics2.__file__).parent
    forbidden = re.compile(r"^\s*(import|from)\s+(transformers|peft|pickle)\b|torch\.load\(", re.M)
    offenders = [str(p) for p in src.rglob("*.py") if forbidden.search(p.read_text())]
    assert offenders == []


# ------------------------------------------------------------------------------------- import structure
SRC = pathlib.Path(idefics2.__file__).parent

# Imports between top-level packages that close a loop and are allowed (importer module, imported module).
ALLOWED_EDGES = {
    # The quantized layer builds on modeling's lowest modules, which sit below quantization/ while
    # modeling/model.py sits above it (README, Layout): a loop between the packages, not between modules.
    ("idefics2.quantization.layer", "idefics2.modeling.kernels"),
    ("idefics2.quantization.layer", "idefics2.modeling.attention"),
    ("idefics2.quantization.layer", "idefics2.modeling.ckernels"),
    # LoRA layers sit where the quantized layer does: on modeling's products and activations, below
    # modeling/model.py (which loads adapters).
    ("idefics2.lora", "idefics2.modeling.attention"),
}


def _module_name(path: pathlib.Path) -> str:
    parts = ["idefics2", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = SRC.joinpath(*name.split(".")[1:])
    return relative.with_suffix(".py").is_file() or (relative / "__init__.py").is_file()


def _package_imports() -> dict[str, set[str]]:
    """Every module of the package -> the idefics2 modules it imports, at the top or inside functions
    (`from idefics2.x import y` names idefics2.x.y when y is a module, else idefics2.x)."""
    imports = {}
    for path in sorted(SRC.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . / from ..x
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    found.add(submodule if _is_module(submodule) else base)
        imports[name] = {m for m in found if m == "idefics2" or m.startswith("idefics2.")}
    return imports


def _top(module: str) -> str:
    """The top-level package or module a module belongs to: idefics2.serving.engine -> serving."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "idefics2"


def test_the_import_scanner_sees_imports_inside_functions():
    imports = _package_imports()
    assert "idefics2.integrations.ray" in imports["idefics2.cli.batch"]  # inside a function
    assert "idefics2.serving.batch" in imports["idefics2.cli.batch"]  # inside `run`
    assert "idefics2.loading" in imports["idefics2.modeling.model"]  # `from idefics2 import loading`


def test_only_the_cli_imports_the_cli_and_the_integrations():
    wrong = sorted(
        (module, imported)
        for module, imported_modules in _package_imports().items()
        for imported in imported_modules
        if _top(imported) in ("cli", "integrations") and _top(module) not in ("cli", _top(imported))
    )
    assert wrong == []


def test_no_import_loop_between_top_level_packages():
    imports = _package_imports()
    assert all(imported in imports[module] for module, imported in ALLOWED_EDGES)  # none is stale
    graph: dict[str, set[str]] = {}
    for module, imported_modules in imports.items():
        for imported in imported_modules:
            if _top(module) != _top(imported) and (module, imported) not in ALLOWED_EDGES:
                graph.setdefault(_top(module), set()).add(_top(imported))
    done: set[str] = set()

    def loop_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for after in sorted(graph.get(node, ())):
            found = loop_from(after, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    loops = [loop for node in sorted(graph) if (loop := loop_from(node, []))]
    assert loops == [], " -> ".join(loops[0])


def test_the_model_code_imports_no_training_and_the_decode_core_no_model_code():
    """modeling imports nothing of training (LoRA adapters are idefics2.lora, below both), nothing inside a
    function of generation or training; the decode core imports nothing of modeling (it drives the model
    through its public methods), so `model.generate` closes no loop."""
    imports = _package_imports()
    assert not any(
        _top(i) == "training" for m, found in imports.items() if _top(m) == "modeling" for i in found
    )
    assert not any(
        _top(i) == "modeling" for m, found in imports.items() if _top(m) == "decoding" for i in found
    )
    inside = set()
    for path in (SRC / "modeling").rglob("*.py"):
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        module = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                        names = module + [alias.name for alias in node.names]
                        inside.update(n for n in names if "generation" in n or "training" in n)
    assert inside == set()
