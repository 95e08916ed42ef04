"""No import circle among the evaluation modules, counting imports inside functions too (a lazy
import hides a circle from Python, not from the reader)."""
import ast
import pathlib

import derta_jax.evaluation

PACKAGE = "derta_jax.evaluation"
FOLDER = pathlib.Path(derta_jax.evaluation.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    """Evaluation modules that `path` imports anywhere (TYPE_CHECKING-only imports excluded:
    they never run)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE:
            found.update(f"{PACKAGE}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE + "."))
    return found


def graph() -> dict[str, set[str]]:
    return {f"{PACKAGE}.{p.stem}": imported_modules(p) for p in FOLDER.glob("*.py")
            if p.stem != "__init__"}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_evaluation_modules_import_no_circle():
    edges = graph()
    assert f"{PACKAGE}.judges" in edges and f"{PACKAGE}.runner" in edges[f"{PACKAGE}.rejudge"]
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_the_old_circle():
    # judges -> loading -> runner -> judges, as it was before EvalModel moved to loading.
    old = {"judges": {"loading"}, "loading": {"runner"}, "runner": {"judges"}}
    assert find_cycle(old) == ["judges", "loading", "runner", "judges"]
