"""The web UI in a real headless Chromium (Debian's), driven by Playwright, against the real
server."""

import re
import shutil

import pytest

from zerolm.serve.limits import Limits

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: bash scripts/setup.sh test installs it")
def test_chat_streams_a_reply_and_the_inspector_shows_probabilities_and_attention(launch):
    from playwright.sync_api import expect, sync_playwright

    srv = launch(api_key="sk-browser")
    srv.server.limits = Limits(max_tokens=1000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(e))
            page.goto(srv.url + "/")
            expect(page.locator("#status")).to_contain_text("error")  # no key yet: the 401 is shown
            page.fill("#api_key", "sk-browser")
            page.dispatch_event("#api_key", "change")
            expect(page.locator("#status")).to_contain_text("model tiny")
            page.fill("#max_tokens", "12")
            page.fill(
                "#temperature", "0"
            )  # greedy: this random model's reply is then a fixed 12 tokens
            page.fill("#input", "床前明月光，疑是地上霜。")
            page.press("#input", "Enter")
            expect(page.locator(".msg.user")).to_have_text("user床前明月光，疑是地上霜。")
            reply = page.locator(".msg.assistant")
            expect(reply).to_have_attribute("data-done", "length", timeout=30_000)
            tokens = reply.locator(".tok")
            expect(tokens).to_have_count(12)  # one span per streamed token
            tokens.nth(3).click()
            expect(page.locator("#tok-prob")).to_have_text(re.compile(r"^\d+\.\d\d%$"))
            prob = page.locator("#tok-prob").text_content()
            assert prob.endswith("%") and 0 < float(prob[:-1]) <= 100
            expect(page.locator("#alts tr")).to_have_count(
                5
            )  # top_logprobs=5 alternatives with bars
            heat = page.locator("#heatmap")
            page.wait_for_selector("#heatmap[data-rows]")
            rows, row = int(heat.get_attribute("data-rows")), int(heat.get_attribute("data-row"))
            assert row == rows - 1  # the clicked (4th) token is the last row of its context
            expect(page.locator("#ctx span")).to_have_count(rows)
            page.select_option("#layer", "1")
            page.wait_for_function("document.querySelector('#ctx span') !== null")
            page.fill("#input", "Stop me")  # the stop button ends a reply early
            page.fill("#max_tokens", "900")  # greedy: this reply runs 900 tokens unless stopped
            page.press("#input", "Enter")
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant')[1]?.querySelector('.tok')"
            )
            page.evaluate("document.getElementById('stop').click()")
            expect(page.locator(".msg.assistant").nth(1)).to_have_attribute("data-done", "stopped")
            assert errors == []
        finally:
            browser.close()
