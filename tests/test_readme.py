"""The README's Python snippets run as written (from the repository root, in one namespace, in order)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT, SHARED_DATA


def readme_python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    # Only blocks fenced exactly as ```python run; ```python skip (or any other info string) is left out.
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_snippets():
    blocks = readme_python_blocks()
    assert len(blocks) >= 4
    joined = "\n".join(blocks)
    for usage in ("create_model", "from_pretrained", "pipeline(", "Trainer("):
        assert usage in joined


def test_readme_snippets_run(tmp_path):
    if not (SHARED_DATA / "cifar10").is_dir():
        import pytest

        pytest.skip("the README's snippets read ../shared/data/cifar10")
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n\n".join(readme_python_blocks()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README snippets failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "27648" in result.stdout  # the parameter difference the README's first snippet prints
