"""The README tells the truth: its test command is what CI runs, it stays a front page (≤ 12 KB), its links
lead to files, and the Python API page's snippet runs (after the walk-through has written plan.json and packed/)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
PYTHON_API = (REPO / "docs" / "python-api.md").read_text()


def _block(after: str, lang: str, text: str = README) -> str:
    start = text.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    return m.group(1)


def test_the_readme_test_command_is_what_ci_runs():
    command = _block("## Tests (what CI runs)", "bash").strip()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci


def test_the_readme_is_a_front_page_whose_links_lead_somewhere():
    assert len(README.encode()) <= 12 * 1024
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.slow
def test_the_python_snippet_runs_after_the_walk_through(tmp_path):
    snippet = _block("# Python API", "python", PYTHON_API)
    (tmp_path / "plan.json").write_text("{}")               # what the walk-through left behind
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "model.safetensors").write_text("walk-through")
    env = {**os.environ, "BITALLOC_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("BitPlan(56 layers, budget 3.2, true 3.1996 bpw")
    assert "'format': 'W3g128'" in r.stdout and "'cost': " in r.stdout
    assert (tmp_path / "plan.json").read_text() == "{}"       # the walk-through's files are left alone
    assert (tmp_path / "packed" / "model.safetensors").read_text() == "walk-through"
    assert "compressed-tensors" in (tmp_path / "plan-py-ct" / "config.json").read_text()
    from bitalloc import packed                       # a submodule: imported here, not by `import bitalloc`
    model = packed.load(tmp_path / "packed-py")
    assert model.bitalloc_plan.true_bpw == pytest.approx(3.1996, abs=1e-4)
