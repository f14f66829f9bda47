"""The README's Python example must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_names_the_test_command_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README.read_text() and "python -m pytest -q" in ci


def test_readme_install_matches_ci():
    """The README tells CPU users to take torch from the CPU index; CI does the same first."""
    cpu_index = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert cpu_index in text and 'pip install -e ".[test]"' in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in ci and '-e ".[test]"' in ci
