"""Bodies a reader holds in one look: no function of featcache runs over 60 lines unless a
comment in it, starting "# Over 60 lines:", says why."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featcache"
LIMIT = 60
REASON = "# Over 60 lines:"


def long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of the functions over LIMIT lines that give no reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            body = lines[node.lineno - 1 : node.end_lineno]
            if length > LIMIT and not any(line.strip().startswith(REASON) for line in body):
                found.append((node.name, length))
    return found


def test_no_function_runs_over_60_lines_without_a_reason():
    found = {
        f"{path.relative_to(PACKAGE)}:{name}": length
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, length in long_functions(path.read_text())
    }
    assert not found, f"split these, or say why in a '{REASON}' comment: {found}"


def test_the_scan_sees_a_long_function_and_its_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(LIMIT))  # with its def: LIMIT + 1
    assert long_functions(f"def f():\n{body}") == [("f", LIMIT + 1)]
    assert long_functions(f"def f():\n    {REASON} one table\n{body}") == []
    assert long_functions(f"def f():\n{body.split(chr(10), 1)[1]}") == []  # LIMIT lines
