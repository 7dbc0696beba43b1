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
