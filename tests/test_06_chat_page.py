"""Lesson 06's chat page (static/chat.html + chat.js + chat.css, served at GET /) in a real headless browser.

Driver: Playwright (pinned in requirements-dev.txt) launching the SYSTEM Chromium (Debian's `chromium`,
installed by .ci/run); Playwright's own browser download is never used. Why Playwright rather than Selenium:
console messages, page errors and request interception are first-class events in Playwright, and
selenium 4.52's dependency pins (certifi >= 2026.10.23) do not resolve on the package index we install from.

The server is the real one (tests/test_06_serve.make_server, auth on, the local SmolLM2 model), run in a
thread; max_tokens stays small. Without a browser the tests skip, except under CI=true where they fail.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from common.serving import Running
from test_06_serve import JWT_SECRET, KEY, PASSWORD, USER, gauges, make_server, serve
from test_06_serve import tiny_checkpoint  # noqa: F401  (fixture: lesson 04 trained for a few steps)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "06_chat_page.png"   # rewritten only with LLM_COURSE_UPDATE_SCREENSHOT=1
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def chromium_path() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe is None or sync_playwright is None:
        why = "no system Chromium (apt-get install chromium)" if exe is None else "playwright is not installed"
        if IN_CI:
            pytest.fail(f"CI=true but {why}: .ci/run must install it")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def running(local_fp32, tmp_path_factory):
    db = tmp_path_factory.mktemp("chat_page") / "sessions.sqlite3"
    keys = serve.Auth([KEY], {USER: PASSWORD}, JWT_SECRET, 30, failed_limit=1000)
    with Running(make_server(local_fp32, db, auth=keys, max_context=512)) as run:
        yield run


@pytest.fixture()
def page(browser, running):
    """A fresh tab (own storage) on the chat page with the right key in sessionStorage; console errors collected."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 700})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.add_init_script(f"if (sessionStorage.getItem('llm-course-api-key') === null) "
                       f"sessionStorage.setItem('llm-course-api-key', {json.dumps(KEY)})")
    pg.url_root = running.base_url.removesuffix("/v1") + "/"
    pg.goto(pg.url_root)
    pg.wait_for_function("document.querySelector('#model').options.length > 0")
    yield pg
    ctx.close()


def fill(pg, max_tokens: int, temperature: float = 0.0) -> None:
    pg.fill("#max-tokens", str(max_tokens))
    pg.fill("#temperature", str(temperature))


def count_updates(pg) -> None:
    """Count DOM updates of the assistant bubbles (a MutationObserver in the page)."""
    pg.evaluate("""() => { window.__updates = 0;
        new MutationObserver(() => { window.__updates += 1; })
          .observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true}); }""")


def last_reply(pg):
    return pg.locator(".msg.assistant").last


def test_page_is_public_static_and_loads_without_console_errors(page, running):
    import urllib.request

    with urllib.request.urlopen(page.url_root, timeout=30) as r:        # no key needed for the page itself
        assert r.status == 200 and "text/html" in r.headers["Content-Type"]
    js = (REPO / "static" / "chat.js").read_text(encoding="utf-8")
    assert len(js.splitlines()) <= 250
    assert not re.search(r"\.(inner|outer)HTML\s*\+?=|insertAdjacentHTML|document\.write", js)   # text only
    assert "http://" not in (REPO / "static" / "chat.html").read_text(encoding="utf-8")   # offline: no CDN
    assert page.locator("#model option").all_inner_texts() == [serve.MODEL_IDS["smollm2"]]
    assert page.title().startswith("第 6 课")
    assert page.errors == []


def test_reply_streams_incrementally_shows_ttft_and_speed_and_reload_restores(page, running, tmp_path):
    fill(page, 32)
    count_updates(page)
    page.fill("#input", "Tell me a story about a cat.")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 20")
    mid_stream = page.evaluate("document.querySelector('.msg.assistant').classList.contains('streaming')")
    # docs/06's picture is refreshed on request only, so a test run never changes a tracked file
    shot = SCREENSHOT if os.environ.get("LLM_COURSE_UPDATE_SCREENSHOT") == "1" else tmp_path / "chat_page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0
    page.wait_for_selector(".msg.assistant .stats", timeout=120_000)
    updates = page.evaluate("window.__updates")
    reply = last_reply(page).locator(".text").inner_text()
    stats = last_reply(page).locator(".stats").inner_text()
    assert mid_stream and reply.strip() and updates >= 5                  # many pieces, not one final write
    assert "首 token" in stats and "token/秒" in stats and "32 个 token" in stats   # a story runs past 32 tokens
    assert page.errors == []
    page.reload()                                                         # the server's session brings it back
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user .text").all_inner_texts() == ["Tell me a story about a cat."]
    assert last_reply(page).locator(".text").inner_text() == reply
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_stop_aborts_the_stream_and_frees_the_slot(page, running):
    before = gauges(running)["llm_generated_tokens_total"]
    fill(page, 200, 1.0)

    def no_eos(route):                        # make the reply long for sure: the page itself never sets this
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))
    page.route("**/v1/chat/completions", no_eos)
    page.fill("#input", "Tell me a long story.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 10")
    assert gauges(running)["llm_running_batch_size"] == 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .stats")
    assert "已停止" in last_reply(page).locator(".stats").inner_text()
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        g = gauges(running)
        if (g["llm_running_batch_size"], g["llm_queue_length"]) == (0, 0):
            break
        time.sleep(0.1)
    assert (g["llm_running_batch_size"], g["llm_queue_length"]) == (0, 0)
    assert running.srv.engine.busy() == (0, 0)
    assert g["llm_generated_tokens_total"] - before < 200


def test_wrong_key_shows_the_401_message(page, running):
    page.evaluate("sessionStorage.setItem('llm-course-api-key', 'wrong-key')")
    page.reload()
    page.wait_for_selector("#notice:not([hidden])")
    assert "401" in page.inner_text("#notice") and "API key" in page.inner_text("#notice")
    assert page.is_visible("#api-key")
    page.fill("#api-key", KEY)                                           # the right key: the page recovers
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#notice", state="hidden")
    assert page.evaluate("sessionStorage.getItem('llm-course-api-key')") == KEY
    assert page.evaluate("localStorage.getItem('llm-course-api-key')") is None


def test_html_in_a_reply_is_shown_as_text(page):
    payload = "<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\"><b>bold</b>"
    chunks = [payload[:20], payload[20:]]
    events = "".join(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': c}}]})}\n\n" for c in chunks)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=events + "data: [DONE]\n\n"))
    page.fill("#input", "<i>hi</i>")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .stats")
    assert last_reply(page).locator(".text").inner_text() == payload
    assert page.locator(".msg.user .text").inner_text() == "<i>hi</i>"
    assert page.locator("#messages img, #messages script, #messages b, #messages i").count() == 0
    assert page.evaluate("window.__xss") is None


def test_page_works_with_a_lesson_04_checkpoint(browser, tiny_checkpoint, tmp_path):
    """The same page, unchanged, on a server running lesson 04's tiny GPT (`06_serve.py --checkpoint`)."""
    from common.exported import load_tiny_gpt

    tg, ckpt = tiny_checkpoint
    with Running(make_server(load_tiny_gpt(ckpt), tmp_path / "s.sqlite3", max_context=128)) as run:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.add_init_script(f"sessionStorage.setItem('llm-course-api-key', {json.dumps(KEY)})")
        pg.goto(run.base_url.removesuffix("/v1") + "/")
        pg.wait_for_function("document.querySelector('#model').options.length > 0")
        assert pg.locator("#model option").all_inner_texts() == ["tiny-gpt-small"]
        fill(pg, 24)
        pg.fill("#input", "ROMEO:")
        pg.press("#input", "Enter")
        pg.wait_for_selector(".msg.assistant .stats", timeout=120_000)
        assert "24 个 token" in last_reply(pg).locator(".stats").inner_text()
        assert last_reply(pg).locator(".text").inner_text().strip()
        ctx.close()

