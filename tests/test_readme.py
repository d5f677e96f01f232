"""The README's first-screen and usage examples run as written."""

import pathlib
import re

import tilecl._torch_tiled as torch_tiled

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_first_screen_example_runs():
    text = README.read_text()
    first = "\n".join(text.splitlines()[:40])  # what a visitor sees first
    for what in ("pip install", "make demo", "make test", "dense", "tilecl"):
        assert what in first, f"the README's first screen lacks {what!r}"
    assert not re.search(r"\bissue\b", first, re.I), "no internal jargon on the first screen"
    blocks = _python_blocks(first)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 6
    torch_tiled.reset_tile_size()  # a user's tiles, not the tests' tiny ones
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["loss"].dim() == 0 and namespace["img"].grad is not None


def test_readme_usage_example_runs():
    text = README.read_text()
    usage = text[text.index("\n## Usage\n"):]
    blocks = _python_blocks(usage)
    assert blocks, "README has no usage example"
    torch_tiled.reset_tile_size()
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["loss"].requires_grad
