"""The JSON API under /api/v1/ (django-ninja; the OpenAPI document is generated from it).

Views stay thin: they parse, call a service or selector, and shape the answer.
Every error is JSON `{"error": code, "detail": text}`; nothing leaks a traceback.
"""

from __future__ import annotations

import logging
from datetime import datetime

import orjson
from django.contrib.auth import authenticate
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI, Path, Query, Schema, Status
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.security import HttpBearer, SessionAuth
from pydantic import Field, StrictBool, StrictInt, StrictStr

from parley.accounts import selectors as account_selectors
from parley.accounts import services as account_services
from parley.chat import events, selectors, services
from parley.chat.errors import DomainError
from parley.chat.ratelimit import message_rate_check
from parley.web import metrics

logger = logging.getLogger(__name__)
BIGINT_MAX = 2**63 - 1


class BearerAuth(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str):
        user = account_selectors.user_from_token(token=token)
        if user is not None:
            request.user = user
        return user


api = NinjaAPI(
    title="Parley API",
    version="1",
    description="Parley's HTTP API. See docs/protocol.md for the WebSocket protocol.",
    auth=[BearerAuth(), SessionAuth()],
    urls_namespace="api",
    openapi_url="/openapi.json",
    docs_url="/docs",
)


# --- errors -------------------------------------------------------------------------


def error_response(code: str, detail: str, status: int) -> JsonResponse:
    return JsonResponse({"error": code, "detail": detail}, status=status)


@api.exception_handler(DomainError)
def _domain_error(request, exc: DomainError):
    return error_response(exc.code, exc.detail, exc.status)


@api.exception_handler(NinjaValidationError)
def _validation_error(request, exc: NinjaValidationError):
    parts = []
    for err in exc.errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "payload"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    return error_response("bad_request", "; ".join(parts) or "Invalid request.", 400)


@api.exception_handler(AuthenticationError)
def _auth_error(request, exc):
    return error_response("unauthorized", "Log in, or send Authorization: Bearer <token>.", 401)


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    code = {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        429: "rate_limited",
    }.get(exc.status_code, "error")
    return error_response(code, str(exc) or code, exc.status_code)


@api.exception_handler(Http404)
def _not_found(request, exc):
    return error_response("not_found", "Not found.", 404)


@api.exception_handler(Exception)
def _unexpected(request, exc):
    logger.exception("unhandled API error")
    return error_response("internal", "Something went wrong on our side; it was logged.", 500)


def api_not_found(request, rest: str = ""):
    return error_response("not_found", f"No API endpoint /api/v1/{rest}.", 404)


# --- schemas ------------------------------------------------------------------------


class UserOut(Schema):
    id: int
    username: str
    display_name: str


class MeOut(UserOut):
    email: str


class SignupIn(Schema):
    username: StrictStr = Field(max_length=150)
    password: StrictStr = Field(max_length=256)
    display_name: StrictStr = Field("", max_length=80)
    email: StrictStr = Field("", max_length=254)


class SignupOut(Schema):
    user: MeOut
    token: str


class TokenIn(Schema):
    username: StrictStr = Field(max_length=150)
    password: StrictStr = Field(max_length=256)


class TokenOut(Schema):
    token: str


class ErrorOut(Schema):
    error: str
    detail: str


class MessageOut(Schema):
    id: int
    conversation: int
    seq: int
    sender: UserOut
    body: str
    client_id: str | None
    created_at: datetime


class MessageIn(Schema):
    body: StrictStr
    client_id: StrictStr | None = None


class MessagePageOut(Schema):
    messages: list[MessageOut]
    before: int | None = Field(description="Pass as `before` for the page of older messages")
    after: int | None = Field(description="Pass as `after` for the page of newer messages")
    next: str | None = Field(description="URL of the next page in the direction of travel")


class ReceiptOut(Schema):
    user: UserOut
    last_delivered_seq: int
    last_read_seq: int


class MemberOut(ReceiptOut):
    online: bool


class ConversationOut(Schema):
    id: int
    kind: str
    name: str
    slug: str | None
    topic: str
    public: bool
    title: str
    last_seq: int
    unread: int
    muted: bool
    member_count: int
    members: list[ReceiptOut]


class RoomIn(Schema):
    name: StrictStr
    slug: StrictStr | None = None
    topic: StrictStr | None = ""
    public: StrictBool = True


class RoomOut(Schema):
    id: int
    name: str
    slug: str
    topic: str
    public: bool
    member_count: int


class DirectIn(Schema):
    username: StrictStr


class ReadIn(Schema):
    seq: StrictInt = Field(ge=0, le=BIGINT_MAX)


class ReadOut(Schema):
    conversation: int
    last_delivered_seq: int
    last_read_seq: int


class MuteIn(Schema):
    muted: StrictBool


class MuteOut(Schema):
    conversation: int
    muted: bool


class NotificationOut(Schema):
    id: int
    conversation: int
    conversation_title: str
    first_seq: int
    last_seq: int
    message_count: int
    created_at: datetime
    updated_at: datetime
    open: bool


ERRORS = {400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 404: ErrorOut, 409: ErrorOut}


# --- shaping ------------------------------------------------------------------------


def me_json(user) -> dict:
    return {**events.user_json(user), "email": user.email}


def receipt_json(membership) -> dict:
    return {
        "user": events.user_json(membership.user),
        "last_delivered_seq": membership.last_delivered_seq,
        "last_read_seq": membership.last_read_seq,
    }


def conversation_json(item: dict) -> dict:
    conv, membership = item["conversation"], item["membership"]
    return {
        "id": conv.id,
        "kind": conv.kind,
        "name": conv.name,
        "slug": conv.slug,
        "topic": conv.topic,
        "public": conv.is_public,
        "title": item["title"],
        "last_seq": item["last_seq"],
        "unread": item["unread"],
        "muted": membership.muted,
        "member_count": item["member_count"],
        "members": [receipt_json(m) for m in item["members"]],
    }


def room_json(room, member_count: int | None = None) -> dict:
    if member_count is None:
        member_count = getattr(room, "member_count", None)
        if member_count is None:
            member_count = room.memberships.count()
    return {
        "id": room.id,
        "name": room.name,
        "slug": room.slug,
        "topic": room.topic,
        "public": room.is_public,
        "member_count": member_count,
    }


def _conversation_item(user, conversation_id: int) -> dict:
    for item in selectors.conversation_list(user=user):
        if item["conversation"].id == conversation_id:
            return item
    raise Http404


# --- accounts -----------------------------------------------------------------------


@api.post("/accounts", auth=None, response={201: SignupOut, **ERRORS}, tags=["accounts"])
def signup(request, payload: SignupIn):
    """Sign up (when the server allows it); returns the user and an API token."""
    user = account_services.user_create(
        username=payload.username,
        password=payload.password,
        display_name=payload.display_name,
        email=payload.email,
    )
    return Status(201, {"user": me_json(user), "token": account_services.token_create(user=user)})


@api.post("/auth/token", auth=None, response={200: TokenOut, **ERRORS}, tags=["accounts"])
def token(request, payload: TokenIn):
    """Exchange a username and password for a bearer token."""
    user = authenticate(request, username=payload.username, password=payload.password)
    if user is None:
        return Status(401, {"error": "unauthorized", "detail": "Wrong username or password."})
    return {"token": account_services.token_create(user=user)}


@api.get("/me", response={200: MeOut, **ERRORS}, tags=["accounts"])
def me(request):
    return me_json(request.auth)


# --- conversations ------------------------------------------------------------------


@api.get("/conversations", response={200: list[ConversationOut], **ERRORS}, tags=["conversations"])
def conversations(request):
    """The caller's conversations, most recent first, with last_seq, unread and receipts."""
    return [conversation_json(item) for item in selectors.conversation_list(user=request.auth)]


ConvId = Path(..., ge=1, le=BIGINT_MAX)


@api.get(
    "/conversations/{conversation_id}/messages",
    response={200: MessagePageOut, **ERRORS},
    tags=["messages"],
)
def history(
    request,
    conversation_id: int = ConvId,
    after: int | None = Query(None, ge=0, le=BIGINT_MAX),
    before: int | None = Query(None, ge=0, le=BIGINT_MAX),
    limit: int = Query(selectors.PAGE_DEFAULT, ge=1, le=selectors.PAGE_MAX),
):
    """A page of history ascending by seq, with cursors to the older and newer pages."""
    page = selectors.message_page(
        user=request.auth,
        conversation_id=conversation_id,
        after=after,
        before=before,
        limit=limit,
        as_json=True,
    )
    msgs = page.messages
    before_cursor = msgs[0]["seq"] if msgs and page.has_older else None
    after_cursor = msgs[-1]["seq"] if msgs and page.has_newer else None
    if not msgs:
        before_cursor = before if page.has_older else None
        after_cursor = after if page.has_newer else None
    base = request.path
    if page.direction == "newer":
        nxt = f"{base}?after={after_cursor}&limit={limit}" if after_cursor is not None else None
    else:
        nxt = f"{base}?before={before_cursor}&limit={limit}" if before_cursor is not None else None
    # Already in MessagePageOut's shape (selectors build it; tests check it against the
    # schema): written as it is, without validating 50 messages again per page.
    body = {
        "messages": msgs,
        "before": before_cursor,
        "after": after_cursor,
        "next": nxt,
    }
    return HttpResponse(orjson.dumps(body), content_type="application/json")


@api.post(
    "/conversations/{conversation_id}/messages",
    response={200: MessageOut, 201: MessageOut, 429: ErrorOut, **ERRORS},
    tags=["messages"],
)
def send(request, payload: MessageIn, conversation_id: int = ConvId):
    """Send a message. The same client_id again returns the first message with 200."""
    services.message_validate(body=payload.body, client_id=payload.client_id)
    selectors.membership_get(user=request.auth, conversation_id=conversation_id)
    message_rate_check(user_id=request.auth.id)
    message, created = services.message_create(
        sender=request.auth,
        conversation_id=conversation_id,
        body=payload.body,
        client_id=payload.client_id,
    )
    if created:
        metrics.messages_sent.labels("http").inc()
    return Status(201 if created else 200, events.message_json(message))


@api.post(
    "/conversations/{conversation_id}/read",
    response={200: ReadOut, **ERRORS},
    tags=["receipts"],
)
def read(request, payload: ReadIn, conversation_id: int = ConvId):
    """Mark the conversation read up to seq (never moves backwards)."""
    m = services.membership_mark_read(
        user=request.auth, conversation_id=conversation_id, seq=payload.seq
    )
    return {
        "conversation": conversation_id,
        "last_delivered_seq": m.last_delivered_seq,
        "last_read_seq": m.last_read_seq,
    }


@api.post(
    "/conversations/{conversation_id}/mute",
    response={200: MuteOut, **ERRORS},
    tags=["conversations"],
)
def mute(request, payload: MuteIn, conversation_id: int = ConvId):
    m = services.membership_set_muted(
        user=request.auth, conversation_id=conversation_id, muted=payload.muted
    )
    return {"conversation": conversation_id, "muted": m.muted}


@api.get(
    "/conversations/{conversation_id}/members",
    response={200: list[MemberOut], **ERRORS},
    tags=["receipts"],
)
def members(request, conversation_id: int = ConvId):
    """Members with their receipts and whether they are online now."""
    return [
        {**receipt_json(row["membership"]), "online": row["online"]}
        for row in selectors.member_list(user=request.auth, conversation_id=conversation_id)
    ]


# --- rooms and direct conversations -------------------------------------------------


@api.get("/rooms", response={200: list[RoomOut], **ERRORS}, tags=["rooms"])
def rooms(request, q: str = Query("", max_length=100)):
    """Public rooms, optionally filtered by a search term."""
    return [room_json(r) for r in selectors.room_search(q=q)]


@api.post("/rooms", response={201: ConversationOut, **ERRORS}, tags=["rooms"])
def room_create(request, payload: RoomIn):
    """Create a room; the creator joins it."""
    room = services.room_create(
        creator=request.auth,
        name=payload.name,
        slug=payload.slug,
        topic=payload.topic,
        public=payload.public,
    )
    return Status(201, conversation_json(_conversation_item(request.auth, room.id)))


@api.post("/rooms/{slug}/join", response={200: ConversationOut, **ERRORS}, tags=["rooms"])
def room_join(request, slug: str):
    room = services.room_join(user=request.auth, slug=slug)
    return conversation_json(_conversation_item(request.auth, room.id))


@api.post("/rooms/{slug}/leave", response={200: RoomOut, **ERRORS}, tags=["rooms"])
def room_leave(request, slug: str):
    room = services.room_leave(user=request.auth, slug=slug)
    return room_json(room)


@api.post(
    "/direct",
    response={200: ConversationOut, 201: ConversationOut, **ERRORS},
    tags=["conversations"],
)
def direct(request, payload: DirectIn):
    """Get or create the direct conversation with another user."""
    conv, created = services.direct_get_or_create(user=request.auth, username=payload.username)
    return Status(
        201 if created else 200, conversation_json(_conversation_item(request.auth, conv.id))
    )


@api.get("/notifications", response={200: list[NotificationOut], **ERRORS}, tags=["notifications"])
def notifications(request):
    """The caller's notifications, newest first."""
    return [
        {
            "id": n.id,
            "conversation": n.conversation_id,
            "conversation_title": n.conversation.name or "Direct message",
            "first_seq": n.first_seq,
            "last_seq": n.last_seq,
            "message_count": n.message_count,
            "created_at": n.created_at,
            "updated_at": n.updated_at,
            "open": n.closed_at is None,
        }
        for n in selectors.notification_list(user=request.auth)
    ]
