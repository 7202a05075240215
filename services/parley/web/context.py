"""Template context shared by every page."""

from __future__ import annotations

from django.conf import settings


def parley(request):
    ctx = {
        "allow_signup": settings.PARLEY_ALLOW_SIGNUP,
        "realtime_url": settings.REALTIME_PUBLIC_URL,
        "max_message_chars": settings.PARLEY_MAX_MESSAGE_CHARS,
    }
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        from parley.chat import selectors

        ctx["notification_count"] = selectors.notification_open_count(user=user)
    return ctx
