"""Bodies a reader holds in one look: no function of featcache runs over 60 lines unless a
comment in it, starting "# Over 60 lines:", says why."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featcache"
LIMIT = 60
REASON = "# Over 60 lines:"


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of the functions over LIMIT lines that give no reason in their own lines
    (a nested function's reason is its own)."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, FUNCTIONS):
            continue
        length = node.end_lineno - node.lineno + 1
        own = set(range(node.lineno, node.end_lineno + 1))
        for inner in ast.walk(node):
            if isinstance(inner, FUNCTIONS) and inner is not node:
                own -= set(range(inner.lineno, inner.end_lineno + 1))
        reason = any(lines[i - 1].strip().startswith(REASON) for i in own)
        if length > LIMIT and not reason:
            found.append((node.name, length))
    return found


def test_no_function_runs_over_60_lines_without_a_reason():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the package is where this test looks
    found = {
        f"{path.relative_to(PACKAGE)}:{name}": length
        for path in files
        for name, length in long_functions(path.read_text())
    }
    assert not found, f"split these, or say why in a '{REASON}' comment: {found}"


def test_the_scan_sees_a_long_function_and_its_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))  # with its def: LIMIT + 1
    assert long_functions(f"def f():\n{body}") == [("f", LIMIT + 1)]
    assert long_functions(f"def f():\n    {REASON} one table\n{body}") == []
    assert long_functions(f"def f():\n{body.split(chr(10), 1)[1]}") == []  # LIMIT lines
    nested = f"def f():\n    def g():\n        {REASON} g's own\n        pass\n{body}"
    assert long_functions(nested) == [("f", LIMIT + 4)]  # g's reason is not f's
