"""The README stays true: its test command is what CI runs, its table lists every option."""

from __future__ import annotations

import re
from pathlib import Path

from pyproxy.config import OPTIONS

ROOT = Path(__file__).resolve().parents[2]


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", _readme(), flags=re.S)
    test_commands = [b for b in blocks if "tox" in b]
    assert len(test_commands) == 1, blocks
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0].strip() in [line.strip() for line in ci]


def test_readme_documents_every_option() -> None:
    readme = _readme()
    for option in OPTIONS:
        assert f"`{option.flag}" in readme, option.flag


def test_every_source_directory_is_a_package_the_wheel_includes() -> None:
    """setup.cfg finds packages (``packages = find:``), which skips a directory without
    __init__.py: tests run from the checkout would still pass while an installed
    pyproxy could not import it."""
    source_dirs = {path.parent for path in (ROOT / "pyproxy").rglob("*.py") if "__pycache__" not in path.parts}
    missing = sorted(str(d.relative_to(ROOT)) for d in source_dirs if not (d / "__init__.py").exists())
    assert missing == []
