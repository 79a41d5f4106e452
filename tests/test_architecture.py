"""The house's rule: imports inside ``jaxdiff/`` point one way, down the layers below (a room may
import its own modules and rooms of lower layers only), so there is no cycle and no upward import.
docs/ARCHITECTURE.md draws the same picture."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A room of layer k may import rooms of layers < k.
LAYERS = [
    {"xla", "schedules", "images", "tokenizers", "parallel", "config"},
    {"data", "diffusion", "nn"},
    {"sampling", "interop", "models"},
    {"text_to_image"},
    {"generation"},
    {"eval"},
    {"train"},
    {"runs"},
]
LAYER = {room: k for k, rooms in enumerate(LAYERS) for room in rooms}


def imports():
    """(room, imported room, file) for every import of another jaxdiff room."""
    out = []
    pkg_dir = os.path.join(ROOT, "jaxdiff")
    for d, _, files in os.walk(pkg_dir):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, pkg_dir)[:-3].split(os.sep)
            room = rel[0]
            if room == "__init__" or f == "__main__.py":  # a package's CLI is an entry point, above every room
                continue
            package = ["jaxdiff", *rel[:-1]] if f != "__init__.py" else ["jaxdiff", *rel[:-1]]
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                    module = ".".join(x for x in (base, node.module or "") if x)
                    names = [module] + [f"{module}.{a.name}" for a in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "jaxdiff" and len(parts) > 1 and parts[1] != room and parts[1] in LAYER:
                        out.append((room, parts[1], os.path.relpath(path, ROOT)))
    return out


def test_every_room_has_a_layer():
    rooms = {n[:-3] if n.endswith(".py") else n for n in os.listdir(os.path.join(ROOT, "jaxdiff"))
             if not n.startswith(("_", ".")) and (n.endswith(".py") or os.path.isdir(os.path.join(ROOT, "jaxdiff", n)))}
    assert rooms == set(LAYER), f"rooms without a layer: {rooms - set(LAYER)}; gone: {set(LAYER) - rooms}"


def test_imports_point_down():
    found = imports()
    assert len(found) > 20  # the walk sees the real imports
    upward = sorted({(f, a, b) for a, b, f in found if LAYER[b] >= LAYER[a]})
    assert not upward, "imports that do not point down a layer:\n" + "\n".join(f"{f}: {a} -> {b}" for f, a, b in upward)
