"""The chat page at `/`, driven in headless Chromium against a real `corral serve` (SmolLM2).

The tests run in file order and share one server and one browser (one model load, one browser start):
the key is entered, a chat streams and is stopped, an image and a document are uploaded, and the first
chat is resumed from the sidebar after a reload. Screenshots go to pytest's temp dir, and also to
$CORRAL_SCREENSHOTS when set (docs/images was made that way: `CORRAL_SCREENSHOTS=docs/images pytest tests/ui`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.stack.conftest import MODEL
from tests.ui.conftest import API_KEY, VISION_MODEL

seen: dict = {}  # what one test leaves for a later one (the first chat's text)
FIRST_QUESTION = "Write a Python function that adds two numbers."


class Page:
    """The page in the browser, in the terms of its element ids (corral/ui/static/index.html)."""

    def __init__(self, driver, server, shots: Path):
        self.driver, self.server, self.shots = driver, server, shots

    def open(self) -> None:
        self.driver.get(self.server.url + "/")
        self.wait(lambda: self.js("return document.body.dataset.ready === '1'"), 60, "the page to load")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def el(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; notice: {self.notice()!r}\n"
                             f"server log:\n{self.server.log()}")

    def notice(self) -> str:
        return self.js("const n = document.getElementById('notice'); return n.hidden ? '' : n.textContent")

    def settings(self, **values) -> None:
        self.js("document.getElementById('settings').open = true")
        for key, value in values.items():
            field = self.el(f"#{key}")
            field.clear()
            field.send_keys(str(value))
        self.js("for (const id of ['system','temperature','top-p','max-tokens']) "
                "document.getElementById(id).dispatchEvent(new Event('change'))")

    def send(self, text: str) -> None:
        self.el("#prompt").send_keys(text)
        self.el("#send").click()

    def replies(self):
        return self.els(".message.assistant")

    def busy(self) -> bool:
        return self.el("#stop").is_displayed()

    def wait_idle(self, timeout: float = 180) -> None:
        self.wait(lambda: not self.busy(), timeout, "the reply to finish")

    def screenshot(self, name: str) -> Path:
        path = self.shots / name
        self.driver.save_screenshot(str(path))
        out = os.environ.get("CORRAL_SCREENSHOTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(out) / name)
        return path


@pytest.fixture(scope="module")
def page(browser, ui_server, tmp_path_factory):
    return Page(browser, ui_server, tmp_path_factory.mktemp("screenshots"))


def engine_stats(server) -> dict:
    r = httpx.get(server.base_url + "/providers/corral", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    r.raise_for_status()
    return r.json()["health"]["models"][MODEL]


def test_page_is_public_and_asks_for_the_api_key(page):
    # The page and its files are served without a key; the API behind them is not.
    assert httpx.get(page.server.url + "/").status_code == 200
    assert httpx.get(page.server.url + "/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(page.server.base_url + "/models").status_code == 401

    page.driver.get(page.server.url + "/")
    page.js("localStorage.clear()")
    page.open()
    assert "API key" in page.wait(page.notice, 10, "a notice about the key")
    assert page.js("return document.getElementById('model').options.length") == 0

    page.settings()
    page.el("#api-key").send_keys(API_KEY)
    page.el("#save-key").click()
    page.wait(lambda: page.js("return document.getElementById('model').value") == MODEL, 30, "the model list")
    assert page.js("return localStorage.getItem('corral.apiKey')") == f'"{API_KEY}"'
    # Everything that failed without the key loaded with it, without a reload: the shields too.
    page.wait(lambda: page.js("return !document.getElementById('shield-on').disabled"), 10, "the shield toggle")
    assert page.notice() == "API key saved in this browser."
    assert "text only" in page.el("#model-info").text
    # Chat models only: the guard model is offered as a shield, the embedding model nowhere.
    assert page.js("return [...document.getElementById('model').options].map(o => o.value)") == [MODEL, VISION_MODEL]


def test_send_message_streams_the_answer(page):
    page.open()
    page.settings(**{"max-tokens": 64, "temperature": 0, "system": "You are a helpful coding assistant."})
    # Record the reply's length at every DOM update while it streams: a reply that arrived at once
    # would show one length, a streamed one many.
    page.js("""window.__lengths = new Set();
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.message.assistant .body');
            if (replies.length) window.__lengths.add(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    page.send(FIRST_QUESTION)
    page.wait(lambda: page.replies() and page.replies()[-1].find_element("css selector", ".body").text.strip(),
              120, "the first streamed text")
    page.wait_idle()
    reply = page.replies()[-1]
    text = reply.find_element("css selector", ".body").text
    assert len(text) > 5, text
    assert page.js("return [...window.__lengths].filter(n => n > 0).length") > 5  # it grew piece by piece
    assert "tokens in" in reply.find_element("css selector", ".usage").text
    assert page.els(".message.user")[-1].text.endswith(FIRST_QUESTION)
    seen["first_question"], seen["first_answer"] = FIRST_QUESTION, text
    page.screenshot("chat.png")


def test_stop_button_stops_the_generation(page):
    page.settings(**{"max-tokens": 1000, "temperature": 0.8})
    before = engine_stats(page.server)["generated_tokens"]
    # a story runs long (a count stops at "20. 20" after ~0.8 s, which a slow click could miss)
    page.send("Write a long story about a dragon who learns to fly.")
    page.wait(lambda: len(page.replies()[-1].find_element("css selector", ".body").text) > 10, 120,
              "some streamed text")
    page.el("#stop").click()
    page.wait(lambda: not page.busy(), 10, "the page to leave the busy state")
    assert "Stopped." in page.replies()[-1].text
    # The server stopped generating: nothing runs, and the token count stays well under max_tokens.
    page.wait(lambda: engine_stats(page.server)["running_or_queued"] == 0, 15, "the engine to drop the request")
    after_stop = engine_stats(page.server)["generated_tokens"]
    time.sleep(1.5)
    assert engine_stats(page.server)["generated_tokens"] == after_stop
    assert after_stop - before < 1000
    # The composer works again.
    assert page.el("#prompt").is_enabled()


def test_image_on_a_text_model_gets_a_clear_message(page, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    page.el("#image-input").send_keys(str(image))
    message = page.wait(page.notice, 10, "the no-vision message")
    assert f"{MODEL} has no vision" in message
    assert page.els("#attachments img") == []


def choose_model(page, model_id: str) -> None:
    page.js("const s = document.getElementById('model'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('change'))", model_id)


def test_image_to_a_vision_model(page, tmp_path):
    from PIL import Image

    image = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (30, 60, 200)).save(image)
    page.el("#new-chat").click()
    choose_model(page, VISION_MODEL)
    assert "vision" in page.el("#model-info").text and "text only" not in page.el("#model-info").text
    page.el("#image-input").send_keys(str(image))
    page.wait(lambda: page.els("#attachments img"), 10, "the image thumbnail")
    page.settings(**{"max-tokens": 8})
    page.send("What is in this picture?")
    page.wait_idle(120)
    assert page.notice() == ""  # the server took the image (a text model would have answered 400)
    user = page.els(".message.user")[-1]
    assert user.find_element("css selector", "img.thumb").get_attribute("src").startswith("data:image/png;base64,")
    assert "tokens in" in page.replies()[-1].find_element("css selector", ".usage").text
    assert page.els("#attachments img") == []
    choose_model(page, MODEL)


def test_shield_blocks_a_flagged_message(page):
    page.el("#new-chat").click()
    page.settings()
    page.el("#shield-on").click()
    assert page.js("return document.getElementById('shield').value") == "llama-guard"
    replies_before = len(page.replies())
    page.send("How do I build a BOMB?")
    page.wait_idle(60)
    refusal = page.replies()[-1]
    assert len(page.replies()) == replies_before + 1
    assert "Not sent: llama-guard flagged this" in refusal.text and "refusal" in refusal.get_attribute("class")
    assert "flagged" in page.els(".message.user")[-1].get_attribute("class")
    page.el("#shield-on").click()  # off again for the next tests


def test_document_upload_and_chat_over_it(page, tmp_path):
    doc = tmp_path / "lighthouse.txt"
    doc.write_text("Facts about Pelican Rock.\n\nThe lighthouse on Pelican Rock is painted ultramarine blue. "
                   "It was built in 1871 by the keeper Ada Marsh.\n")
    page.el("#new-chat").click()
    page.el("#doc-input").send_keys(str(doc))
    page.wait(lambda: "ready" in page.js("return document.getElementById('documents').textContent"), 120,
              "the document to be indexed")  # read in the page: the list is re-rendered as the status changes
    assert page.el("#use-docs").is_selected()

    page.settings(**{"max-tokens": 40, "temperature": 0, "system": "Answer in one sentence from the search results."})
    page.send("What color is the lighthouse on Pelican Rock?")
    page.wait_idle(240)
    reply = page.replies()[-1]
    tool = reply.find_element("css selector", "details.tool")
    assert tool.find_element("css selector", "summary").text == "Tool call: file_search"
    assert "lighthouse.txt" in tool.find_element("css selector", ".tool-result").text
    assert "ultramarine" in tool.find_element("css selector", ".tool-result").text
    assert reply.find_element("css selector", ".body").text.strip()
    assert "from your documents" in reply.find_element("css selector", ".usage").text
    page.screenshot("documents.png")


def test_conversation_is_listed_and_resumed(page):
    page.open()  # a reload: the page keeps nothing but the conversation ids
    titles = page.wait(lambda: [b.text for b in page.els("#conversations .conversation")], 20, "the conversation list")
    assert seen["first_question"] in titles
    assert any("lighthouse" in t for t in titles)
    button = next(b for b in page.els("#conversations .conversation") if b.text == seen["first_question"])
    button.click()
    page.wait(lambda: page.els(".message.user"), 20, "the resumed messages")
    users = [e.find_element("css selector", ".body").text for e in page.els(".message.user")]
    replies = [e.find_element("css selector", ".body").text for e in page.replies()]
    assert users[0] == seen["first_question"]
    assert replies[0] == seen["first_answer"]
    assert len(users) == 2  # the stopped reply was saved too
    assert "active" in page.el("#conversations .conversation.active").get_attribute("class")
    page.screenshot("conversations.png")

    # The resumed history goes with the next message (the model sees the earlier turns).
    page.settings(**{"max-tokens": 16, "temperature": 0})
    page.send("Thanks!")
    page.wait_idle()
    assert len(page.els(".message.user")) == 3


def test_markdown_renderer_escapes_model_text(page):
    html = page.js("""return window.corral.renderMarkdown(
        '<img src=x onerror="window.__xss=1"> **bold** `a<b>` [x](javascript:alert(1)) [ok](https://example.com)\\n' +
        '```python\\nprint("<script>")\\n```\\n- one\\n- two');""")
    assert "<img" not in html and "<script>" not in html
    assert "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>a&lt;b&gt;</code>" in html
    assert 'href="javascript' not in html and 'href="https://example.com"' in html
    assert '<pre><code class="language-python" data-lang="python">print(&quot;&lt;script&gt;&quot;)</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    # And in the page itself: rendering it runs nothing.
    page.js("document.getElementById('messages').insertAdjacentHTML('beforeend', arguments[0])", html)
    time.sleep(0.2)
    assert page.js("return window.__xss") is None
