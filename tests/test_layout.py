"""The shape of the package, kept by tests: commands on top that nothing else imports, functions short enough
to read in one screen, and one module that knows what a checkpoint holds (docs/architecture.md)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gptrain"
COMMANDS = {"generate", "serve", "export", "harness", "plot", "launch"}  # what only cli.py may import
LONGEST = 60


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def imported(tree: ast.Module) -> set[str]:
    """The gptrain modules a module imports, by name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptrain"):
            names |= {node.module.split(".")[1]} if "." in node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("gptrain.")}
    return names


def test_no_module_but_the_cli_imports_a_command():
    offenders = {name: sorted(imported(tree) & COMMANDS) for name, tree in modules().items() if name != "cli"}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_function_is_longer_than_a_screen():
    lengths = {f"{name}.{node.name}:{node.lineno}": node.end_lineno - node.lineno + 1
               for name, tree in modules().items() for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {where: n for where, n in lengths.items() if n > LONGEST} == {}


def test_only_the_checkpoint_module_reads_the_old_step_key():
    """`step` is the word inside the code; `iter_num` is only how older checkpoints (and nanoGPT's) say it."""
    assert [name for name in modules() if name != "checkpoint" and "iter_num" in (PACKAGE / f"{name}.py").read_text()] == []
