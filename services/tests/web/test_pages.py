"""The server-rendered pages, driven like a browser with JavaScript off: GET a page,
submit its form, follow the 303. Real Postgres and Redis."""

from __future__ import annotations

import re

import pytest
from django.test import Client, override_settings

from parley.accounts.models import User
from parley.chat import services
from parley.chat.models import Membership, Message, Notification
from tests.conftest import PASSWORD

# The live client (parley.js) is the only script: an ES module by src, never inline.
LIVE_SCRIPT = '<script type="module" src="/static/parley/parley.js"></script>'


def scripts(html: str) -> list[str]:
    return re.findall(r"<script\b.*?</script>", html, re.S)


pytestmark = pytest.mark.django_db

CLIENT_ID = re.compile(r'name="client_id" value="([0-9a-f]{32})"')
CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


def client_for(user: User, **kw) -> Client:
    client = Client(**kw)
    client.force_login(user)
    return client


def page(client: Client, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, response
    return response.content.decode()


def send(client: Client, conversation_id: int, body: str, client_id: str | None = None):
    """Submit the send form the way a browser does: with the client_id the page rendered."""
    url = f"/c/{conversation_id}/"
    if client_id is None:
        client_id = CLIENT_ID.search(page(client, url)).group(1)
    return client.post(url, {"body": body, "client_id": client_id})


def member_pages(room) -> list[str]:
    """The pages that need a login; a member of `room` can open each."""
    return [
        "/conversations/",
        f"/c/{room.id}/",
        "/rooms/",
        "/rooms/new/",
        "/direct/",
        "/notifications/",
    ]


def bodies(conversation_id: int) -> list[str]:
    return list(
        Message.objects.filter(conversation_id=conversation_id)
        .order_by("seq")
        .values_list("body", flat=True)
    )


# --- the newcomer's path --------------------------------------------------------------


def test_sign_up_create_room_send_and_see_the_message():
    client = Client()
    assert "Create your account" in page(client, "/signup/")
    response = client.post(
        "/signup/",
        {
            "username": "newcomer",
            "display_name": "New Comer",
            "email": "",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert response.status_code == 303
    assert response["Location"] == "/conversations/"
    user = User.objects.get(username="newcomer")
    assert user.display_name == "New Comer"
    assert "You are not in any conversation yet" in page(client, "/conversations/")

    response = client.post("/rooms/new/", {"name": "Book club", "topic": "Reading", "public": "on"})
    assert response.status_code == 303
    room_id = Membership.objects.get(user=user).conversation_id
    assert response["Location"] == f"/c/{room_id}/"

    response = send(client, room_id, "Hello, world!\r\n  second line")
    assert response.status_code == 303
    assert response["Location"] == f"/c/{room_id}/#m-1"
    assert bodies(room_id) == ["Hello, world!\n  second line"]

    html = page(client, f"/c/{room_id}/")
    assert '<p class="message-body">Hello, world!\n  second line</p>' in html
    assert 'id="m-1"' in html
    assert "New Comer" in html
    assert "Book club" in html and "Reading" in html


def test_home_redirects_by_login_state(alice):
    assert Client().get("/")["Location"] == "/login/"
    assert client_for(alice).get("/")["Location"] == "/conversations/"


def test_pages_need_login(room):
    client = Client()
    for url in member_pages(room):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/?next="), url
    assert client.post(f"/c/{room.id}/", {"body": "hi"}).status_code == 302
    assert bodies(room.id) == []


# --- escaping -------------------------------------------------------------------------


def test_html_in_messages_names_and_topics_is_escaped(alice, bob):
    alice.display_name = '<b onmouseover="x()">Al</b>'
    alice.save()
    room = services.room_create(
        creator=alice, name="<i>Room</i>", slug="html-room", topic="<script>alert('topic')</script>"
    )
    services.room_join(user=bob, slug=room.slug)
    client = client_for(alice)
    for body in ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>"):
        assert send(client, room.id, body).status_code == 303
    assert bodies(room.id) == ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]

    for viewer in (client, client_for(bob)):
        html = page(viewer, f"/c/{room.id}/")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html
        assert "&lt;i&gt;Room&lt;/i&gt;" in html
        assert "&lt;b onmouseover=&quot;x()&quot;&gt;Al&lt;/b&gt;" in html
        assert scripts(html) == [LIVE_SCRIPT]  # the live client; nothing from the message
        assert "<img src=x" not in html
        assert "<i>Room" not in html
        assert "<b onmouseover" not in html
    assert "&lt;i&gt;Room&lt;/i&gt;" in page(client_for(bob), "/conversations/")
    assert "&lt;i&gt;Room&lt;/i&gt;" in page(client_for(bob), "/rooms/")


# --- sending ----------------------------------------------------------------------------


def test_double_submit_with_the_same_client_id_creates_one_message(alice, room):
    client = client_for(alice)
    client_id = CLIENT_ID.search(page(client, f"/c/{room.id}/")).group(1)
    first = send(client, room.id, "only once", client_id)
    second = send(client, room.id, "only once", client_id)
    assert first.status_code == second.status_code == 303
    assert first["Location"] == second["Location"] == f"/c/{room.id}/#m-1"
    assert bodies(room.id) == ["only once"]
    # Each rendering of the form carries a fresh client_id: the next message is a new one.
    assert send(client, room.id, "another").status_code == 303
    assert bodies(room.id) == ["only once", "another"]


def test_each_page_load_gets_a_new_client_id(alice, room):
    client = client_for(alice)
    first = CLIENT_ID.search(page(client, f"/c/{room.id}/")).group(1)
    second = CLIENT_ID.search(page(client, f"/c/{room.id}/")).group(1)
    assert first != second


@override_settings(PARLEY_MAX_MESSAGE_CHARS=10)
def test_over_long_message_shows_an_error_keeps_the_text_and_writes_nothing(alice, room):
    client = client_for(alice)
    html = page(client, f"/c/{room.id}/")
    assert 'maxlength="10"' in html
    response = send(client, room.id, "x" * 10 + "<y>")
    assert response.status_code == 400
    html = response.content.decode()
    assert "body is 13 characters; the limit is 10." in html
    assert 'role="alert"' in html
    # What was typed is still in the box, escaped, ready to be shortened.
    assert "xxxxxxxxxx&lt;y&gt;</textarea>" in html
    assert bodies(room.id) == []
    assert send(client, room.id, "x" * 10).status_code == 303
    assert bodies(room.id) == ["x" * 10]


def test_empty_message_is_refused(alice, room):
    client = client_for(alice)
    response = send(client, room.id, "   ")
    assert response.status_code == 400
    assert "body must not be empty." in response.content.decode()
    response = send(client, room.id, "")
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert bodies(room.id) == []


@override_settings(PARLEY_RATE_MESSAGES_PER_10S=2)
def test_rate_limit_shows_an_error(alice, room):
    client = client_for(alice)
    assert send(client, room.id, "one").status_code == 303
    assert send(client, room.id, "two").status_code == 303
    response = send(client, room.id, "three")
    assert response.status_code == 429
    assert "At most 2 messages per 10 s; slow down." in response.content.decode()
    assert bodies(room.id) == ["one", "two"]


def test_non_member_gets_404_and_cannot_post(carol, room):
    client = client_for(carol)
    page(client, f"/c/{room.id}/", status=404)
    response = client.post(f"/c/{room.id}/", {"body": "sneaky", "client_id": "a" * 32})
    assert response.status_code == 404
    assert client.post(f"/c/{room.id}/mute/", {"muted": "1"}).status_code == 404
    page(client, "/c/999999999/", status=404)
    page(client, "/c/99999999999999999999999/", status=404)  # past bigint: still a 404
    assert bodies(room.id) == []


@override_settings(DEBUG=False)
def test_error_pages_are_friendly_pages(carol, room):
    html = page(client_for(carol), f"/c/{room.id}/", status=404)
    assert "Not found" in html and "not a member" in html
    assert "Traceback" not in html and "style=" not in html
    # The 500 page is rendered with no request and no context: it must stand alone.
    from django.template.loader import get_template

    assert "Something went wrong" in get_template("500.html").render()


# --- reading ----------------------------------------------------------------------------


def test_conversation_list_shows_unread_counts_and_opening_marks_read(alice, bob, room):
    for i in range(3):
        services.message_create(sender=alice, conversation_id=room.id, body=f"m{i}")
    client = client_for(bob)
    response = client.get("/conversations/")
    html = response.content.decode()
    assert response.context["items"][0]["unread"] == 3
    badge = (
        '<span class="badge"><span class="visually-hidden">(</span>3'
        '<span class="visually-hidden"> unread)</span></span>'
    )
    assert badge in html
    assert "1 with unread messages" in html
    # The sender has read their own messages.
    assert client_for(alice).get("/conversations/").context["items"][0]["unread"] == 0

    page(client, f"/c/{room.id}/")
    assert Membership.objects.get(user=bob, conversation=room).last_read_seq == 3
    html = page(client, "/conversations/")
    assert badge not in html
    assert "All caught up" in html


def test_history_shows_the_newest_50_with_a_link_to_older(alice, bob, room):
    for i in range(1, 61):
        services.message_create(sender=alice, conversation_id=room.id, body=f"message number {i}")
    client = client_for(bob)
    html = page(client, f"/c/{room.id}/")
    assert 'id="m-11"' in html and 'id="m-60"' in html
    assert 'id="m-10"' not in html
    assert f'href="/c/{room.id}/?before=11"' in html
    assert 'data-last-seq="60"' in html
    assert 'data-has-newer="false"' in html
    assert Membership.objects.get(user=bob, conversation=room).last_read_seq == 60

    html = page(client, f"/c/{room.id}/?before=11")
    assert 'id="m-1"' in html and 'id="m-10"' in html
    assert 'id="m-11"' not in html
    assert "Older messages" not in html
    assert f'href="/c/{room.id}/?after=10"' in html
    assert 'data-has-newer="true"' in html
    # Looking back never moves the read position backwards.
    assert Membership.objects.get(user=bob, conversation=room).last_read_seq == 60

    html = page(client, f"/c/{room.id}/?before=nonsense")
    assert "before must be an integer." in html
    assert 'id="m-60"' in html


def test_conversation_page_carries_what_the_live_client_needs(alice, room):
    services.message_create(sender=alice, conversation_id=room.id, body="hi")
    html = page(client_for(alice), f"/c/{room.id}/")
    assert f'data-conversation-id="{room.id}"' in html
    assert 'data-last-seq="1"' in html
    assert f'data-user-id="{alice.id}"' in html
    assert 'data-realtime-url=""' in html
    assert 'aria-live="polite"' in html
    with override_settings(REALTIME_PUBLIC_URL="wss://rt.example.com/ws/chat/"):
        html = page(client_for(alice), f"/c/{room.id}/")
    assert 'data-realtime-url="wss://rt.example.com/ws/chat/"' in html


def test_pages_have_a_csp_and_no_inline_script_or_style(alice, bob, room):
    services.message_create(sender=alice, conversation_id=room.id, body="hello")
    Notification.objects.create(user=alice, conversation=room, first_seq=1, last_seq=1)
    client = client_for(alice)
    for url in member_pages(room):
        response = client.get(url)
        assert response.status_code == 200, url
        csp = response["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp, url
        html = response.content.decode()
        assert scripts(html) in ([], [LIVE_SCRIPT]), url  # by src from 'self', none inline
        assert "style=" not in html, url
        assert "<style" not in html, url
        assert "<main" in html and "<nav" in html, url
    for url in ("/login/", "/signup/"):
        response = Client().get(url)
        assert "Content-Security-Policy" in response
        assert "style=" not in response.content.decode()


def test_stylesheet_is_served(alice):
    html = page(client_for(alice), "/conversations/")
    href = re.search(r'<link rel="stylesheet" href="([^"]+)"', html).group(1)
    response = Client().get(href)
    assert response.status_code == 200
    css = b"".join(response.streaming_content) if response.streaming else response.content
    assert b"white-space: pre-wrap" in css


# --- accounts ---------------------------------------------------------------------------


def test_login_and_logout(alice):
    client = Client()
    assert 'name="username"' in page(client, "/login/")
    response = client.post("/login/", {"username": "alice", "password": "wrong-password"})
    assert response.status_code == 200
    assert "Please enter a correct username and password" in response.content.decode()
    assert client.get("/conversations/").status_code == 302

    response = client.post("/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == "/conversations/"
    html = page(client, "/conversations/")
    assert "Alice A." in html
    assert 'action="/logout/"' in html

    # Logging out takes a POST: a link or a prefetch cannot do it.
    assert client.get("/logout/").status_code == 405
    assert client.get("/conversations/").status_code == 200
    response = client.post("/logout/")
    assert response.status_code == 302
    assert response["Location"] == "/login/"
    assert client.get("/conversations/").status_code == 302


def test_login_follows_next(alice, room):
    client = Client()
    response = client.get(f"/c/{room.id}/")
    assert response["Location"] == f"/login/?next=/c/{room.id}/"
    response = client.post(
        response["Location"], {"username": "alice", "password": PASSWORD, "next": f"/c/{room.id}/"}
    )
    assert response["Location"] == f"/c/{room.id}/"


def test_signup_errors_are_shown_and_nothing_is_created(alice):
    client = Client()
    response = client.post(
        "/signup/", {"username": "dora", "password1": PASSWORD, "password2": PASSWORD + "x"}
    )
    assert response.status_code == 400
    assert "The two passwords differ." in response.content.decode()
    response = client.post(
        "/signup/", {"username": "alice", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert response.status_code == 409
    assert "That username is taken." in response.content.decode()
    response = client.post(
        "/signup/", {"username": "dora", "password1": "12345678", "password2": "12345678"}
    )
    assert response.status_code == 400
    assert "password:" in response.content.decode()
    assert not User.objects.filter(username="dora").exists()
    assert client.get("/conversations/").status_code == 302


@override_settings(PARLEY_ALLOW_SIGNUP=False)
def test_signup_disabled_refuses():
    client = Client()
    response = client.get("/signup/")
    assert response.status_code == 403
    assert "Sign-up is closed" in response.content.decode()
    response = client.post(
        "/signup/", {"username": "dora", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert response.status_code == 403
    assert not User.objects.filter(username="dora").exists()
    assert 'href="/signup/"' not in page(client, "/login/")


def test_csrf_is_enforced(alice, room):
    client = client_for(alice, enforce_csrf_checks=True)
    url = f"/c/{room.id}/"
    response = client.post(url, {"body": "forged", "client_id": "b" * 32})
    assert response.status_code == 403
    assert "That form could not be accepted" in response.content.decode()
    assert client.post("/rooms/new/", {"name": "Forged"}).status_code == 403
    assert client.post(f"/rooms/{room.slug}/leave/").status_code == 403
    assert client.post("/logout/").status_code == 403
    assert bodies(room.id) == []
    assert Membership.objects.filter(user=alice, conversation=room).exists()

    # The form as rendered carries the token, and then the post goes through.
    html = page(client, url)
    token = CSRF.search(html).group(1)
    client_id = CLIENT_ID.search(html).group(1)
    response = client.post(
        url, {"body": "genuine", "client_id": client_id, "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 303
    assert bodies(room.id) == ["genuine"]


# --- rooms ------------------------------------------------------------------------------


def test_room_directory_search_join_and_leave(alice, bob):
    python = services.room_create(creator=alice, name="Python", topic="Snakes and code")
    services.room_create(creator=alice, name="Gardening")
    services.room_create(creator=alice, name="Python secrets", public=False)
    client = client_for(bob)

    html = page(client, "/rooms/")
    assert "Python" in html and "Gardening" in html
    assert "Python secrets" not in html
    html = page(client, "/rooms/?q=snake")
    assert "Python" in html and "Gardening" not in html
    assert f'action="/rooms/{python.slug}/join/"' in html
    assert "No public room matches" in page(client, "/rooms/?q=nothing-like-this")

    response = client.post(f"/rooms/{python.slug}/join/")
    assert response.status_code == 303
    assert response["Location"] == f"/c/{python.id}/"
    assert Membership.objects.filter(user=bob, conversation=python).exists()
    assert "You joined Python." in page(client, response["Location"])

    html = page(client, "/rooms/?q=pyth")
    assert f'action="/rooms/{python.slug}/leave/"' in html
    response = client.post(f"/rooms/{python.slug}/leave/", {"next": "/rooms/?q=pyth"})
    assert response.status_code == 303
    assert response["Location"] == "/rooms/?q=pyth"
    assert not Membership.objects.filter(user=bob, conversation=python).exists()
    assert "You left Python." in page(client, response["Location"])
    page(client, f"/c/{python.id}/", status=404)

    # An unknown or private room: the error is shown, nothing changes.
    for slug in ("no-such-room", "python-secrets"):
        response = client.post(f"/rooms/{slug}/join/")
        assert response.status_code == 303
        assert response["Location"] == "/rooms/"
        assert f"No room &#x27;{slug}&#x27;." in page(client, "/rooms/")
    assert Membership.objects.filter(user=bob).count() == 0
    # Joining takes a POST.
    assert client.get(f"/rooms/{python.slug}/join/").status_code == 405


def test_leave_next_must_be_local(alice, room):
    response = client_for(alice).post(
        f"/rooms/{room.slug}/leave/", {"next": "https://evil.example.com/"}
    )
    assert response["Location"] == "/rooms/"


def test_create_room_errors(alice, room):
    client = client_for(alice)
    response = client.post("/rooms/new/", {"name": "General again", "slug": room.slug})
    assert response.status_code == 409
    assert f"A room with the slug &#x27;{room.slug}&#x27; exists." in response.content.decode()
    response = client.post("/rooms/new/", {"name": "!!!"})
    assert response.status_code == 400
    assert "name must contain a letter or digit" in response.content.decode()
    response = client.post("/rooms/new/", {"name": ""})
    assert response.status_code == 400
    assert Membership.objects.filter(user=alice).count() == 1

    response = client.post("/rooms/new/", {"name": "Hush", "slug": "Hush-Room"})
    assert response.status_code == 303
    hush = Membership.objects.get(user=alice, conversation__slug="hush-room").conversation
    assert not hush.is_public  # an unticked checkbox is not sent: private


# --- direct conversations ------------------------------------------------------------


def test_direct_form_starts_or_reopens_a_conversation(alice, bob, carol):
    client = client_for(alice)
    assert 'name="username"' in page(client, "/direct/")
    assert 'value="bob"' in page(client, "/direct/?username=bob")

    response = client.post("/direct/", {"username": "bob"})
    assert response.status_code == 303
    conv_id = int(re.fullmatch(r"/c/(\d+)/", response["Location"]).group(1))
    assert client.post("/direct/", {"username": " bob "})["Location"] == f"/c/{conv_id}/"

    assert "Bob B." in page(client, f"/c/{conv_id}/")
    assert send(client, conv_id, "hi bob").status_code == 303
    bob_client = client_for(bob)
    assert client_for(bob).get("/conversations/").context["items"][0]["unread"] == 1
    html = page(bob_client, f"/c/{conv_id}/")
    assert "Alice A." in html and "hi bob" in html
    page(client_for(carol), f"/c/{conv_id}/", status=404)

    response = client.post("/direct/", {"username": "nobody"})
    assert response.status_code == 404
    assert "No user &#x27;nobody&#x27;." in response.content.decode()
    response = client.post("/direct/", {"username": "alice"})
    assert response.status_code == 400
    assert "A direct conversation needs another user." in response.content.decode()


# --- notifications and muting --------------------------------------------------------


def test_notifications_page_and_header_badge(alice, bob, room):
    services.message_create(sender=alice, conversation_id=room.id, body="while you were out")
    Notification.objects.create(
        user=bob, conversation=room, first_seq=1, last_seq=3, message_count=3
    )
    client = client_for(bob)
    html = page(client, "/conversations/")
    assert '<span class="badge" data-notification-count="1">' in html
    html = page(client, "/notifications/")
    assert "3 new messages" in html
    assert f'href="/c/{room.id}/"' in html
    assert "General" in html
    assert "Nothing yet" in page(client_for(alice), "/notifications/")
    assert "data-notification-count" not in page(client_for(alice), "/conversations/")


def test_mute_and_unmute(alice, room):
    client = client_for(alice)
    response = client.post(f"/c/{room.id}/mute/", {"muted": "1"})
    assert response.status_code == 303
    assert Membership.objects.get(user=alice, conversation=room).muted
    html = page(client, f"/c/{room.id}/")
    assert "Notifications are off for this conversation." in html
    assert '<input type="hidden" name="muted" value="0">' in html
    client.post(f"/c/{room.id}/mute/", {"muted": "0"})
    assert not Membership.objects.get(user=alice, conversation=room).muted
