"""The conversation page at desktop and phone width: a clean layout (nothing wider than
the screen, the composer on screen, the newest message above it), and screenshots.

Screenshots go to a temporary folder; with PARLEY_UPDATE_SCREENSHOTS=1 they replace
docs/screenshots/conversation-{desktop,phone}.png (`make screenshots`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser.support import composer, expect, wait_live

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

DOCS = Path(__file__).resolve().parents[3] / "docs" / "screenshots"
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


def test_conversation_page_layout_at_desktop_and_phone_width(stack, new_page, tmp_path):
    out = DOCS if os.environ.get("PARLEY_UPDATE_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    ada = stack.api.account("ada", "Ada Lovelace")
    grace = stack.api.account("grace", "Grace Hopper")
    charles = stack.api.account("charles", "Charles Babbage")
    room = stack.api.room(
        ada, "Analytical Engine", grace, charles, topic="Notes, diagrams and the occasional bug"
    )
    cid = room["id"]
    stack.api.direct(grace, ada)
    api = stack.api
    api.send(
        charles,
        cid,
        "Morning all. The new gear train drawings are up: https://example.com/engine/gears-v3.pdf",
    )
    api.send(
        grace,
        cid,
        "Looks good. One question on the carry mechanism —\n"
        "does it still need the anticipating carriage?",
    )
    api.send(charles, cid, "It does. Saves a full turn per addition.")
    api.send(
        ada,
        cid,
        "Then the Bernoulli program fits in the store as planned. I'll write up note G tonight.",
    )
    api.send(
        grace, cid, "Found a moth in relay 70, by the way. First actual case of bug being found."
    )

    stack.route_to(stack.replicas["A"], stack.replicas["B"])
    grace_page = new_page(grace)
    grace_page.goto(f"/c/{cid}/")
    wait_live(grace_page)
    pages = {}
    for name, viewport in SIZES.items():
        pages[name] = new_page(ada, viewport=viewport)
        pages[name].goto(f"/c/{cid}/")
        wait_live(pages[name])
    composer(pages["desktop"]).fill("Wonderful. Sending the diagrams to the printer now.")
    composer(pages["desktop"]).press("Enter")
    for page in pages.values():  # the sender's other page shows it too
        expect(page.locator("#m-6 .tick")).to_have_attribute("data-state", "read")
        # Read by Grace; Charles is away.
        expect(page.locator("#m-6 .tick")).to_have_attribute("aria-label", "Read by 1 of 2")
    composer(grace_page).press_sequentially("On my way", delay=10)
    for page in pages.values():
        expect(page.locator("#typing-indicator")).to_have_text("Grace Hopper is typing…")
    for name, page in pages.items():
        page.locator("#composer textarea").blur()  # no focus ring in the picture
        page.screenshot(path=str(out / f"conversation-{name}.png"))

    for name, page in pages.items():
        viewport = SIZES[name]
        # Measured once the page has settled (a transient element, e.g. a status line
        # while a socket reconnects, gets 3 s); what stays too wide is named.
        width = page.evaluate("document.documentElement.scrollWidth")
        for _ in range(30):
            if width <= viewport["width"]:
                break
            page.wait_for_timeout(100)
            width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"], (
            f"{name}: the page is {width}px wide; wider than the screen: {wider(page)}"
        )
        box = page.locator("#composer").bounding_box()
        assert box["y"] + box["height"] <= viewport["height"] + 0.5, (name, box)
        newest = page.locator("#m-6").bounding_box()
        assert newest["y"] + newest["height"] <= box["y"], (name, newest, box)
        header = page.locator(".conversation-header").bounding_box()
        assert newest["y"] >= header["y"] + header["height"], (name, newest, header)
        send = page.get_by_role("button", name="Send").bounding_box()
        assert send["x"] + send["width"] <= viewport["width"], (name, send)


def wider(page) -> list[str]:
    """The innermost elements that reach past the right edge of the screen (to say which)."""
    return page.evaluate(
        """() => {
        const w = document.documentElement.clientWidth, out = [];
        for (const el of document.querySelectorAll('body *')) {
          const r = el.getBoundingClientRect();
          if (r.right > w + 0.5 && ![...el.children].some(
                c => c.getBoundingClientRect().right > w + 0.5)) {
            const id = el.id ? '#' + el.id : '';
            const cls = el.className && typeof el.className === 'string'
              ? '.' + el.className.trim().split(/\\s+/).join('.') : '';
            out.push(`${el.tagName.toLowerCase()}${id}${cls} right=${Math.round(r.right)}`
                     + ` text=${JSON.stringify((el.textContent || '').slice(0, 60))}`);
          }
        }
        return out.slice(0, 10);
      }"""
    )
