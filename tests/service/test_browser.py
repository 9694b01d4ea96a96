"""The web page in a real browser: Debian's chromium, headless, against a real `bitalloc serve` with refllama-s.
Screenshot + DOM assertions (the DOM as chromium has it after the page and its images loaded)."""
import os
import re
import shutil
import struct
import subprocess

import pytest

CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run must install Debian's chromium package")
        pytest.skip("chromium not found (apt-get install chromium)")
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=8000", *args], capture_output=True, text=True, timeout=120)


def dom(url: str) -> str:
    r = _chromium("--dump-dom", url)
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-1000:]
    return r.stdout


def screenshot(url: str, path, size=(1280, 2000)):
    r = _chromium(f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url)
    assert r.returncode == 0 and path.is_file(), r.stderr[-1000:]
    width, height = struct.unpack(">II", path.read_bytes()[16:24])      # the PNG's IHDR
    return width, height


def test_the_plan_page_in_a_browser(server, small_plan, tmp_path):
    plan_id = small_plan[2]
    page = dom(f"{server.url}/plans/{plan_id}")
    for image in ("heatmap", "pareto"):         # the charts loaded (their onload ran)
        tag = re.search(rf'<img id="{image}"[^>]*>', page).group(0)
        assert 'data-loaded="1"' in tag, tag
    layers = re.search(r'<table id="layers">(.*?)</table>', page, re.S).group(1)
    assert layers.count("<tr>") == 1 + 56                  # header + refllama-s's 56 layers
    assert re.search(r'id="true-bpw">3\.19\d\d<', page)
    exports = re.findall(r'class="button export" href="([^"]+)"', page)
    assert [e.rsplit("/", 1)[-1] for e in exports] == ["gptqmodel", "llama.cpp", "compressed-tensors"]
    assert screenshot(f"{server.url}/plans/{plan_id}", tmp_path / "plan.png") == (1280, 2000)
    assert (tmp_path / "plan.png").stat().st_size > 50_000          # a page with charts, not a blank one


def test_the_index_lists_models_plans_and_jobs(server, small_plan):
    page = dom(server.url + "/")
    assert re.search(r'<a href="/models/refllama-s">refllama-s</a>', page)
    assert f'href="/plans/{small_plan[2]}"' in page
    assert re.search(rf'<tr data-job="{small_plan[0]["id"]}" data-state="done">', page)
    model = dom(server.url + "/models/refllama-s")
    assert 'data-loaded="1"' in re.search(r'<img id="pareto"[^>]*>', model).group(0)
