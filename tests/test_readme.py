"""The README's usage example runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


# the README applies conv attention to random q, k, and says it is approximate
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
