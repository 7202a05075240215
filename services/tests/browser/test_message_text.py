"""Message text is text: markup in a message is shown, never run or turned into
elements, live or after a reload; only http(s) URLs become links, and safe ones."""

from __future__ import annotations

import pytest

from tests.browser.support import composer, expect, message_bodies, wait_live

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

SCRIPT = '<script>alert("script ran")</script>'
IMG = "<img src=x onerror=\"alert('onerror ran')\">"
LINKS = (
    "Docs: https://example.com/path?q=1&r=2, "
    "Ada: (https://en.wikipedia.org/wiki/Ada_(programming_language)). "
    "Not links: javascript:alert(1) ftp://example.com/f data:text/html,hi"
)
HREFS = [
    "https://example.com/path?q=1&r=2",
    "https://en.wikipedia.org/wiki/Ada_(programming_language)",
]


def elements_in_messages(page) -> list[str]:
    return page.eval_on_selector_all(
        "#message-list .message-body *", "els => els.map(e => e.tagName.toLowerCase())"
    )


def check(page) -> None:
    expect(page.locator("#m-3 .message-body")).to_have_text(LINKS)
    assert message_bodies(page) == [SCRIPT, IMG, LINKS]
    assert elements_in_messages(page) == ["a", "a"]
    links = page.locator("#message-list .message-body a")
    assert [links.nth(i).get_attribute("href") for i in range(2)] == HREFS
    for i in range(2):
        expect(links.nth(i)).to_have_attribute("rel", "noopener noreferrer nofollow")
        expect(links.nth(i)).to_have_attribute("target", "_blank")
    expect(page.locator("img:not(.brand img)")).to_have_count(0)
    assert page.evaluate("document.scripts.length") == 1  # parley.js, nothing else
    assert page.dialogs == []


def test_markup_in_messages_is_shown_as_text_live_and_after_reload(stack, new_page):
    ada = stack.api.account("ada", "Ada Lovelace")
    bob = stack.api.account("bob", "Bob Babbage")
    cid = stack.api.direct(ada, bob)
    stack.route_to(stack.replicas["A"], stack.replicas["B"])
    sender = new_page(ada)
    sender.goto(f"/c/{cid}/")
    reader = new_page(bob)
    reader.goto(f"/c/{cid}/")
    wait_live(sender)
    wait_live(reader)

    for text in (SCRIPT, IMG, LINKS):
        composer(sender).fill(text)
        composer(sender).press("Enter")
        expect(composer(sender)).to_have_value("")
    for page in (sender, reader):  # rendered live by the script
        check(page)
    reader.reload()  # rendered by the server, then linked by the script
    wait_live(reader)
    check(reader)
    assert stack.api.seqs_and_bodies(ada, cid) == [(1, SCRIPT), (2, IMG), (3, LINKS)]


def test_a_refused_send_shows_why_and_gives_the_text_back(stack, new_page):
    ada = stack.api.account("ada", "Ada Lovelace")
    bob = stack.api.account("bob", "Bob Babbage")
    cid = stack.api.direct(ada, bob)
    page = new_page(ada)
    page.goto(f"/c/{cid}/")
    wait_live(page)
    # The text box stops at the limit; a pasted or scripted text can still be longer.
    page.eval_on_selector("#composer textarea", "e => e.removeAttribute('maxlength')")
    long_text = "x" * 4001
    composer(page).fill(long_text)
    composer(page).press("Enter")
    alert = page.locator("#composer-alert")
    expect(alert).to_be_visible()
    expect(alert).to_have_text("body is 4001 characters; the limit is 4000.")
    expect(alert).to_have_attribute("role", "alert")
    expect(composer(page)).to_have_value(long_text)  # kept, to shorten and send again
    expect(page.locator("#message-list > li")).to_have_count(0)
    composer(page).fill("short enough")
    expect(alert).to_be_hidden()
    composer(page).press("Enter")
    expect(page.locator("#m-1 .message-body")).to_have_text("short enough")
    assert stack.api.seqs_and_bodies(ada, cid) == [(1, "short enough")]
