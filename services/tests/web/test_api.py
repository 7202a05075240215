"""The JSON API: every endpoint, its auth, its errors, and that bad input writes nothing."""

from __future__ import annotations

import pytest
from django.test import Client

from parley.chat import services
from parley.chat.models import Conversation, Membership, Message

pytestmark = pytest.mark.django_db


def send(api, conv_id, body="hi", **extra):
    return api.post(f"/api/v1/conversations/{conv_id}/messages", {"body": body, **extra})


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.content
    data = resp.json()
    assert data["error"] == code and isinstance(data["detail"], str) and data["detail"]
    assert "Traceback" not in resp.content.decode()


# --- accounts -------------------------------------------------------------------------


def test_signup_returns_user_and_a_working_token():
    resp = Client().post(
        "/api/v1/accounts",
        {"username": "dora", "password": "s3cret-enough-pw", "display_name": "Dora"},
        content_type="application/json",
    )
    assert resp.status_code == 201
    data = resp.json()
    assert data["user"]["username"] == "dora" and data["user"]["display_name"] == "Dora"
    me = Client().get("/api/v1/me", headers={"Authorization": f"Bearer {data['token']}"})
    assert me.status_code == 200 and me.json()["username"] == "dora"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({}, 400, "bad_request"),
        ({"username": "x"}, 400, "bad_request"),
        ({"username": 5, "password": "s3cret-enough-pw"}, 400, "bad_request"),
        ({"username": "bad name!", "password": "s3cret-enough-pw"}, 400, "bad_request"),
        ({"username": "shortpw", "password": "123"}, 400, "bad_request"),
        ({"username": "alice", "password": "s3cret-enough-pw"}, 409, "conflict"),
    ],
)
def test_signup_bad_input(alice, payload, status, code):
    before = alice.__class__.objects.count()
    resp = Client().post("/api/v1/accounts", payload, content_type="application/json")
    assert_error(resp, status, code)
    assert alice.__class__.objects.count() == before


def test_signup_can_be_disabled(settings):
    settings.PARLEY_ALLOW_SIGNUP = False
    resp = Client().post(
        "/api/v1/accounts",
        {"username": "eve", "password": "s3cret-enough-pw"},
        content_type="application/json",
    )
    assert_error(resp, 403, "forbidden")


def test_token_exchange(alice):
    c = Client()
    ok = c.post(
        "/api/v1/auth/token",
        {"username": "alice", "password": "correct-horse-battery"},
        content_type="application/json",
    )
    assert ok.status_code == 200 and ok.json()["token"].startswith("plt_")
    bad = c.post(
        "/api/v1/auth/token",
        {"username": "alice", "password": "nope"},
        content_type="application/json",
    )
    assert_error(bad, 401, "unauthorized")


def test_malformed_json_is_a_400():
    resp = Client().post("/api/v1/auth/token", "{not json", content_type="application/json")
    assert_error(resp, 400, "bad_request")


def test_unauthenticated_and_bad_token(db):
    assert_error(Client().get("/api/v1/me"), 401, "unauthorized")
    resp = Client().get("/api/v1/me", headers={"Authorization": "Bearer plt_nope"})
    assert_error(resp, 401, "unauthorized")


def test_session_auth_requires_csrf(alice, room):
    c = Client(enforce_csrf_checks=True)
    c.force_login(alice)
    assert c.get("/api/v1/me").status_code == 200
    resp = c.post(
        f"/api/v1/conversations/{room.id}/messages", {"body": "x"}, content_type="application/json"
    )
    assert resp.status_code in (401, 403)
    assert not Message.objects.exists()
    c.get("/api/v1/me")  # no cookie set by the API; get one from a page
    token = c.cookies.get("csrftoken")
    if token is None:
        from django.middleware.csrf import _get_new_csrf_string, _mask_cipher_secret

        secret = _get_new_csrf_string()
        c.cookies["csrftoken"] = secret
        token = _mask_cipher_secret(secret)
    else:
        token = token.value
    ok = c.post(
        f"/api/v1/conversations/{room.id}/messages",
        {"body": "x"},
        content_type="application/json",
        headers={"X-CSRFToken": token},
    )
    assert ok.status_code == 201


def test_unknown_api_path_is_json_404(db):
    assert_error(Client().get("/api/v1/nope"), 404, "not_found")


def test_openapi_document_is_generated(db):
    resp = Client().get("/api/v1/openapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["openapi"].startswith("3.")
    for path in (
        "/api/v1/accounts",
        "/api/v1/conversations/{conversation_id}/messages",
        "/api/v1/rooms/{slug}/join",
        "/api/v1/notifications",
    ):
        assert path in doc["paths"]


# --- rooms and direct conversations --------------------------------------------------------


def test_room_lifecycle(alice, bob, api_for):
    a, b = api_for(alice), api_for(bob)
    created = a.post("/api/v1/rooms", {"name": "Ops Team", "topic": "pager"})
    assert created.status_code == 201
    room = created.json()
    assert room["slug"] == "ops-team" and room["member_count"] == 1 and room["kind"] == "room"
    listed = b.get("/api/v1/rooms", {"q": "ops"}).json()
    assert [r["slug"] for r in listed] == ["ops-team"]
    assert b.post("/api/v1/rooms/ops-team/join").status_code == 200
    assert b.post("/api/v1/rooms/ops-team/join").status_code == 200  # idempotent
    assert Membership.objects.filter(conversation_id=room["id"]).count() == 2
    assert b.post("/api/v1/rooms/ops-team/leave").status_code == 200
    assert Membership.objects.filter(conversation_id=room["id"]).count() == 1
    assert_error(a.post("/api/v1/rooms", {"name": "Ops Team"}), 409, "conflict")


def test_private_rooms_are_not_listed_or_joinable(alice, bob, api_for):
    api_for(alice).post("/api/v1/rooms", {"name": "Secret", "public": False})
    b = api_for(bob)
    assert b.get("/api/v1/rooms").json() == []
    assert_error(b.post("/api/v1/rooms/secret/join"), 404, "not_found")


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"name": ""},
        {"name": 5},
        {"name": "x" * 81},
        {"name": "ok", "public": "yes"},
        {"name": "ok", "slug": "Bad Slug"},
        {"name": "!!!"},
        {"name": "ok", "topic": "t" * 301},
    ],
)
def test_room_create_bad_input(alice, api_for, payload):
    assert_error(api_for(alice).post("/api/v1/rooms", payload), 400, "bad_request")
    assert not Conversation.objects.exists()


def test_direct_get_or_create(alice, bob, api_for):
    a = api_for(alice)
    first = a.post("/api/v1/direct", {"username": "bob"})
    assert first.status_code == 201
    again = api_for(bob).post("/api/v1/direct", {"username": "alice"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert first.json()["title"] == "Bob B."
    assert_error(a.post("/api/v1/direct", {"username": "nobody"}), 404, "not_found")
    assert_error(a.post("/api/v1/direct", {"username": "alice"}), 400, "bad_request")
    assert_error(a.post("/api/v1/direct", {}), 400, "bad_request")
    assert Conversation.objects.filter(kind="direct").count() == 1


# --- messages -----------------------------------------------------------------------------


def test_send_and_idempotent_retry(alice, room, api_for):
    a = api_for(alice)
    first = send(a, room.id, "hello", client_id="c1")
    assert first.status_code == 201
    msg = first.json()
    assert msg["seq"] == 1 and msg["sender"]["username"] == "alice" and msg["client_id"] == "c1"
    assert msg["created_at"].endswith("Z")
    retry = send(a, room.id, "hello", client_id="c1")
    assert retry.status_code == 200 and retry.json()["id"] == msg["id"]
    assert Message.objects.count() == 1


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({}, 400, "bad_request"),
        ({"body": ""}, 400, "bad_request"),
        ({"body": 12}, 400, "bad_request"),
        ({"body": ["x"]}, 400, "bad_request"),
        ({"body": "x" * 4001}, 400, "too_long"),
        ({"body": "ok", "client_id": 7}, 400, "bad_request"),
        ({"body": "ok", "client_id": "c" * 65}, 400, "bad_request"),
    ],
)
def test_send_bad_input_writes_nothing(alice, room, api_for, payload, status, code):
    resp = api_for(alice).post(f"/api/v1/conversations/{room.id}/messages", payload)
    assert_error(resp, status, code)
    room.refresh_from_db()
    assert room.last_seq == 0 and not Message.objects.exists()


@pytest.mark.parametrize("conv", ["999999", "0", "-1", "abc", str(2**70)])
def test_unknown_or_invalid_conversation_ids(alice, api_for, conv):
    a = api_for(alice)
    r1 = a.post(f"/api/v1/conversations/{conv}/messages", {"body": "x"})
    r2 = a.get(f"/api/v1/conversations/{conv}/messages")
    for r in (r1, r2):
        assert r.status_code in (400, 404), r.content
        assert r.json()["error"] in ("bad_request", "not_found")
    assert not Message.objects.exists()


def test_non_member_can_neither_read_nor_send(room, carol, api_for):
    services.message_create(sender=room.created_by, conversation_id=room.id, body="private")
    c = api_for(carol)
    assert_error(c.get(f"/api/v1/conversations/{room.id}/messages"), 404, "not_found")
    assert_error(send(c, room.id), 404, "not_found")
    assert_error(c.get(f"/api/v1/conversations/{room.id}/members"), 404, "not_found")
    assert_error(c.post(f"/api/v1/conversations/{room.id}/read", {"seq": 1}), 404, "not_found")
    assert Message.objects.count() == 1


def test_rate_limit(alice, room, api_for, settings):
    settings.PARLEY_RATE_MESSAGES_PER_10S = 3
    a = api_for(alice)
    assert [send(a, room.id, f"m{i}").status_code for i in range(3)] == [201, 201, 201]
    assert_error(send(a, room.id, "too many"), 429, "rate_limited")
    assert Message.objects.count() == 3


# --- history --------------------------------------------------------------------------------


@pytest.fixture
def history(alice, room):
    for i in range(1, 121):
        services.message_create(sender=alice, conversation_id=room.id, body=f"m{i}")
    return room


def seqs(resp):
    assert resp.status_code == 200, resp.content
    return [m["seq"] for m in resp.json()["messages"]]


def test_history_newest_page_and_paging_back(alice, history, api_for):
    a = api_for(alice)
    url = f"/api/v1/conversations/{history.id}/messages"
    first = a.get(url)
    assert seqs(first) == list(range(71, 121))
    page = first.json()
    assert page["before"] == 71 and page["after"] is None
    assert page["next"] == f"{url}?before=71&limit=50"
    second = a.get(page["next"])
    assert seqs(second) == list(range(21, 71))
    third = a.get(second.json()["next"])
    assert seqs(third) == list(range(1, 21))
    assert third.json()["next"] is None and third.json()["before"] is None


def test_history_forward_from_after(alice, history, api_for):
    a = api_for(alice)
    url = f"/api/v1/conversations/{history.id}/messages"
    page = a.get(url, {"after": 0, "limit": 100})
    assert seqs(page) == list(range(1, 101))
    assert page.json()["after"] == 100
    rest = a.get(page.json()["next"])
    assert seqs(rest) == list(range(101, 121))
    assert rest.json()["next"] is None
    assert seqs(a.get(url, {"after": 120})) == []
    assert seqs(a.get(url, {"after": 5000})) == []


def test_history_before_and_between(alice, history, api_for):
    a = api_for(alice)
    url = f"/api/v1/conversations/{history.id}/messages"
    assert seqs(a.get(url, {"before": 11, "limit": 5})) == [6, 7, 8, 9, 10]
    assert seqs(a.get(url, {"before": 3, "limit": 5})) == [1, 2]
    assert seqs(a.get(url, {"before": 1})) == []
    assert seqs(a.get(url, {"after": 10, "before": 15})) == [11, 12, 13, 14]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": "x"},
        {"after": -1},
        {"before": "y"},
        {"after": str(2**70)},
    ],
)
def test_history_bounds(alice, history, api_for, params):
    resp = api_for(alice).get(f"/api/v1/conversations/{history.id}/messages", params)
    assert_error(resp, 400, "bad_request")


def test_history_limit_200_is_allowed(alice, history, api_for):
    resp = api_for(alice).get(f"/api/v1/conversations/{history.id}/messages", {"limit": 200})
    assert seqs(resp) == list(range(1, 121))


def test_history_pages_are_the_orm_messages_in_the_api_schema(alice, bob, history, api_for):
    """The API reads pages with one raw query and writes them without validating them
    again: same objects as the ORM's messages through events.message_json, in the
    schema the OpenAPI document promises, for every paging shape."""
    from parley.chat import events, selectors
    from parley.web.api import MessagePageOut

    services.room_join(user=bob, slug=history.slug)
    services.message_create(sender=bob, conversation_id=history.id, body="é ✓", client_id="b-1")
    url = f"/api/v1/conversations/{history.id}/messages"
    for params in ({}, {"before": 60}, {"after": 100}, {"after": 10, "before": 20}, {"limit": 3}):
        resp = api_for(alice).get(url, params)
        assert resp.status_code == 200
        body = resp.json()
        assert MessagePageOut.model_validate(body).model_dump(mode="json") == body
        orm = selectors.message_page(user=alice, conversation_id=history.id, **params)
        assert body["messages"] == [events.message_json(m) for m in orm.messages], params
    newest = api_for(alice).get(url, {"limit": 1}).json()["messages"][0]
    assert newest["sender"] == {"id": bob.id, "username": "bob", "display_name": "Bob B."}
    assert (newest["body"], newest["client_id"]) == ("é ✓", "b-1")
    assert newest["created_at"].endswith("Z")


# --- receipts, unread, mute, members, notifications ------------------------------------------


def test_unread_counts_and_read_receipts(alice, bob, room, api_for):
    for i in range(5):
        services.message_create(sender=alice, conversation_id=room.id, body=f"m{i}")
    b = api_for(bob)
    conv = next(c for c in b.get("/api/v1/conversations").json() if c["id"] == room.id)
    assert conv["last_seq"] == 5 and conv["unread"] == 5
    assert b.post(f"/api/v1/conversations/{room.id}/read", {"seq": 3}).json()["last_read_seq"] == 3
    # never backwards
    assert b.post(f"/api/v1/conversations/{room.id}/read", {"seq": 1}).json()["last_read_seq"] == 3
    # past the end is clamped to the last seq
    assert b.post(f"/api/v1/conversations/{room.id}/read", {"seq": 99}).json()["last_read_seq"] == 5
    conv = next(c for c in b.get("/api/v1/conversations").json() if c["id"] == room.id)
    assert conv["unread"] == 0
    receipts = {m["user"]["username"]: m for m in conv["members"]}
    assert receipts["bob"]["last_read_seq"] == 5 and receipts["alice"]["last_read_seq"] == 5
    members = b.get(f"/api/v1/conversations/{room.id}/members").json()
    assert {m["user"]["username"]: m["last_read_seq"] for m in members} == {"alice": 5, "bob": 5}
    assert all(m["online"] is False for m in members)
    for bad in ({}, {"seq": -1}, {"seq": "3"}, {"seq": 1.5}, {"seq": True}):
        assert_error(b.post(f"/api/v1/conversations/{room.id}/read", bad), 400, "bad_request")


def test_mute(bob, room, api_for):
    b = api_for(bob)
    assert b.post(f"/api/v1/conversations/{room.id}/mute", {"muted": True}).json()["muted"] is True
    assert Membership.objects.get(user=bob, conversation=room).muted
    assert_error(
        b.post(f"/api/v1/conversations/{room.id}/mute", {"muted": "no"}), 400, "bad_request"
    )
    assert (
        b.post(f"/api/v1/conversations/{room.id}/mute", {"muted": False}).json()["muted"] is False
    )


def test_notifications_list_is_empty_then_shows_rows(alice, room, api_for):
    from parley.chat.models import Notification

    a = api_for(alice)
    assert a.get("/api/v1/notifications").json() == []
    Notification.objects.create(
        user=alice, conversation=room, first_seq=1, last_seq=3, message_count=3
    )
    rows = a.get("/api/v1/notifications").json()
    assert len(rows) == 1 and rows[0]["conversation"] == room.id and rows[0]["open"] is True


def test_conversation_list_is_the_callers_only(alice, bob, carol, room, api_for):
    ids = [c["id"] for c in api_for(carol).get("/api/v1/conversations").json()]
    assert ids == []
    ids = [c["id"] for c in api_for(bob).get("/api/v1/conversations").json()]
    assert ids == [room.id]
