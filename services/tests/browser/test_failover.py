"""kill -9 of the realtime replica a page is on: the page says it is reconnecting, comes
back on another replica, and shows what was sent meanwhile exactly once."""

from __future__ import annotations

import signal

import pytest

from tests.browser.support import composer, expect, message_bodies, message_seqs, wait_live

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

RECORD_STATES = """() => {
  window.connectionStates = [document.documentElement.dataset.connection];
  new MutationObserver(() => {
    window.connectionStates.push(document.documentElement.dataset.connection);
  }).observe(document.documentElement, {attributes: true, attributeFilter: ["data-connection"]});
}"""


def test_page_survives_kill_9_of_its_replica_and_shows_missed_messages_once(stack, new_page):
    ada = stack.api.account("ada", "Ada Lovelace")
    bob = stack.api.account("bob", "Bob Babbage")
    room = stack.api.room(ada, "Failover", bob)
    cid = room["id"]
    victim, survivor = stack.replica("K"), stack.replicas["B"]

    stack.route_to(victim, survivor)
    page = new_page(ada)
    page.goto(f"/c/{cid}/")
    wait_live(page, "K")
    page.evaluate("window.notReloaded = true")
    composer(page).fill("before the crash")
    composer(page).press("Enter")
    expect(page.locator("#m-1 .tick")).to_have_attribute("data-state", "sent")
    page.evaluate(RECORD_STATES)

    banner = page.locator("#connection-status")
    # The balancer has no healthy replica for a moment (as while it notices the death):
    # messages sent now can only reach the page through `resume` after it reconnects.
    stack.door.accepting = False
    try:
        victim.signal(signal.SIGKILL)
        assert victim.wait(5) == -signal.SIGKILL
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("Reconnecting…")
        expect(banner.get_by_role("button", name="Retry now")).to_be_visible()
        for n in range(1, 4):
            stack.api.send(bob, cid, f"meanwhile {n}")
    finally:
        stack.door.accepting = True
    # The balancer finds K refusing connections and goes on to B. The backoff is short
    # after a few failures (at most 0.5 s * 2**attempt).
    wait_live(page, "B")
    expect(banner).to_be_hidden()
    expect(page.locator("#m-4 .message-body")).to_have_text("meanwhile 3")

    # Live again: a message after the reconnect, and one sent from the page.
    stack.api.send(bob, cid, "after the crash")
    expect(page.locator("#m-5 .message-body")).to_have_text("after the crash")
    composer(page).fill("back on B")
    composer(page).press("Enter")
    expect(page.locator("#m-6 .tick")).to_have_attribute("data-state", "sent")

    expected = [
        "before the crash",
        "meanwhile 1",
        "meanwhile 2",
        "meanwhile 3",
        "after the crash",
        "back on B",
    ]
    assert message_bodies(page) == expected
    assert message_seqs(page) == [1, 2, 3, 4, 5, 6]
    assert stack.api.seqs_and_bodies(ada, cid) == list(enumerate(expected, start=1))
    states = page.evaluate("window.connectionStates")
    assert states[0] == "live" and "reconnecting" in states and states[-1] == "live", states
    assert page.evaluate("window.notReloaded") is True
