"""Packages import their method modules on first use (``curvlin._lazy``).

Each lazily exported name must resolve, be listed by ``dir()`` and in ``__all__``, and be
imported under ``TYPE_CHECKING`` from the submodule the lazy table names (so static tools
see what the runtime does); a fresh process importing one front must not import the others.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import pytest

PACKAGES = ["curvlin", "curvlin.blocks", "curvlin.adapters.torch"]


def _type_checking_imports(module) -> dict[str, str]:
    """``name -> submodule`` of the ``if TYPE_CHECKING:`` imports in ``module``'s source."""
    found = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                found.update({a.name: imp.module for a in imp.names})
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_lazy_names_resolve_and_match_the_static_imports(package):
    if package.endswith("torch"):
        pytest.importorskip("torch")
    module = importlib.import_module(package)
    static = _type_checking_imports(module)
    assert static, f"{package}: no TYPE_CHECKING imports"
    for name, sub in static.items():
        value = getattr(module, name)
        assert name in module.__all__, (package, name)
        assert name in dir(module), (package, name)
        home = importlib.import_module(f"{package}.{sub}")
        assert value is getattr(home, name), (package, name, sub)
    for name in module.__all__:
        getattr(module, name)  # every public name resolves
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def test_one_front_imports_only_its_own_modules():
    pytest.importorskip("torch")
    code = (
        "import sys\n"
        "from curvlin.adapters.torch import KBFGSL\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('curvlin'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "curvlin.adapters.torch.kbfgs" in loaded
    assert "curvlin.blocks.kbfgs" in loaded
    others = ["adapters.torch.kfac", "adapters.torch.smw", "adapters.torch.tensor", "blocks.kfac",
              "blocks.tensor", "blocks.mbf", "miniblock", "tensor_normal"]  # fmt: skip
    for other in others:
        assert f"curvlin.{other}" not in loaded, other
