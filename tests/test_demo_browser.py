"""The web demo driven in a real headless Chromium (Playwright): upload, ask twice, read the counts, bad uploads.

Skipped when gradio, playwright or /usr/bin/chromium is missing, except in CI (``CI=true``), where it must run:
.ci/run installs Debian's chromium and the ``demo`` extra.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
PHOTO = Path(__file__).resolve().parents[1] / "llava" / "serve" / "examples" / "chelsea.jpg"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STARTUP_S, ANSWER_MS = 240, 180_000

pytestmark = pytest.mark.slow


def missing() -> list[str]:
    """What the browser test needs and this environment lacks."""
    lacks = [name for name in ("gradio", "playwright") if find_spec(name) is None]
    return lacks + ([CHROMIUM] if not Path(CHROMIUM).is_file() else [])


@pytest.fixture(scope="module")
def browser_ready() -> None:
    lacks = missing()
    if lacks and IN_CI:
        pytest.fail(f"CI must run the browser test but lacks {lacks} (.ci/run installs chromium and the demo extra)")
    if lacks:
        pytest.skip(
            f"needs {lacks}: Debian's chromium (apt-get install -y chromium) and the demo extra "
            "(EXTRAS=dev,eval,demo bash scripts/setup.sh)"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(browser_ready: None, tiny_pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llava.serve.gradio_web`` on the tiny LLaVA-1.5, in a subprocess on a free localhost port."""
    port, log = free_port(), tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    command = [sys.executable, "-m", "llava.serve.gradio_web", "--model-path", str(tiny_pair["v15"]),
               "--port", str(port), "--max-new-tokens", "8"]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for(url: str, process: subprocess.Popen, log: Path) -> None:
    """Until ``url`` answers 200; fails with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the demo server did not answer within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def expected_full_tokens(checkpoint: Path) -> int:
    """Visual tokens of LLaVA-1.5 (square pad, flat, 'patch'), from the tower's config alone."""
    tower = Path(json.loads((checkpoint / "config.json").read_text())["mm_vision_tower"])
    vision = json.loads((tower / "config.json").read_text())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def kv_bytes_per_token(checkpoint: Path) -> int:
    """Keys and values of one token in every layer, fp32 (the demo loads on CPU), from config.json alone."""
    llm = json.loads((checkpoint / "config.json").read_text())
    heads, head_dim = (
        llm.get("num_key_value_heads", llm["num_attention_heads"]),
        llm["hidden_size"] // llm["num_attention_heads"],
    )
    return 2 * llm["num_hidden_layers"] * heads * head_dim * 4


def number(page, elem_id: str) -> float:
    return float(page.locator(f"#{elem_id} input").input_value())


def upload(page, path: Path) -> None:
    """Clear the file box if it holds a file, then upload ``path``."""
    clear = page.locator("#image-file button[aria-label=Clear]")
    if clear.count():
        clear.first.click()
    page.locator("#image-file input[type=file]").set_input_files(str(path))


def wait_status(page, *texts: str) -> str:
    """Until the status line holds every one of ``texts`` (together they must tell this event's status from the
    previous one's: Gradio shows a timer there while an event runs); the status then."""
    page.wait_for_function(
        "ts => { const s = document.querySelector('#status')?.innerText || ''; return ts.every(t => s.includes(t)); }",
        arg=list(texts), timeout=ANSWER_MS,
    )  # fmt: skip
    return page.locator("#status").inner_text()


def ask(page, question: str, turn: int) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()
    wait_status(page, f"Turn {turn}:")
    for side in ("full", "vz"):
        assert page.locator(f"#chat-{side} [data-testid=bot]").count() == turn


def test_demo_in_a_browser(server: str, tiny_pair: dict[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    dominant, contextual = 10, 3
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(server)
        page.wait_for_selector("#ask", timeout=60_000)
        upload(page, PHOTO)
        wait_status(page, "Loaded a 256x170 image")
        for elem_id, value in (("dominant", dominant), ("contextual", contextual)):
            field = page.locator(f"#{elem_id} input[type=number]")
            field.fill(str(value))
            field.press("Enter")
        full = expected_full_tokens(tiny_pair["v15"])
        legend = page.locator("#legend").inner_text()
        assert f"{full} patches + [CLS] = {full + 1} encoder tokens" in legend  # counted once, named each time
        assert f"{kv_bytes_per_token(tiny_pair['v15']):,} bytes per token" in legend
        ask(page, "What is in the image?", 1)
        assert number(page, "tokens-full") == full
        assert number(page, "tokens-vz") == dominant + contextual
        status = page.locator("#status").inner_text()
        assert f"received {dominant + contextual} visual tokens with VisionZip {dominant}+{contextual}" in status
        assert f"{full} without it" in status  # the status and the numbers agree
        assert number(page, "ttft-full") > 0 and number(page, "ttft-vz") > 0
        assert number(page, "kv-tokens-full") > number(page, "tokens-full")
        for side in ("full", "vz"):  # the memory is the tokens' keys and values, in MiB: not the same number
            mib = number(page, f"kv-tokens-{side}") * kv_bytes_per_token(tiny_pair["v15"]) / 2**20
            assert number(page, f"kv-mib-{side}") == pytest.approx(mib, abs=6e-4)
            assert number(page, f"kv-mib-{side}") != number(page, f"kv-tokens-{side}")
        assert page.locator("#kept img").count() == 1
        screenshot = tmp_path / "demo.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000
        runs = number(page, "encoder-runs")
        kv_before = number(page, "kv-tokens-vz")
        ask(page, "What colour is it?", 2)  # the same chats: image tokens and KV caches reused
        assert number(page, "encoder-runs") == runs
        assert number(page, "kv-tokens-vz") > kv_before and number(page, "tokens-vz") == dominant + contextual
        check_bad_uploads(page, tmp_path)
        check_an_in_llm_method(page, full)
        browser.close()


def check_an_in_llm_method(page, full: int) -> None:
    """FastV (K=1, a layer-average of 40 on the tiny model's 64 patches and 2 layers) in the right-hand chat: it gets
    every visual token and the status gives what it kept on average, (64 + 16) / 2 in and 16 out; bad options are
    refused in the status line."""
    page.locator("#method input[value=fastv]").check()
    page.locator("#method-options textarea").fill("layer=2")
    page.locator("#ask").click()
    wait_status(page, "Error, not asked", "FastV layer K=2 must be below the model's 2 decoder layers")
    page.locator("#method-options textarea").fill("layer=1, budget=40")
    page.locator("#ask").click()
    status = wait_status(page, "Turn 1:", "FastV K=1, layer-average 40")
    assert "on average over its layers 40.0 in / 16.0 out" in status
    assert number(page, "tokens-vz") == full  # the language model receives them all and prunes inside


def check_bad_uploads(page, tmp_path: Path) -> None:
    """A text file and a truncated JPEG: an error in the page; then the photo again, and the server answers."""
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(PHOTO.read_bytes()[:2000])
    for bad in (text, corrupt):
        upload(page, bad)
        status = wait_status(page, f"{bad.name} is not an image")
        assert "Error" in status and "not asked" not in status
        page.locator("#ask").click()  # asking about it says so too, and nothing is answered
        wait_status(page, "Error, not asked", f"{bad.name} is not an image")
        assert page.locator("#chat-vz [data-testid=bot]").count() == 2
    upload(page, PHOTO)
    wait_status(page, "Loaded a")
    ask(page, "And now?", 3)
