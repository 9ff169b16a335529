"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 1024, 512)
    report = namespace["tracker"].report()
    assert len(report) == 1 and 0 < next(iter(report.values()))["usage"] <= 1


def test_readme_ci_blocks_exist():
    text = README.read_text()
    for step in ("setup", "test"):
        block = re.search(rf"<!-- ci:{step} -->\n```bash\n(.+?)\n```\n<!-- /ci:{step} -->", text, re.S)
        assert block and block.group(1).strip(), step
