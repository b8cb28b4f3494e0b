"""The CPU examples under examples/ run to the end and use the public API only.

Each numbered example is executed in this process (runpy, as `python examples/NN_name.py` would)
with TILTFLOW_EXAMPLE_FAST=1, which shrinks its iterations (full sizes run in under a minute on
one CPU thread). examples/sd3_cvar.py needs a 40 GB GPU and is not run here.
"""

import ast
import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("[0-9][0-9]_*.py"))
ALLOWED_IMPORTS = {"math", "os", "torch", "tiltflow"}


def test_there_are_cpu_examples():
    assert len(EXAMPLES) >= 3, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_the_public_api(path, monkeypatch, capsys):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.name} needs a docstring saying what it shows"
    for node in ast.walk(tree):       # a user copies these: `import tiltflow as tilt`, nothing private
        if isinstance(node, ast.Import):
            assert {a.name.split(".")[0] for a in node.names} <= ALLOWED_IMPORTS, ast.unparse(node)
            assert all(a.name != "tiltflow" or a.asname == "tilt" for a in node.names), ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.module.split(".")[0] != "tiltflow" and node.module in ALLOWED_IMPORTS, ast.unparse(node)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tilt":
            assert not node.attr.startswith("_"), f"{path.name} uses the private tilt.{node.attr}"
    monkeypatch.setenv("TILTFLOW_EXAMPLE_FAST", "1")
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip() and "nan" not in out.lower(), out
