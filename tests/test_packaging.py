from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_requirements_txt_lists_the_required_dependencies_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == required
