"""The README's usage example runs as written."""

import pathlib
import re

import tilecl._torch_tiled as torch_tiled

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    torch_tiled.reset_tile_size()  # a user's tiles, not the tests' tiny ones
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["loss"].requires_grad
