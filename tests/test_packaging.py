"""The declared dependencies match the code: requirements.txt repeats pyproject.toml's, and every package
gptrain imports is declared, in the extra its missing-package message names."""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Import names whose distribution is called otherwise; a submodule that needs a distribution of its own.
DISTRIBUTIONS = {"yaml": "pyyaml", "lm_eval": "lm-eval", "torch.utils.tensorboard": "tensorboard"}


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extra: str | None) -> set[str]:
    """Distribution names the core (extra None) or the core plus one extra installs, following gptrain[...]."""
    spec, names = project(), set()
    requirements = list(spec["dependencies"]) + (spec["optional-dependencies"][extra] if extra else [])
    for requirement in requirements:
        name, _, extras = re.match(r"([\w.-]+)(\[([\w,]+)\])?", requirement).groups()
        if normalized(name) == "gptrain":
            names |= set().union(*(declared(e) for e in extras.split(",")))
        else:
            names.add(normalized(name))
    return names


def distribution(module: str) -> str | None:
    """The distribution a module comes from, or None for the standard library and gptrain itself."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top == "gptrain":
        return None
    for prefix, name in DISTRIBUTIONS.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    return normalized(top)


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, extra) for each import in a file: the extra named by a `require(module, extra, ...)` call
    (whose module may be a loop's variable over a tuple of names), None for an import statement."""
    found, loops = [], {}
    for node in ast.walk(ast.parse(path.read_text())):  # breadth first: a loop before the calls in its body
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, None))
        elif (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple)
              and all(isinstance(element, ast.Constant) for element in node.iter.elts)):
            loops[node.target.id] = [element.value for element in node.iter.elts]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
            module, extra = node.args[:2]
            names = loops.get(module.id) if isinstance(module, ast.Name) else [ast.literal_eval(module)]
            assert names, f"{path.name}:{node.lineno}: cannot tell which module require() imports"
            found += [(name, ast.literal_eval(extra)) for name in names]
    return found


def test_requirements_txt_lists_the_required_dependencies_of_pyproject():
    required = project()["dependencies"]
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line] == required


def test_every_package_gptrain_imports_is_declared_where_it_is_used():
    everywhere = set().union(*(declared(extra) for extra in [None, *project()["optional-dependencies"]]))
    undeclared = []
    for path in sorted((ROOT / "gptrain").glob("*.py")):
        for module, extra in imports(path):
            name = distribution(module)
            if name and name not in (declared(extra) if extra else everywhere):
                undeclared.append(f"{path.name}: {module} ({name}) in {f'gptrain[{extra}]' if extra else 'no extra'}")
    assert not undeclared
