"""With JavaScript off, the pages are the whole app: sign up, create a room, send."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.browser.support import PASSWORD, expect

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


def test_sign_up_open_a_room_and_send_with_the_form(stack, new_page):
    page = new_page(java_script_enabled=False)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto("/signup/")
    page.get_by_label("Username").fill(f"nojs-{uuid.uuid4().hex[:8]}")
    page.get_by_label("Display name").fill("No Script")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page).to_have_url(re.compile(r"/conversations/$"))
    expect(page.get_by_role("status")).to_contain_text("Welcome to Parley, No Script.")

    page.get_by_role("link", name="Create a room").first.click()
    page.get_by_label("Name").fill("Quiet corner")
    page.get_by_role("button", name="Create room").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("#Quiet corner")

    box = page.get_by_role("textbox", name="Message Quiet corner")
    box.fill("Hello without JavaScript")
    box.press("Enter")  # in a textarea, without the script, Enter is a new line
    box.press_sequentially("second line")
    page.get_by_role("button", name="Send").click()
    expect(page).to_have_url(re.compile(r"/c/\d+/#m-1$"))
    message = page.locator("#m-1")
    expect(message.locator(".message-body")).to_have_text("Hello without JavaScript\nsecond line")
    expect(message.locator(".message-sender")).to_have_text("No Script")
    expect(box).to_have_value("")
    # Nothing live: no connection state, no ticks, no status line.
    expect(page.locator("html")).not_to_have_attribute("data-connection", re.compile(".*"))
    expect(page.locator(".tick")).to_have_count(0)
    expect(page.locator("#connection-status")).to_be_hidden()
    assert not [u for u in requests if "/api/" in u], requests

    # A second message, and the conversation list shows the room.
    box.fill("and another")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#m-2 .message-body")).to_have_text("and another")
    page.get_by_role("link", name="Conversations").first.click()
    expect(page.locator(".conversation-list")).to_contain_text("Quiet corner")
