"""The notification email: composed from templates, sent through Django's email backend."""

from __future__ import annotations

import smtplib

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import render_to_string

from parley.chat import notifications
from parley.chat.models import Conversation, Membership, Message, Notification

# What counts as "the mail server did not take it": retried, then recorded as failed.
SEND_ERRORS = (smtplib.SMTPException, OSError)


def conversation_url(conversation_id: int) -> str:
    # The conversation page of the web service (web/urls.py: "c/<id>/").
    return f"{settings.PARLEY_PUBLIC_URL.rstrip('/')}/c/{conversation_id}/"


def _title(notification: Notification) -> str:
    conversation = notification.conversation
    if conversation.kind == Conversation.Kind.ROOM:
        return conversation.name
    other = (
        Membership.objects.filter(conversation=conversation)
        .exclude(user_id=notification.user_id)
        .select_related("user")
        .first()
    )
    return f"{other.user.shown_name} (direct)" if other else "a direct conversation"


def notification_email(notification: Notification) -> EmailMultiAlternatives:
    recent = list(
        Message.objects.filter(
            conversation_id=notification.conversation_id,
            seq__gte=notification.first_seq,
            seq__lte=notification.last_seq,
            deleted_at=None,
        )
        .select_related("sender")
        .order_by("-seq")[:5]
    )[::-1]
    count = notification.message_count
    title = _title(notification)
    context = {
        "user": notification.user,
        "title": title,
        "count": count,
        "messages": recent,
        "url": conversation_url(notification.conversation_id),
        "more": max(count - len(recent), 0),
    }
    subject = " ".join(f"{count} new message{'s' if count != 1 else ''} in {title}".split())
    message = EmailMultiAlternatives(
        subject=subject,
        body=render_to_string("worker/notification_email.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[notification.user.email],
        headers={"Auto-Submitted": "auto-generated", "X-Parley-Notification": str(notification.pk)},
    )
    message.attach_alternative(
        render_to_string("worker/notification_email.html", context), "text/html"
    )
    return message


def notification_email_send(*, notification_id: int) -> str:
    """Send a burst's email at most once. Returns "sent" or "skipped"; raises SEND_ERRORS.

    The claim (emailed_at) commits before the send; if the server refuses or cannot be
    reached the claim is cleared so that a retry may send it.
    """
    notification = notifications.notification_email_claim(notification_id=notification_id)
    if notification is None:
        return "skipped"
    if not notification.user.email:  # removed since the burst opened: nowhere to send
        notifications.notification_email_release(notification=notification)
        notifications.notification_email_failed(notification_id=notification_id)
        return "failed"
    try:
        notification_email(notification).send()
    except SEND_ERRORS:
        notifications.notification_email_release(notification=notification)
        raise
    return "sent"
