"""The package layout's rules, read from the source (no imports, no jax).

* No import cycle among the project's own modules, counting imports written
  inside functions, and no such function-level imports at all (the real
  graph is the one a reader sees at the top of each module).
* Outside ``models/`` and the per-family Hugging Face modules, no library
  code branches on a family name or a config class.
* Every registered family names an HF adapter module that exists.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"protlm_jax": ROOT / "protlm_jax", "protlm_tasks": ROOT / "tasks"}
# Where a family may be named: its network module and its HF module.
FAMILY_PLACES = ("protlm_jax/models/", "protlm_jax/hf/t5.py", "protlm_jax/hf/bert.py")
FAMILY_NAMES = ("t5", "mt5", "bert", "albert", "electra")
CONFIG_CLASSES = ("T5Config", "BertConfig", "ElectraConfig")


def _modules():
    """module name -> (path, parsed tree) of every project module."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _resolve(name: str, modules) -> str | None:
    """The project module an imported name lives in (a module or its package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.AST, modules):
    """(imported project module, line, inside a function?) of every import."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = _resolve(alias.name, modules)
                    if target:
                        found.append((target, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    target = _resolve(f"{child.module}.{alias.name}", modules) or \
                        _resolve(child.module, modules)
                    if target:
                        found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_no_import_cycles_and_no_function_level_project_imports():
    modules = _modules()
    graph = {}
    local = []
    for name, (path, tree) in modules.items():
        edges = set()
        for target, line, in_function in _imports(tree, modules):
            if target != name:
                edges.add(target)
            if in_function:
                local.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
        # A package's modules import through the package's __init__.
        parent = name.rpartition(".")[0]
        if parent in modules and parent != name:
            edges.add(parent)
        graph[name] = edges
    assert not local, "function-level imports of project modules:\n" + "\n".join(local)

    # Tarjan's strongly connected components: any with two or more modules is a loop.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    # A package __init__ that re-exports its own modules makes a benign
    # package <-> module pair; anything else is a real loop.
    real = [c for c in cycles
            if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not real, f"import cycles: {real}"
    assert len(graph) > 40  # the walk saw the whole library


def test_no_family_dispatch_outside_models_and_family_hf_modules():
    offences = []
    names = "|".join(FAMILY_NAMES)
    literal = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    for name, (path, tree) in _modules().items():
        rel = str(path.relative_to(ROOT))
        if rel.startswith(FAMILY_PLACES):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                text = ast.unparse(node)
                if any(c in text for c in CONFIG_CLASSES):
                    offences.append(f"{rel}:{node.lineno}: {text}")
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                if literal.search(text):
                    offences.append(f"{rel}:{node.lineno}: {text}")
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                if sum(k in FAMILY_NAMES for k in keys) >= 2:
                    offences.append(f"{rel}:{node.lineno}: a table keyed by family names")
    assert not offences, "family dispatch outside models/ and hf/<family>.py:\n" + \
        "\n".join(offences)


def test_every_family_has_its_modules():
    from protlm_jax import models

    for fam in models.FAMILIES.values():
        assert fam.hf_model_types and fam.layout.padding in ("left", "right")
        path = ROOT / (fam.hf_module.replace(".", "/") + ".py")
        assert path.is_file(), (fam.name, fam.hf_module)
        assert models.family_for_hf(fam.hf_model_types[0]) is fam
        for preset in fam.presets.values():
            assert models.family_for(preset) is fam
