"""Rules of the code layout that a test can enforce (docs/architecture.md, "Habits"):

- no function, lambdas included, longer than 100 lines in ``rll_kernels/`` (Python, measured on the
  ast) or ``csrc/`` (C++/CUDA, measured by brace matching with comments, strings and preprocessor
  lines skipped);
- no import cycle among the modules of ``rll_kernels``, counting the imports made inside functions.

Each checker is tested on a small synthetic input first, so that a broken checker cannot pass.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rll_kernels"
CSRC = ROOT / "csrc"
MAX_LINES = 100


# ------------------------------------------------------------------ function length: Python
def python_function_lengths(source: str, filename: str = "<src>") -> list[tuple[str, int, int]]:
    """(name, first line, number of lines) of every def, async def and lambda in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            name = getattr(node, "name", "<lambda>")
            out.append((name, node.lineno, node.end_lineno - node.lineno + 1))
    return out


# ------------------------------------------------------------------ function length: C++ / CUDA
_CONTROL = {"if", "for", "while", "switch", "catch", "return", "sizeof", "alignof", "decltype"}
# what may stand between a parameter list and the body: qualifiers, a trailing return type
_QUALIFIER = re.compile(
    r"(?:\b(?:const|noexcept|override|final|mutable|volatile)|&&?|->\s*[\w:<>,*&\s]+?)\s*$"
)
_WINDOW = 4000  # characters before a brace searched for its head: far more than any signature


def _blank_comments_and_strings(source: str) -> str:
    """``source`` with comments, string/char literals and preprocessor lines replaced by spaces
    (newlines kept, so line numbers stay valid)."""
    out = []
    i, n = 0, len(source)
    at_line_start = True
    while i < n:
        c = source[i]
        if at_line_start and c == "#":  # a preprocessor line, with its continuations
            j = i
            while j < n and (source[j] != "\n" or source[j - 1] == "\\"):
                j += 1
            out.append(re.sub(r"[^\n]", " ", source[i:j]))
            i = j
            continue
        if source.startswith("//", i):
            j = source.find("\n", i)
            j = n if j < 0 else j
        elif source.startswith("/*", i):
            j = source.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and source[j] != c:
                j += 2 if source[j] == "\\" else 1
            j += 1
        else:
            out.append(c)
            if c == "\n":
                at_line_start = True
            elif not c.isspace():
                at_line_start = False
            i += 1
            continue
        out.append(re.sub(r"[^\n]", " ", source[i:j]))
        i = j
    return "".join(out)


def _function_head(code: str, brace: int) -> int | None:
    """Offset where the function or lambda whose body opens at ``brace`` starts, or None if the
    brace opens something else (a namespace, class, initialiser, control statement, ...)."""
    start = max(0, brace - _WINDOW)
    head = code[start:brace].rstrip()
    while (q := _QUALIFIER.search(head)) is not None and q.start() < len(head):
        head = head[: q.start()].rstrip()
    if head.endswith("]"):  # a lambda without parameters: [&] { ... }
        return start + head.rfind("[")
    if not head.endswith(")"):
        return None
    depth, j = 0, len(head) - 1
    while j >= 0:  # the "(" that opens the parameter list
        depth += {")": 1, "(": -1}.get(head[j], 0)
        if depth == 0:
            break
        j -= 1
    before = head[:j].rstrip()
    word = re.search(r"(\w+)$", before)
    if word is not None and word.group(1) in _CONTROL:
        return None
    return start + j


def cpp_function_lengths(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, number of lines) of every function and lambda body in C++/CUDA ``source``."""
    code = _blank_comments_and_strings(source)
    out, stack = [], []
    for pos, c in enumerate(code):
        if c == "{":
            stack.append((pos, _function_head(code, pos)))
        elif c == "}" and stack:
            _, head = stack.pop()
            if head is not None:
                first = code.count("\n", 0, head) + 1
                name = re.search(r"(\w+)\s*$", code[:head])
                out.append((name.group(1) if name else "<lambda>", first, code.count("\n", head, pos) + 1))
    return out


def _too_long(lengths, path):
    where = path.relative_to(ROOT)
    return [f"{where}:{line} {name} ({size} lines)" for name, line, size in lengths if size > MAX_LINES]


def test_python_checker_measures_defs_and_lambdas():
    src = "def f():\n" + "    x = 1\n" * 120 + "g = (lambda a:\n" + "    a +\n" * 101 + "    1)\n"
    got = {name: size for name, _, size in python_function_lengths(src)}
    assert got == {"f": 121, "<lambda>": 103}


def test_cpp_checker_measures_functions_and_lambdas_only():
    body = "  x += 1;  // { not a brace\n" * 101
    src = (
        "#include <x.h>\n#define M(a) { a }\nnamespace n {\nstruct S { int a[2] = {1, 2}; };\n"
        "template <typename T>\nT long_one(T x,\n           T y) const noexcept {\n"
        + body
        + "  return x;\n}\n"
        "void f() {\n  if (a) {\n"
        + body
        + "  }\n  auto l = [&](int i) -> int {\n"
        + body
        + '  };\n  const char* s = "}";\n  auto g = [&] { return 1; };\n}\n}  // namespace n\n'
    )
    got = {(name, size) for name, _, size in cpp_function_lengths(src)}
    assert got == {("long_one", 105), ("f", 210), ("<lambda>", 103), ("<lambda>", 1)}, got


@pytest.mark.parametrize(
    "part",
    [
        pytest.param("rll_kernels", id="rll_kernels"),
        pytest.param("rll_kernels/triton", id="rll_kernels-triton"),
    ],
)
def test_no_python_function_over_100_lines(part):
    files = sorted((ROOT / part).rglob("*.py"))
    if part == "rll_kernels":  # the Triton backend is its own part
        files = [f for f in files if "triton" not in f.relative_to(PKG).parts[:1]]
    assert files
    long = [x for f in files for x in _too_long(python_function_lengths(f.read_text(), str(f)), f)]
    assert not long, "functions over 100 lines:\n" + "\n".join(long)


def test_no_cpp_function_over_100_lines():
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh"))
    assert files
    long = [x for f in files for x in _too_long(cpp_function_lengths(f.read_text()), f)]
    assert not long, "functions over 100 lines:\n" + "\n".join(long)


# ------------------------------------------------------------------ import cycles
def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions.

    ``root`` is a package directory. An import of ``a.b.c`` also runs the ``__init__`` of ``a.b``
    unless the importer is itself inside ``a.b``, so those packages are edges too.
    """
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t not in files:
                    continue
                parts = t.split(".")
                for k in range(1, len(parts) + 1):
                    target = ".".join(parts[:k])
                    if target in files and target != mod and not mod.startswith(target + "."):
                        graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_import_checker_finds_a_function_level_cycle(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from . import a\n",
            "pkg/a.py": "from .sub import b\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "def late():\n    from ..a import thing\n    return thing\n",
            "pkg/c.py": "import pkg.sub.b\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.c"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("def late():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycle_in_rll_kernels():
    graph = import_graph(PKG)
    assert {"rll_kernels", "rll_kernels._backends", "rll_kernels.ops.rll"} <= set(graph)
    assert "rll_kernels._checks" in graph["rll_kernels._backends"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
