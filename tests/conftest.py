"""Shared fixtures: an isolated persllm home, a tiny random model, small persona projects, and server helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def persllm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session (the embedded model is prepared at most once); reuse $PERSLLM_TEST_HOME."""
    preset = os.environ.get("PERSLLM_TEST_HOME")
    home = Path(preset) if preset else tmp_path_factory.mktemp("persllm-home")
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(autouse=True)
def _isolated_home(persllm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSLLM_HOME", str(persllm_home))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random Gemma3 model with a locally trained tokenizer and persllm's chat template."""
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


MINIMAL_YAML = """\
name: Test Person
language: en
stages:
  - id: early
    label: "1900"
    description: A young engineer in Vienna.
    knowledge: early_knowledge.txt
    style: early_style.txt
  - id: late
    label: "1930"
    description: A famous inventor in Berlin.
    knowledge: late_knowledge.txt
    style: late_style.txt
"""

KNOWLEDGE = {
    "early": [
        "Test Person was born in 1878 in Graz and moved to Vienna in 1896 to study engineering at the Technical University.",
        "In 1899 she built a small steam turbine with her friend Otto Berger in a workshop near the Danube canal.",
        "Her teacher Professor Klein encouraged her to publish a paper on turbine blades in 1900.",
        "She lived with her aunt Maria in a narrow flat on the Wiedner Hauptstrasse and walked to lectures every day.",
    ],
    "late": [
        "In 1921 Test Person founded a company in Berlin that made electric motors for trams.",
        "She received the Siemens Ring in 1927 for her work on efficient motors.",
        "By 1930 her factory employed four hundred workers and exported motors to Sweden and Italy.",
        "She married the chemist Hans Vogel in 1924 and they had one son, Peter.",
    ],
}
STYLE = {
    "early": [
        "I do not care what the professors say about women in workshops; a turbine does not ask who built it.",
        "Every evening I sketch blades by candlelight, and every morning I find a mistake in them.",
        "Vienna is loud and proud, but the canal at dawn is the quietest place I know.",
        "I think engineering is the most honest art there is, because the machine either turns or it does not.",
    ],
    "late": [
        "A factory is a promise to four hundred families, and I keep my promises.",
        "I have no patience for speculators who never held a spanner in their lives.",
        "The prize pleased my son more than me; I would rather have a better motor than a ring.",
        "Berlin has changed, and I fear the loud men in the streets more than any failing machine.",
    ],
}


def write_project(root: Path, yaml_text: str = MINIMAL_YAML, knowledge: dict[str, list[str]] | None = None,
                  style: dict[str, list[str]] | None = None) -> Path:
    """Write a small two-stage persona project into `root` and return the directory."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "persona.yaml").write_text(textwrap.dedent(yaml_text), encoding="utf-8")
    for stage, lines in (knowledge or KNOWLEDGE).items():
        (root / f"{stage}_knowledge.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for stage, lines in (style or STYLE).items():
        (root / f"{stage}_style.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A fresh copy of the small two-stage test project."""
    return write_project(tmp_path / "person")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): the tiny model
    gains nothing from two, and OpenMP threads spinning against other processes on a busy 2-core box made whole
    files 10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> httpx.Response | None:  # type: ignore[type-arg]
    """GET `url` until it answers 200; None when `proc` exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return None


CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                                    reason=f"needs Chromium at {CHROMIUM} (apt install chromium)")


@contextlib.contextmanager
def chromium_page(path: Path) -> Iterator[tuple[Any, list[str]]]:
    """A local HTML file loaded in headless Chromium, with every console error, page error and failed request."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in (
                "error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            yield page, problems
        finally:
            browser.close()
