"""README's Python examples run as written (blocks marked `# needs-network` are skipped here)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if code.startswith("# needs-network"):
        pytest.skip("downloads from the Hugging Face hub")
    if code.startswith("# needs-server"):
        pytest.skip("a client of `bitfit-fast serve`: tests/test_server.py runs it against a server")
    exec(compile(code, f"README.md[python block {index}]", "exec"), {})
