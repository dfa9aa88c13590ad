"""The chat page at `/`, in a real headless browser (Debian's chromium driven by Playwright): attach an
image (file picker, drag and drop, paste), ask, watch the answer stream in, follow up, start a new chat, see
the server's errors."""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

import pytest

from idefics2 import pipeline
from idefics2.server import ServerSettings, create_app
from idefics2.serving import Engine
from server_utils import EXAMPLE, serving

CHROMIUM = os.environ.get("IDEFICS2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
SCREENSHOT = os.environ.get("IDEFICS2_CHAT_SCREENSHOT")  # write the page's screenshot here (README)

# a DataTransfer holding examples/shapes.png, for drop and paste events
DATA_TRANSFER = """
(b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], "shapes.png", { type: "image/png" }));
  return transfer;
}
"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-sync",
                "--disable-component-update",
                "--no-first-run",
            ],  # fmt: skip
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    chat = pipeline()
    engine = Engine(chat.model, chat.processor, max_batch=4)
    with serving(create_app(engine, ServerSettings(model_name="idefics2-builtin"))) as base:
        page = browser.new_page(viewport={"width": 1000, "height": 720})
        page.goto(base)
        yield page
        page.close()


def answers(page) -> list[str]:
    return page.locator(".message.assistant .text").all_inner_texts()


def ask(page, text: str) -> str:
    before = len(answers(page))
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.message.assistant').length > {before}")
    page.wait_for_selector("#stop", state="hidden")  # the stream has ended
    return answers(page)[-1]


def test_upload_ask_and_see_the_answer_stream_in(page):
    assert page.locator("#model").inner_text() == "idefics2-builtin"
    page.set_input_files("#file-input", str(EXAMPLE))
    page.wait_for_selector("#attachments img")
    assert ask(page, "What color is the circle?") == "green"
    assert page.locator("#attachments img").count() == 0  # sent with the message
    assert page.locator(".message.user img").count() == 1
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOT)


def test_follow_up_keeps_the_history(page):
    assert ask(page, "How many squares are there?") == "2"  # the image of the first turn is still there
    assert len(answers(page)) == 2


def test_new_chat_drop_and_paste(page):
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    b64 = base64.b64encode(EXAMPLE.read_bytes()).decode()
    transfer = page.evaluate_handle(DATA_TRANSFER, b64)
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#attachments img")
    assert ask(page, "What shape is the purple one?") == "triangle"
    page.click("#new-chat")
    paste = "(b64) => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: (%s)(b64)}))"
    page.evaluate(paste.replace("%s", DATA_TRANSFER.strip()), b64)
    page.wait_for_selector("#attachments img")
    assert ask(page, "Is there any yellow square?") == "yes"


def test_the_servers_errors_are_shown(page):
    page.click("#new-chat")
    page.fill("#max-tokens", "100000")
    page.fill("#prompt", "Hello")
    page.click("#send")
    error = page.wait_for_selector(".message.error")
    assert "positions" in error.inner_text() and "100000" in error.inner_text()
    page.fill("#max-tokens", "256")


def test_stop_cancels_a_long_answer(browser, tmp_path_factory):
    """A random checkpoint that talks for long: Stop ends the answer in the page and cancels it on the
    server."""
    from oracle_model import build_reference_checkpoint
    from oracle_processing import build_reference_processor

    folder = tmp_path_factory.mktemp("random")
    build_reference_checkpoint(folder)
    build_reference_processor(folder, image_seq_len=4, longest_edge=56, shortest_edge=28)
    chat = pipeline(folder)
    engine = Engine(chat.model, chat.processor, max_batch=2, max_length=512)
    with serving(create_app(engine)) as base:
        page = browser.new_page()
        page.goto(base)
        page.fill("#max-tokens", "450")
        page.fill("#prompt", "Talk for a long time.")
        page.click("#send")
        page.wait_for_function("document.querySelector('.message.assistant .text')?.textContent.length > 0")
        page.click("#stop")
        page.wait_for_selector("#stop", state="hidden")
        assert answers(page)[-1].endswith("[stopped]")
        page.close()
        deadline = time.monotonic() + 10  # the server cancels at its next decode step
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0 and engine.steps < 440
