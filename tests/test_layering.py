"""Layers: the backend is a plain library (importing it pulls in neither ComfyUI nor Gradio), no module imports
itself back through others, and the imports between packages follow docs/architecture.md's diagram."""

import functools
import pathlib
import pkgutil
import subprocess
import sys

import rlr_backend


def test_backend_imports_without_ui_packages():
    modules = [m.name for m in pkgutil.walk_packages(rlr_backend.__path__, "rlr_backend.")]
    assert len(modules) > 10
    code = (
        "import sys\n"
        "for name in ('comfy', 'comfy_api', 'comfy_nodes', 'folder_paths', 'server', 'gradio', 'gradio_app'):\n"
        "    sys.modules[name] = None\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_pickle_loading_in_the_backend():
    import pathlib
    import re

    root = pathlib.Path(rlr_backend.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if re.search(r"\bpickle\.loads?\(|torch\.load\(|allow_pickle=True|trust_remote_code=True", text):
            offenders.append(str(path))
    assert not offenders, offenders


def test_node_logic_imports_without_comfyui():
    """comfy_nodes.logic (what the nodes do) needs only the backend; ComfyUI names stay in nodes.py and glue."""
    code = (
        "import sys\n"
        "for name in ('comfy', 'comfy_api', 'folder_paths', 'server', 'gradio'):\n"
        "    sys.modules[name] = None\n"
        "import comfy_nodes, comfy_nodes.logic\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr[-2000:]


def test_gradio_app_imports_gradio_only_to_build_the_page():
    """The app's form helpers work with gradio poisoned; only build_ui/main import it."""
    code = (
        "import sys\n"
        "for name in ('comfy', 'folder_paths', 'server', 'gradio'):\n"
        "    sys.modules[name] = None\n"
        "import gradio_app, pathlib\n"
        "errors, kw = gradio_app.check_form(gradio_app.form_defaults(), gradio_app.Settings(pathlib.Path('runs')))\n"
        "assert errors == {} and kw['prompts'], errors\n"
        "try:\n"
        "    gradio_app.build_ui(gradio_app.Settings(pathlib.Path('runs')))\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('build_ui ran without gradio')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=pathlib.Path(rlr_backend.__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------ the import graph against docs/architecture.md
ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("rlr_backend", "benchmarks", "comfy_nodes", "rlr_app", "gradio_app.py")


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package's __init__), for every module of PACKAGES."""
    out = {}
    for top in PACKAGES:
        path = ROOT / top
        for f in [path] if path.suffix == ".py" else sorted(path.rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _imports(name: str, path: pathlib.Path, is_pkg: bool, modules) -> set[str]:
    """The project modules ``name`` imports, anywhere in the file (inside functions too, not under
    ``if TYPE_CHECKING:``). ``import a.b.c`` runs a and a.b too, so those count, except ``name``'s own
    packages (a submodule importing a sibling does not run its package again)."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    targets = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from a import b`: b may be a module
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            parts = n.split(".") if n else []
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return {t for t in targets if t in modules} - own


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, f, is_pkg, modules) for m, (f, is_pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _diagram() -> tuple[dict[str, list[str]], set[tuple[str, str]]]:
    """docs/architecture.md's mermaid block: box -> the modules it stands for, and the arrows."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no mermaid block"
    boxes, arrows = {}, set()
    for line in block.group(1).splitlines():
        line = line.strip()
        if m := re.fullmatch(r'(\w+)\["([^"]+)"\]', line):
            boxes[m.group(1)] = [s.strip() for s in m.group(2).split(",")]
        elif m := re.fullmatch(r"(\w+) --> (\w+)", line):
            arrows.add((m.group(1), m.group(2)))
        else:
            assert line in ("", "flowchart TD") or line.startswith("%%"), f"unparsed diagram line: {line!r}"
    return boxes, arrows


def _box_of(boxes: dict[str, list[str]]):
    def box(module: str) -> str | None:
        hits = [(len(p), b) for b, ps in boxes.items() for p in ps if module == p or module.startswith(p + ".")]
        return max(hits)[1] if hits else None
    return box


def test_no_import_cycles():
    """No module imports itself back through others: across rlr_backend, benchmarks, comfy_nodes, rlr_app and
    gradio_app, with imports inside functions counted."""
    graph = _graph()
    assert len(graph) > 100 and graph["benchmarks.run"], "the import graph came out empty"
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_follow_the_arrows_of_docs_architecture():
    boxes, arrows = _diagram()
    box = _box_of(boxes)
    graph = _graph()
    unboxed = sorted(m for m in graph if box(m) is None)
    assert not unboxed, f"modules in no box of docs/architecture.md: {unboxed}"
    missing = sorted(p for ps in boxes.values() for p in ps if p not in graph)
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    assert {b for arrow in arrows for b in arrow} <= set(boxes), "an arrow to an undeclared box"
    assert _cycles({b: {t for s, t in arrows if s == b} for b in boxes}) == [], "the diagram has a cycle"

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            here = todo.pop()
            for s, t in arrows:
                if s == here and t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    real = {(box(a), box(b)) for a, targets in graph.items() for b in targets if box(a) != box(b)}
    def where(s: str, t: str) -> str:
        return ", ".join(sorted(a for a in graph if box(a) == s and any(box(b) == t for b in graph[a])))

    against = sorted(f"{s} -> {t} (in {where(s, t)})" for s, t in real if t not in reach(s))
    assert not against, "imports the diagram does not allow:\n" + "\n".join(against)
    drawn_only = sorted(arrows - real)
    assert not drawn_only, f"arrows in docs/architecture.md that no import makes: {drawn_only}"
