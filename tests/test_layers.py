"""The layering of the tree: bench -> baselines -> rwkv_engine -> kernels, imports only downward, and
the baselines use the engine through its public names only. Both are read from the source with `ast`
(every import anywhere in a file counts, lazy ones inside functions included)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("rwkv_kernels", "rwkv_engine", "baselines", "bench")          # each may import only those before it
# what the baselines may import from the engine: the package's public API, and the shared runtime
# modules whose public (no underscore) names are there for every model family
SHARED_RUNTIME = ("rwkv_engine", "rwkv_engine.config", "rwkv_engine.files", "rwkv_engine.contract")


def imports(source, module):
    """-> [(line, imported module, name or None)] of a file's source; `module` is the file's own dotted
    name (for relative imports)."""
    package = module.rsplit(".", 1)[0].split(".")          # a.b.c and a.b.__init__ are both in package a.b
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                target = ".".join(p for p in (base, node.module) if p)
            else:
                target = node.module
            out += [(node.lineno, target, a.name) for a in node.names]
    return out


def attribute_chains(source):
    """-> [(line, 'a.b.c')] for every dotted attribute access rooted at a plain name."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            parts, n = [], node
            while isinstance(n, ast.Attribute):
                parts.append(n.attr)
                n = n.value
            if isinstance(n, ast.Name):
                out.append((node.lineno, ".".join([n.id, *reversed(parts)])))
    return out


def upward_imports(files):
    """[(path, line, target)] for every import of a layer above the file's own."""
    bad = []
    for path, module in files:
        mine = LAYERS.index(module.split(".")[0])
        for line, target, _ in imports(path.read_text() if hasattr(path, "read_text") else path, module):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > mine:
                bad.append((str(path)[:60], line, target))
    return bad


def private_engine_uses(source, module):
    """Places where a baselines file reaches into the engine beyond its public names."""
    bad = []
    for line, target, name in imports(source, module):
        if not target.startswith("rwkv_engine"):
            continue
        if name is None:                                         # import rwkv_engine[.x]
            if target != "rwkv_engine":
                bad.append((line, target))
        elif target not in SHARED_RUNTIME or name.startswith("_"):
            bad.append((line, f"{target}.{name}"))
        elif target == "rwkv_engine" and f"rwkv_engine.{name}" not in SHARED_RUNTIME:
            import rwkv_engine
            if name not in rwkv_engine.__all__:
                bad.append((line, f"rwkv_engine.{name}"))
    for line, chain in attribute_chains(source):
        parts = chain.split(".")
        if parts[0] == "rwkv_engine" and len(parts) > 1:
            if ".".join(parts[:2]) not in SHARED_RUNTIME and parts[1] not in __import__("rwkv_engine").__all__:
                bad.append((line, chain))
            elif any(p.startswith("_") for p in parts[1:]):
                bad.append((line, chain))
    return bad


def _tree_files():
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            yield path, ".".join(rel.parts)


def test_every_import_runs_downward():
    files = list(_tree_files())
    assert len(files) > 40 and any(m == "bench.generate" for _, m in files)      # the tree is really read
    assert upward_imports(files) == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    cases = {"rwkv_kernels.x": "import rwkv_engine\n", "rwkv_engine.y": "def f():\n    from bench import cli\n",
             "baselines.z": "from bench.models import load\n", "rwkv_engine.serve.w": "from ...bench import cli\n"}
    for module, source in cases.items():
        f = tmp_path / f"{module}.py"
        f.write_text(source)
        assert len(upward_imports([(f, module)])) == 1, module
    ok = tmp_path / "ok.py"
    ok.write_text("import torch\nfrom rwkv_kernels import quant\nfrom . import helper\n")
    assert upward_imports([(ok, "rwkv_engine.ok")]) == []


def test_baselines_use_public_engine_names_only():
    files = sorted((ROOT / "baselines").glob("*.py"))
    assert any("rwkv_engine" in f.read_text() for f in files)                  # there is coupling to check
    offenders = {f.name: private_engine_uses(f.read_text(), f"baselines.{f.stem}") for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("source", [
    "from rwkv_engine.model import RWKV\n",
    "import rwkv_engine.generation\n",
    "from rwkv_engine import model\n",
    "from rwkv_engine.files import _open\n",
    "import rwkv_engine\nx = rwkv_engine.model.RWKV\n",
    "import rwkv_engine\nx = rwkv_engine.files._private(1)\n",
    "def f():\n    from rwkv_engine.sampling import sample\n",
])
def test_the_public_names_check_catches_private_coupling(source):
    assert private_engine_uses(source, "baselines.x"), source


def test_the_public_names_check_lets_the_api_through():
    source = ("import rwkv_engine\nfrom rwkv_engine import generate, tokenizer\n"
              "from rwkv_engine.files import first_line\nx = rwkv_engine.load\n")
    assert private_engine_uses(source, "baselines.x") == []


def private_names(source):
    """The underscore names a file defines: top-level functions, classes and assignments, methods and
    class attributes of its classes, and attributes it assigns on `self` (dunders are not private)."""
    tree = ast.parse(source)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {m.name for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
            names |= {t.id for m in node.body if isinstance(m, ast.Assign) for t in m.targets
                      if isinstance(t, ast.Name)}
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
              and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def cross_module_private_uses(sources):
    """{module: source} -> [(module, line, what)]: every `from x import _y`, and every `obj._name` where
    `_name` is private to another module of the tree and not defined by the file itself."""
    defined = {m: private_names(s) for m, s in sources.items()}
    bad = []
    for module, source in sources.items():
        others = set().union(*(d for m, d in defined.items() if m != module)) - defined[module]
        for line, target, name in imports(source, module):
            if name and name.startswith("_") and not name.startswith("__"):
                bad.append((module, line, f"from {target} import {name}"))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in others:
                bad.append((module, node.lineno, f".{node.attr}"))
    return bad


def test_no_module_uses_another_modules_private_names():
    sources = {m: p.read_text() for p, m in _tree_files()}
    assert "rwkv_engine.pipeline" in sources and len(sources) > 40
    assert cross_module_private_uses(sources) == []


def test_the_private_names_check_catches_a_cross_module_call():
    model = "class RWKV:\n    def _check_tokens(self, tokens):\n        return tokens\n"
    old_pipeline = "def forward(self, tokens):\n    return self.stage.model._check_tokens(tokens)\n"   # the old call
    found = cross_module_private_uses({"rwkv_engine.model": model, "rwkv_engine.pipeline": old_pipeline})
    assert found == [("rwkv_engine.pipeline", 2, "._check_tokens")]
    imported = cross_module_private_uses({"a.b": "from .c import _helper\n", "a.c": "def _helper():\n    pass\n"})
    assert imported == [("a.b", 1, "from a.c import _helper")]
    own = "class S:\n    def __init__(self):\n        self._lock = 1\n    def f(self, o):\n        return o._lock\n"
    assert cross_module_private_uses({"a.s": own, "a.t": "x = 1\n"}) == []          # its own private name
