"""The chat page in front of a server that lacks most features, in headless Chromium.

The server is `create_app` in process with the conftest's FakeProvider (it streams the last user
message back; "fail" fails, "fail midway" fails after one chunk): no API keys, no embeddings, no
files or vector stores, no shields, no vision. Each missing feature must say so on the page, and
chat must still work; a failed reply must show the server's error.
"""

from __future__ import annotations

import pytest

from tests.stack.conftest import InProcessServer
from tests.ui.test_chat_page import Page


class _Url:
    """What `Page` reads of a server: its root URL and its log (an in-process server has none)."""

    def __init__(self, server: InProcessServer):
        self.url = server.base_url.removesuffix("/v1")

    def log(self) -> str:
        return "(in-process server)"


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    server = InProcessServer(tmp_path_factory.mktemp("bare-server")).start()
    p = Page(browser, _Url(server), tmp_path_factory.mktemp("screenshots"))
    browser.get(p.server.url + "/")
    p.js("localStorage.clear()")
    p.open()
    yield p
    server.stop()


def test_missing_features_say_so(page):
    assert page.js("return document.getElementById('model').value") == "fake-llm"
    assert page.notice() == ""  # no key needed: nothing complained
    assert "No shields on this server" in page.el("#shield-status").get_attribute("textContent")
    assert page.js("return document.getElementById('shield-on').disabled")
    docs = page.el("#docs-status").text
    assert "Documents are unavailable on this server" in docs and "vector stores are not configured" in docs
    assert page.js("return document.getElementById('doc-input').disabled")


def test_chat_still_streams(page):
    page.send("echo this **back**")
    page.wait_idle(30)
    reply = page.replies()[-1]
    assert reply.find_element("css selector", ".body strong").text == "back"  # Markdown rendered
    assert page.notice() == ""
    # Saved as a conversation (the Conversations API works without a model), listed in the sidebar.
    page.wait(lambda: "echo this **back**" in page.el("#conversations").text, 10, "the saved conversation")


def test_image_on_a_text_model(page, tmp_path):
    from PIL import Image

    image = tmp_path / "dot.png"
    Image.new("RGB", (4, 4), (0, 0, 0)).save(image)
    page.el("#image-input").send_keys(str(image))
    assert "fake-llm has no vision" in page.wait(page.notice, 10, "the no-vision message")


@pytest.mark.parametrize("message", ["fail", "fail midway"])
def test_server_errors_are_shown(page, message):
    replies = len(page.replies())
    page.send(message)
    page.wait_idle(30)
    assert page.wait(page.notice, 10, "the error") == "internal server error"
    assert len(page.replies()) == replies  # the failed reply was taken off the page
    assert message not in [c["title"] for c in page.js("return JSON.parse(localStorage.getItem('corral.conversations'))")]
    assert page.el("#prompt").is_enabled()
