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
