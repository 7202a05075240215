"""Server-rendered pages of the web service.

Usable with JavaScript off: every action is a form POST (CSRF-protected) that redirects
with 303 on success, so reloading the result never repeats the action. Views stay thin:
they read forms, call a service (writes) or selector (reads), and show a DomainError's
detail to the user as a message or a form error, never as a traceback.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render, resolve_url
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from parley.accounts import services as account_services
from parley.chat import selectors, services
from parley.chat.errors import BadRequest, Conflict, DomainError, NotFound
from parley.chat.models import Membership
from parley.chat.ratelimit import message_rate_check
from parley.web import metrics
from parley.web.forms import (
    DirectForm,
    MessageForm,
    RoomForm,
    RoomSearchForm,
    SignupForm,
    new_client_id,
)


class HttpResponseSeeOther(HttpResponseRedirect):
    """303: the browser follows with a GET, whatever the method of the request was."""

    status_code = 303


def see_other(to, *args, **kwargs) -> HttpResponseSeeOther:
    return HttpResponseSeeOther(resolve_url(to, *args, **kwargs))


def _safe_next(request: HttpRequest) -> str | None:
    target = request.POST.get("next") or request.GET.get("next")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return None


# --- accounts -----------------------------------------------------------------------


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    return redirect("conversation-list" if request.user.is_authenticated else "login")


def _form_error(form, exc: DomainError, *, conflict_field: str) -> int:
    """Show a domain error on the form (a Conflict next to the field it is about);
    returns the HTTP status the page is rendered with."""
    form.add_error(conflict_field if isinstance(exc, Conflict) else None, exc.detail)
    return exc.status


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if not settings.PARLEY_ALLOW_SIGNUP:
        return render(request, "signup_disabled.html", status=403)
    if request.user.is_authenticated:
        return redirect("conversation-list")
    form = SignupForm(request.POST or None)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                user = account_services.user_create(
                    username=data["username"],
                    password=data["password1"],
                    display_name=data["display_name"],
                    email=data["email"],
                )
            except DomainError as exc:
                status = _form_error(form, exc, conflict_field="username")
            else:
                login(request, user)
                messages.success(request, f"Welcome to Parley, {user.shown_name}.")
                return see_other(_safe_next(request) or "conversation-list")
    return render(
        request, "signup.html", {"form": form, "next": _safe_next(request)}, status=status
    )


# --- conversations ------------------------------------------------------------------


@login_required
@require_safe
def conversation_list(request: HttpRequest) -> HttpResponse:
    items = selectors.conversation_list(user=request.user)
    return render(
        request,
        "conversation_list.html",
        {
            "items": items,
            "unread_conversations": sum(1 for item in items if item["unread"]),
            "direct_form": DirectForm(),
        },
    )


def _membership_or_404(request: HttpRequest, conversation_id: int) -> Membership:
    try:
        return selectors.membership_get(user=request.user, conversation_id=conversation_id)
    except NotFound:
        raise Http404("No such conversation, or you are not a member.") from None


@login_required
@require_http_methods(["GET", "POST"])
def conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """The conversation page (history and the send form); POST sends a message."""
    membership = _membership_or_404(request, conversation_id)
    if request.method == "GET":
        return _render_conversation(request, membership, MessageForm())
    form = MessageForm(request.POST)
    status = 400
    if form.is_valid():
        try:
            message = _send(request, conversation_id, form.cleaned_data)
        except DomainError as exc:
            messages.error(request, exc.detail)
            status = exc.status
        else:
            url = reverse("conversation", args=[conversation_id])
            return see_other(f"{url}#m-{message.seq}")
    # Nothing was sent: show the page again with what was typed, under a fresh client_id
    # (the old one is unused, but a new one can never collide with a stored message).
    data = request.POST.copy()
    data["client_id"] = new_client_id()
    return _render_conversation(request, membership, MessageForm(data), status=status)


def _send(request: HttpRequest, conversation_id: int, data: dict):
    # Same order as the API: a malformed message does not count against the rate limit.
    services.message_validate(body=data["body"], client_id=data["client_id"])
    message_rate_check(user_id=request.user.id)
    message, created = services.message_create(
        sender=request.user,
        conversation_id=conversation_id,
        body=data["body"],
        client_id=data["client_id"],
    )
    if created:
        metrics.messages_sent.labels("page").inc()
    return message


def _render_conversation(
    request: HttpRequest, membership: Membership, form: MessageForm, status: int = 200
) -> HttpResponse:
    conversation_id = membership.conversation_id
    try:
        page = selectors.message_page(
            user=request.user,
            conversation_id=conversation_id,
            before=request.GET.get("before"),
            after=request.GET.get("after"),
        )
    except BadRequest as exc:
        messages.error(request, exc.detail)
        page = selectors.message_page(user=request.user, conversation_id=conversation_id)
    newest_shown = page.messages[-1].seq if page.messages else 0
    # Opening the page is reading it: up to the newest message shown, never backwards.
    if newest_shown > membership.last_read_seq:
        services.membership_mark_read(
            user=request.user, conversation_id=conversation_id, seq=newest_shown
        )
    # Read after marking, so this conversation's own unread count is already zero.
    items = selectors.conversation_list(user=request.user)
    current = next((i for i in items if i["conversation"].id == conversation_id), None)
    if current is None:  # left in another tab between the two reads
        raise Http404("No such conversation, or you are not a member.")
    return render(
        request,
        "chat.html",
        {
            "item": current,
            "conversation": current["conversation"],
            "items": items,
            "page": page,
            "newest_shown": newest_shown,
            "form": form,
        },
        status=status,
    )


@login_required
@require_POST
def conversation_mute(request: HttpRequest, conversation_id: int) -> HttpResponse:
    muted = request.POST.get("muted") == "1"
    try:
        services.membership_set_muted(
            user=request.user, conversation_id=conversation_id, muted=muted
        )
    except NotFound:
        raise Http404("No such conversation, or you are not a member.") from None
    messages.success(
        request,
        "Notifications are off for this conversation."
        if muted
        else "Notifications are on for this conversation.",
    )
    return see_other("conversation", conversation_id=conversation_id)


# --- rooms --------------------------------------------------------------------------


@login_required
@require_safe
def room_list(request: HttpRequest) -> HttpResponse:
    form = RoomSearchForm(request.GET)
    q = form.cleaned_data["q"].strip() if form.is_valid() else ""
    joined = {cid for cid, _ in selectors.conversation_ids_for_user(user_id=request.user.id)}
    return render(
        request,
        "rooms.html",
        {
            "form": form,
            "q": q,
            "rooms": selectors.room_search(q=q),
            "joined": joined,
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def room_create(request: HttpRequest) -> HttpResponse:
    form = RoomForm(request.POST or None)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                room = services.room_create(
                    creator=request.user,
                    name=data["name"],
                    slug=data["slug"] or None,
                    topic=data["topic"],
                    public=data["public"],
                )
            except DomainError as exc:
                status = _form_error(form, exc, conflict_field="slug")
            else:
                messages.success(request, f"Room {room.name} created.")
                return see_other("conversation", conversation_id=room.id)
    return render(request, "room_form.html", {"form": form}, status=status)


@login_required
@require_POST
def room_join(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        room = services.room_join(user=request.user, slug=slug)
    except DomainError as exc:
        messages.error(request, exc.detail)
        return see_other("room-list")
    messages.success(request, f"You joined {room.name}.")
    return see_other("conversation", conversation_id=room.id)


@login_required
@require_POST
def room_leave(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        room = services.room_leave(user=request.user, slug=slug)
    except DomainError as exc:
        messages.error(request, exc.detail)
        return see_other("room-list")
    messages.success(request, f"You left {room.name}.")
    return see_other(_safe_next(request) or "room-list")


# --- direct conversations -----------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def direct(request: HttpRequest) -> HttpResponse:
    """Start (or reopen) the direct conversation with a user, by username."""
    if request.method == "GET":
        # ?username= pre-fills the form (links from member lists); only the POST acts.
        form = DirectForm(initial={"username": request.GET.get("username", "")[:150]})
        return render(request, "direct.html", {"form": form})
    form = DirectForm(request.POST)
    status = 400
    if form.is_valid():
        try:
            conv, _ = services.direct_get_or_create(
                user=request.user, username=form.cleaned_data["username"]
            )
        except DomainError as exc:
            form.add_error("username", exc.detail)
            status = exc.status
        else:
            return see_other("conversation", conversation_id=conv.id)
    return render(request, "direct.html", {"form": form}, status=status)


# --- notifications ------------------------------------------------------------------


@login_required
@require_safe
def notification_list(request: HttpRequest) -> HttpResponse:
    titles = {
        item["conversation"].id: item["title"]
        for item in selectors.conversation_list(user=request.user)
    }
    rows = [
        {
            "notification": n,
            "title": titles.get(n.conversation_id),
            "member": n.conversation_id in titles,  # else it was left since: no link
        }
        for n in selectors.notification_list(user=request.user)
    ]
    return render(request, "notifications.html", {"rows": rows})
