"""Family isolation: nothing outside runtime/families/ branches on the architecture, and nothing
outside runtime/device.py asks about CUDA (DESIGN §9, aesthetics anti-pattern 5)."""

import ast
from pathlib import Path

from domex.runtime.families import adapter_for

ROOT = Path(__file__).resolve().parent.parent


def sources():
    for folder in ("runtime", "store"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith("runtime/families/") and rel != "runtime/device.py":
                yield rel, ast.parse(path.read_text())


def test_no_family_names_in_code_outside_the_adapters():
    adapter_for("qwen3_moe")  # fills the registry
    from domex.runtime.families import FAMILIES

    names = set(FAMILIES)
    found = []
    for rel, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Attribute) and c.attr == "model_type"
                                                     for c in [node.left, *node.comparators]):
                found.append(f"{rel}:{node.lineno}: compares model_type")
    assert not found, "architecture-specific code outside runtime/families/:\n" + "\n".join(found)


def test_no_cuda_checks_outside_device_module():
    found = []
    for rel, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append(f"{rel}:{node.lineno}")
    assert not found, "torch.cuda used outside runtime/device.py: " + ", ".join(found)


PACKAGES = {"domex": "domex", "domex.runtime": "runtime", "domex.runtime.families": "runtime/families", "domex.store": "store"}


def module_files() -> dict[str, Path]:
    """Every domex module name -> its file (the package-dir mapping of pyproject.toml)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The domex modules `name` imports, at module level or inside functions (a lazy import is still a dependency)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_the_import_graph_has_no_cycle():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))
