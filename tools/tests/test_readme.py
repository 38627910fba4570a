"""The root README's examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_one_example_per_package():
    text = README.read_text()
    for package in ("keye-dsa", "keye-moe", "keye-vision", "keye-train", "keye-agents"):
        assert f"**{package}**" in text
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    pytest.importorskip("transformers")
    exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {"__name__": f"readme_{index}"})
