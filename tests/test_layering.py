"""Package layering, checked on the source with `ast` (nothing is imported or run).

`idgbr_jax/models/` holds networks only: PyTorch / diffusers / transformers key tables and
torch-layout conversions live in `idgbr_jax/convert/`, which imports models, never the reverse.

Add a rule by appending to `IMPORT_RULES` (a package must not import a module under a prefix) or
`FUNCTION_NAME_RULES` (a package must not define functions with these name endings). Every
import form counts, at any depth (module level, inside functions, under `if TYPE_CHECKING`):
`import a.b`, `from a import b`, relative imports, and `importlib.import_module("a.b")` /
`__import__("a.b")` with a literal name.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (package, forbidden import prefix): no module under `package` may import `prefix` or anything
# below it.
IMPORT_RULES: list[tuple[str, str]] = [
    ("idgbr_jax.models", "idgbr_jax.convert"),
    ("idgbr_jax.models", "idgbr_jax.train"),
    ("idgbr_jax.models", "idgbr_jax.inference"),
    ("idgbr_jax.models", "idgbr_jax.assembly"),
    # assembly builds models from configs for everyone above it
    ("idgbr_jax.assembly", "idgbr_jax.train"),
    ("idgbr_jax.assembly", "idgbr_jax.inference"),
    ("idgbr_jax.assembly", "idgbr_jax.convert"),
    ("idgbr_jax.assembly", "idgbr_jax.commands"),
    # inference runs trained models; training may use inference (evaluation), never the reverse
    ("idgbr_jax.inference", "idgbr_jax.train"),
    ("idgbr_jax.inference", "idgbr_jax.commands"),
    ("idgbr_jax.convert", "idgbr_jax.train"),
    ("idgbr_jax.convert", "idgbr_jax.inference"),
    ("idgbr_jax.train", "idgbr_jax.commands"),
    ("idgbr_jax.metrics", "idgbr_jax.train"),
    ("idgbr_jax.data", "idgbr_jax.train"),
    ("idgbr_jax.checkpoints", "idgbr_jax.train"),
]

# (package, forbidden function-name endings): conversions to / from other frameworks' layouts
# belong in idgbr_jax.convert, beside their inverses.
FUNCTION_NAME_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("idgbr_jax.models", ("_from_torch", "from_diffusers", "_to_torch", "_from_hf")),
]


def _modules(package: str) -> list[tuple[str, pathlib.Path]]:
  """(dotted module name, path) of every .py file under `package`."""
  pkg_dir = ROOT.joinpath(*package.split("."))
  assert (pkg_dir / "__init__.py").is_file(), f"{package} is not a package under {ROOT}"
  out = []
  for path in sorted(pkg_dir.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out.append((".".join(parts), path))
  return out


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
  """(line, absolute dotted name) of everything `source` (module `module`) imports.

  `from a import b` yields both `a` and `a.b` (b may be a submodule)."""
  package = module if is_package else module.rpartition(".")[0]
  names = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base_parts = package.split(".") if package else []
        base_parts = base_parts[:len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      names.append((node.lineno, base))
      names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                if alias.name != "*"]
    elif isinstance(node, ast.Call) and node.args:
      func = node.func
      fname = (func.attr if isinstance(func, ast.Attribute) else
               func.id if isinstance(func, ast.Name) else None)
      arg = node.args[0]
      if fname in ("import_module", "__import__") and isinstance(arg, ast.Constant) and \
          isinstance(arg.value, str):
        names.append((node.lineno, arg.value))
  return names


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def import_violations(package: str, prefix: str) -> list[str]:
  out = []
  for module, path in _modules(package):
    is_pkg = path.name == "__init__.py"
    for line, name in imported_names(path.read_text(), module, is_pkg):
      if _under(name, prefix):
        out.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
  return out


def function_name_violations(package: str, endings: tuple[str, ...]) -> list[str]:
  out = []
  for _, path in _modules(package):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.endswith(endings):
        out.append(f"{path.relative_to(ROOT)}:{node.lineno} defines {node.name}")
  return out


@pytest.mark.parametrize("package,prefix", IMPORT_RULES)
def test_package_does_not_import(package, prefix):
  bad = import_violations(package, prefix)
  assert not bad, f"{package} must not import {prefix}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("package,endings", FUNCTION_NAME_RULES)
def test_package_defines_no_conversion_functions(package, endings):
  bad = function_name_violations(package, endings)
  assert not bad, (f"{package} must not define functions ending in {endings} (they belong in "
                   "idgbr_jax.convert):\n  " + "\n  ".join(bad))


def import_graph() -> dict[str, set[str]]:
  """module -> the idgbr_jax modules it imports (any depth; `from a import b` resolves to the
  module `a.b` when it exists, else to `a`)."""
  modules = dict(_modules("idgbr_jax"))
  graph = {}
  for module, path in modules.items():
    deps = set()
    for _, name in imported_names(path.read_text(), module, path.name == "__init__.py"):
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name and name != module:
        deps.add(name)
    graph[module] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle (a, b, ..., a) among modules, ignoring package `__init__` re-exports of
  their own submodules, or None."""
  def edges(m):
    return {d for d in graph[m] if not d.startswith(m + ".")}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(edges(m)):
      if state.get(d) == 1:
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "p": {"p.x"}, "p.x": {"p"}}) is None


@pytest.mark.parametrize("source,module,expected", [
    ("import idgbr_jax.convert.files", "idgbr_jax.models.x", True),
    ("from idgbr_jax import convert", "idgbr_jax.models.x", True),
    ("from idgbr_jax.convert.torch_layout import conv_kernel_to_flax", "idgbr_jax.models.x", True),
    ("def f():\n  from ..convert import files", "idgbr_jax.models.x", True),
    ("def f():\n  from ... import convert", "idgbr_jax.models.backbones.x", True),
    ("import importlib\nimportlib.import_module('idgbr_jax.convert')", "idgbr_jax.models.x", True),
    ("from idgbr_jax.models import layers", "idgbr_jax.models.x", False),
    ("from . import layers", "idgbr_jax.models.x", False),
    ("import idgbr_jax.converters", "idgbr_jax.models.x", False),  # prefix ends at a dot
])
def test_import_scanner_sees_every_form(source, module, expected):
  names = [name for _, name in imported_names(source, module)]
  assert any(_under(n, "idgbr_jax.convert") for n in names) == expected, names
