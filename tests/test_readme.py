"""The README's Python example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README has no python block under 'Quick start'"
    namespace = {}
    exec(compile(blocks[0], "README.md:quick-start", "exec"), namespace)
    out = namespace["out"]
    assert out.loss.requires_grad and bool(out.elbo.isfinite().all()) and bool((out.elbo < 0).any())
