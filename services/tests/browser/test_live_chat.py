"""Two people chat in two browsers whose sockets are on different realtime replicas."""

from __future__ import annotations

import pytest

from tests.browser.support import composer, expect, message_bodies, message_seqs, wait_live

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

# Records every state a tick of the page goes through, in order (the page's CSP does not
# apply to what the test evaluates through the DevTools protocol).
RECORD_TICKS = """() => {
  window.tickStates = [];
  new MutationObserver((records) => {
    for (const r of records) {
      const node = r.target.nodeType === 1 ? r.target : null;
      for (const tick of r.type === "attributes" ? [node] : document.querySelectorAll(".tick")) {
        if (!tick || !tick.classList.contains("tick")) continue;
        const li = tick.closest("li.message");
        const entry = `${li.dataset.seq || li.dataset.clientId}:${tick.dataset.state}`;
        if (window.tickStates.at(-1) !== entry) window.tickStates.push(entry);
      }
    }
  }).observe(document.querySelector("#message-list"),
             {subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"]});
}"""


def test_two_users_on_two_replicas_chat_live_with_typing_presence_and_read_ticks(stack, new_page):
    ada = stack.api.account("ada", "Ada Lovelace")
    bob = stack.api.account("bob", "Bob Babbage")
    cid = stack.api.direct(ada, bob)
    a, b = stack.replicas["A"], stack.replicas["B"]

    stack.route_to(a, b)
    page_a = new_page(ada)
    page_a.goto(f"/c/{cid}/")
    wait_live(page_a, "A")

    stack.route_to(b, a)
    page_b = new_page(bob)  # on the conversation list
    wait_live(page_b, "B")
    page_a.evaluate("window.notReloaded = true")
    expect(page_a.locator(".presence-line")).to_have_text("Online")

    # Ada writes while Bob looks at his list: sending, sent, then delivered to Bob's
    # socket on the other replica; Bob's unread badge counts it live.
    page_a.evaluate(RECORD_TICKS)
    composer(page_a).fill("Hi Bob, the notes are at https://example.com/notes.")
    composer(page_a).press("Enter")
    expect(composer(page_a)).to_have_value("")
    expect(page_a.locator("#m-1 .tick")).to_have_attribute("data-state", "delivered")
    item = page_b.locator(f'#conversation-list > li[data-conversation-id="{cid}"]')
    expect(item.locator(".badge")).to_have_text("(1 unread)")
    expect(page_b.locator("#unread-summary")).to_have_text("1 with unread messages")

    # Bob opens the conversation: reading it turns Ada's tick to read.
    item.get_by_role("link").click()
    wait_live(page_b, "B")
    page_b.evaluate("window.notReloaded = true")
    expect(page_b.locator("#m-1 .message-body")).to_have_text(
        "Hi Bob, the notes are at https://example.com/notes."
    )
    expect(page_a.locator("#m-1 .tick")).to_have_attribute("data-state", "read")
    expect(page_a.locator("#m-1 .tick")).to_have_attribute("aria-label", "Read")
    states = [s.split(":", 1)[1] for s in page_a.evaluate("window.tickStates")]
    assert states == ["pending", "sent", "delivered", "read"], states

    # Bob types: Ada sees it, then his message, without reloading; the indicator goes.
    typing = page_a.locator("#typing-indicator")
    composer(page_b).press_sequentially("Thanks Ada!", delay=20)
    expect(typing).to_have_text("Bob Babbage is typing…")
    composer(page_b).press("Enter")
    expect(page_a.locator("#m-2 .message-body")).to_have_text("Thanks Ada!")
    expect(typing).to_have_text("")
    # Ada's page is visible: it reads what arrives, and Bob sees his message read.
    expect(page_b.locator("#m-2 .tick")).to_have_attribute("data-state", "read")

    # Shift+Enter starts a new line; Enter sends.
    composer(page_a).press_sequentially("line one")
    composer(page_a).press("Shift+Enter")
    composer(page_a).press_sequentially("line two")
    expect(composer(page_a)).to_have_value("line one\nline two")
    composer(page_a).press("Enter")
    expect(page_b.locator("#m-3 .message-body")).to_have_text("line one\nline two")
    expect(page_a.locator("#m-3 .tick")).to_have_attribute("data-state", "read")

    for page in (page_a, page_b):
        assert message_seqs(page) == [1, 2, 3]
        assert message_bodies(page)[1:] == ["Thanks Ada!", "line one\nline two"]
        assert page.evaluate("window.notReloaded") is True
        assert not page.console_errors, page.console_errors
    # Links in messages are links, to a new tab, without referrer or opener.
    link = page_b.locator("#m-1 .message-body a")
    expect(link).to_have_attribute("href", "https://example.com/notes")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(link).to_have_attribute("target", "_blank")
    assert stack.api.seqs_and_bodies(ada, cid)[1:] == [
        (2, "Thanks Ada!"),
        (3, "line one\nline two"),
    ]
    # The sidebar of Ada's page lists the conversation without a badge: she is reading it.
    sidebar_item = page_a.locator(f'.conversation-nav a[data-conversation-id="{cid}"]')
    expect(sidebar_item).to_contain_text("Bob Babbage")
    expect(sidebar_item.locator(".badge")).to_have_count(0)


def test_a_members_message_counts_as_their_receipt(stack, new_page):
    """Sending moves the sender's receipts without a receipt frame (docs/protocol.md):
    the page takes the message itself as the sender's receipt."""
    ada = stack.api.account("ada", "Ada Lovelace")
    bob = stack.api.account("bob", "Bob Babbage")
    cy = stack.api.account("cy", "Cy Young")
    room = stack.api.room(ada, "Ticks", bob, cy)
    page_a = new_page(ada)
    page_a.goto(f"/c/{room['id']}/")
    wait_live(page_a)
    composer(page_a).fill("Anyone?")
    composer(page_a).press("Enter")
    # Nobody else is connected: no delivery, no receipt frame for anyone.
    expect(page_a.locator("#m-1 .tick")).to_have_attribute("data-state", "sent")
    # Bob answers over HTTP, never opening a socket: his message is all Ada's page hears.
    stack.api.send(bob, room["id"], "Here.")
    expect(page_a.locator("#m-2 .message-body")).to_have_text("Here.")
    expect(page_a.locator("#m-1 .tick")).to_have_attribute("data-state", "read")
    expect(page_a.locator("#m-1 .tick")).to_have_attribute("aria-label", "Read by 1 of 2")
    assert not page_a.console_errors, page_a.console_errors
