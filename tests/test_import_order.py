"""Importing the kit's modules in any order never hits the paddle/zlib import-order segfault.

The trap (STACK.md): `import paddle` before zlib is loaded, then ppdet / pycocotools.coco / lap /
pyclipper, dies with SIGSEGV in zlib's inflateReset2. The negative control below shows the trap is
real on this stack, so the ordering tests can fail.
"""
from __future__ import annotations

import ast
import pkgutil
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_runtime", "detect", "compress", "fleet", "defectkit")
THEN = "import paddle, ppdet, pycocotools.coco, lap, pyclipper"


def kit_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            # alembic loads migration scripts itself (env.py needs its context): they are not importable modules
            if not info.name.endswith("__main__") and ".migrations" not in info.name:
                names.append(info.name)
    return names


def _importing(modules: list[str]) -> str:
    """Code importing ``modules`` in order (import_module: migration files such as 0002_x.py are not identifiers)."""
    return "import importlib\n" + "\n".join(f"importlib.import_module({m!r})" for m in modules)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_negative_control_the_trap_is_real():
    proc = _run("import paddle\nimport pycocotools.coco\n")
    assert proc.returncode == -11 or proc.returncode == 139 or "Segmentation fault" in proc.stderr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kit_modules_in_random_order_then_the_heavy_stack(seed):
    modules = kit_modules()
    assert len(modules) > 30
    random.Random(seed).shuffle(modules)
    code = _importing(modules) + f"\n{THEN}\nfrom detect.heavy import paddle_stack\npaddle_stack()\n"
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_paddle_stack_first_then_everything():
    code = "from detect.heavy import paddle_stack\npaddle_stack()\n" + _importing(kit_modules())
    proc = _run(code + f"\n{THEN}\n")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_kit_module_imports_alone_in_a_fresh_interpreter():
    """Each module in its own new interpreter: an import circle or a missing import fails here even when
    another module happened to be imported first (two processes at a time: the machine has two cores)."""
    from concurrent.futures import ThreadPoolExecutor

    modules = kit_modules()
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda m: _run(_importing([m])), modules))
    failed = {m: p.stderr.strip().splitlines()[-1:] for m, p in zip(modules, procs) if p.returncode != 0}
    assert not failed, failed


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, is_package: bool, names: set[str], function_level: bool) -> set[str]:
    """Kit modules ``module`` imports: module level only (``if TYPE_CHECKING:`` blocks excluded), or every import
    statement anywhere in the file when ``function_level``."""
    def statements(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            yield node
            if isinstance(node, (ast.If, ast.Try, ast.With)):  # still module level
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        yield from statements(child.body if isinstance(child, ast.ExceptHandler) else [child])

    nodes = ast.walk(tree) if function_level else statements(tree.body)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in names:
                t = t.rpartition(".")[0]
            if t and t != module:
                out.add(t)
    return out


def import_graph(function_level: bool = False) -> dict[str, set[str]]:
    files = {_module_of(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    names = set(files)
    return {m: _imports(ast.parse(p.read_text(encoding="utf-8")), m, p.name == "__init__.py", names, function_level)
            for m, p in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys as _sys

    _sys.setrecursionlimit(max(10_000, _sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_among_the_kits_modules():
    """Module-level imports only (what runs at import time; imports inside functions are deferred on purpose and
    not counted here): no two kit modules may reach each other. The negative control shows the finder works."""
    graph = import_graph()
    assert graph["detect.train"] >= {"detect.session", "detect.linespec"}  # the parser sees real edges
    assert find_cycles({**graph, "detect.linespec": graph["detect.linespec"] | {"detect.train"}})  # control
    assert find_cycles(graph) == []


def test_no_circle_in_detect_even_counting_imports_inside_functions():
    """The named circles (detect/data/check <-> fix; detect/infer <-> resume <-> train, now split around
    detect/session) are gone for good: no circle among detect's modules even when imports inside functions
    count. (Other packages are held to the module-level rule above.)"""
    graph = import_graph(function_level=True)
    detect = {m: {d for d in deps if d.startswith("detect.")} for m, deps in graph.items() if m.startswith("detect.")}
    assert "detect.data.check" in detect["detect.data.fix"] and "detect.session" in detect["detect.resume"]
    assert find_cycles(detect) == []
    assert "detect.data.fix" not in detect["detect.data.check"] and "detect.train" not in detect["detect.infer"]
    assert "detect.train" not in detect["detect.resume"] and "detect.resume" not in detect["detect.session"]
