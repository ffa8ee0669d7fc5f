"""The package layout follows the paper's data flow: imports only point down.

Read from the source (ast), not from a running import, so a lazy import
inside a function counts as much as one at the top.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each package and its source directory: rcst_edge (the JAX-free edge) sits
# below every layer of rcst_jax.
ROOTS = {"rcst_jax": os.path.join(REPO, "rcst_jax"),
         "rcst_edge": os.path.join(REPO, "edge", "rcst_edge")}

# Lower layers first. A module may import its own layer (no cycles) and the
# layers below it, never a layer above.
LAYERS = (
    ("rcst_edge",),    # the JAX-free edge: wire format, link client, errors
    ("stats",),        # pure maths
    ("core",),         # foundations: files, devices, XLA flags
    ("settings",),     # the run's settings and their schema
    ("data",),
    ("models",),
    ("inference",),    # Algorithm 2
    ("serving",),      # its edge-server link
    ("calibration",),  # Algorithm 1 + certificate
    ("sweep",),
    ("export",),       # the edge as an ONNX file
    ("report",),
    ("jobs",),         # whole runs from a config, training
    ("cli",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
BIG_MODULES = {"models/efficientnet.py", "models/deit.py", "data/synthetic.py"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 60
GENERATED = {os.path.join("link", "rcst_pb2.py")}  # by protoc


def _modules():
  for package, root in ROOTS.items():
    for dirpath, _, files in os.walk(root):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          rel = os.path.relpath(path, root)
          name = (f"{package}." + rel[:-3].replace(os.sep, ".")).removesuffix(".__init__")
          yield name, rel, path


def _imports(name: str, path: str, prefixes=tuple(ROOTS)):
  """Modules of ``prefixes`` this module imports (absolute or relative), at any depth."""
  with open(path) as f:
    tree = ast.parse(f.read())
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] in prefixes:
          yield a.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      if base.split(".")[0] in prefixes:
        for a in node.names:
          yield f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base


def _is_module(name: str) -> bool:
  package, _, rest = name.partition(".")
  if package not in ROOTS:
    return False
  rel = rest.replace(".", os.sep)
  return os.path.isfile(os.path.join(ROOTS[package], rel + ".py")) or os.path.isfile(
      os.path.join(ROOTS[package], rel, "__init__.py"))


def _top(name: str) -> str | None:
  parts = name.split(".")
  if parts[0] == "rcst_edge":
    return "rcst_edge"
  return parts[1] if len(parts) > 1 else None


def _graph():
  return {name: {m for m in _imports(name, path) if m != name} for name, _, path in _modules()}


def test_every_module_has_a_layer():
  tops = {_top(n) for n, _, _ in _modules()} - {None, "configs", "weights"}
  assert tops <= set(RANK), f"modules outside the layer table: {sorted(tops - set(RANK))}"


def test_imports_only_point_down_the_data_flow():
  bad = []
  for name, deps in _graph().items():
    top = _top(name)
    if top in (None, "configs", "weights"):
      continue
    for d in deps:
      dtop = _top(d)
      if dtop is None or dtop in ("configs", "weights"):
        continue
      if RANK[dtop] > RANK[top]:
        bad.append(f"{name} -> {d}")
  assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_the_edge_package_imports_no_jax_and_no_rcst_jax():
  """rcst-edge installs without JAX: not even a lazy import may reach it."""
  heavy = ("rcst_jax", "jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "torch")
  bad = [f"{n} -> {d}" for n, _, path in _modules() if n.startswith("rcst_edge")
         for d in _imports(n, path, heavy)]
  assert not bad, bad


def test_stats_imports_nothing_else_from_the_package():
  bad = [f"{n} -> {d}" for n, deps in _graph().items() if _top(n) == "stats"
         for d in deps if _top(d) not in ("stats", None)]
  assert not bad, bad


def test_inference_does_not_import_calibration_or_sweep():
  bad = [f"{n} -> {d}" for n, deps in _graph().items() if _top(n) == "inference"
         for d in deps if _top(d) in ("calibration", "sweep", "report", "jobs", "cli")]
  assert not bad, bad


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  # Importing a package runs its __init__: an edge to a submodule implies one
  # to the package, and a module's own package is not a cycle with it.
  state, cycles = {}, []

  def visit(n, stack):
    state[n] = 1
    for d in sorted(graph.get(n, ())):
      if d not in graph or n.startswith(d + "."):
        continue
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif not state.get(d):
        visit(d, stack + [d])
    state[n] = 2

  for n in sorted(graph):
    if not state.get(n):
      visit(n, [n])
  assert not cycles, cycles


@pytest.mark.parametrize("limit", [MAX_MODULE_LINES])
def test_no_library_module_is_too_long(limit):
  long = {}
  for _, rel, path in _modules():
    with open(path) as f:
      n = sum(1 for _ in f)
    if n > limit and rel not in BIG_MODULES:
      long[rel] = n
  assert not long, long


def test_no_library_function_is_too_long():
  long = {}
  for _, rel, path in _modules():
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long[f"{rel}:{node.name}"] = n
  assert not long, long


def test_every_module_says_what_it_holds_and_why():
  """A module's docstring is its entry in the layout: a first paragraph of a
  few lines (what and why); a format or a rule may follow it."""
  missing, long = [], {}
  for _, rel, path in _modules():
    if rel in GENERATED:
      continue
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read()))
    if not doc or not doc.strip():
      missing.append(rel)
      continue
    first = doc.strip().split("\n\n", 1)[0].splitlines()
    if len(first) > 6:
      long[rel] = len(first)
  assert not missing, f"modules without a docstring: {missing}"
  assert not long, f"first paragraphs over 6 lines: {long}"
