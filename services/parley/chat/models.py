from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class Conversation(models.Model):
    """A room (named, public or private) or a direct conversation between two users."""

    class Kind(models.TextChoices):
        ROOM = "room", "Room"
        DIRECT = "direct", "Direct"

    kind = models.CharField(max_length=6, choices=Kind.choices)
    name = models.CharField(max_length=80, blank=True)
    slug = models.SlugField(max_length=80, null=True, blank=True, unique=True)
    topic = models.CharField(max_length=300, blank=True)
    is_public = models.BooleanField(default=False)
    # "<low user id>:<high user id>" for direct conversations: at most one per pair.
    direct_key = models.CharField(max_length=50, null=True, blank=True, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # The seq of the newest message. Incremented under the row lock in the same
    # transaction that inserts the message, so seqs have no gaps and no duplicates.
    last_seq = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(kind="direct", direct_key__isnull=False, slug__isnull=True)
                | Q(kind="room", direct_key__isnull=True, slug__isnull=False),
                name="conversation_kind_keys",
            ),
        ]
        indexes = [
            models.Index(
                fields=["name"], name="room_public_name", condition=Q(kind="room", is_public=True)
            ),
        ]

    def __str__(self) -> str:
        return self.name if self.kind == self.Kind.ROOM else f"direct {self.direct_key}"


class Membership(models.Model):
    """A user in a conversation, with how far they have received and read."""

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="memberships"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    joined_at = models.DateTimeField(auto_now_add=True)
    last_delivered_seq = models.BigIntegerField(default=0)
    last_read_seq = models.BigIntegerField(default=0)
    muted = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "user"], name="membership_unique"),
        ]
        indexes = [models.Index(fields=["user", "conversation"], name="membership_by_user")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.conversation_id}"


class Message(models.Model):
    id = models.BigAutoField(primary_key=True)
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    # 1, 2, 3... per conversation. The unique index (conversation, seq) is also the
    # index every history page is read through: a range scan, whatever the size.
    seq = models.BigIntegerField()
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="messages_sent"
    )
    body = models.TextField()
    # NULL (not "") when absent, so the partial unique constraint ignores it.
    client_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(auto_now_add=True)
    edited_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "seq"], name="message_seq_unique"),
            models.UniqueConstraint(
                fields=["sender", "client_id"],
                condition=Q(client_id__isnull=False),
                name="message_client_id_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} in {self.conversation_id}"


class Notification(models.Model):
    """One per (user, conversation) burst of messages that arrived while the user was away."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications"
    )
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="notifications"
    )
    first_seq = models.BigIntegerField()
    last_seq = models.BigIntegerField()
    message_count = models.IntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Set when the burst ends (the user came online or read the conversation).
    closed_at = models.DateTimeField(null=True, blank=True)
    emailed_at = models.DateTimeField(null=True, blank=True)
    email_failed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # At most one open burst per (user, conversation).
            models.UniqueConstraint(
                fields=["user", "conversation"],
                condition=Q(closed_at__isnull=True),
                name="notification_one_open_burst",
            ),
        ]
        indexes = [models.Index(fields=["user", "-created_at"], name="notification_by_user")]

    def __str__(self) -> str:
        return (
            f"notification {self.user_id}/{self.conversation_id} {self.first_seq}-{self.last_seq}"
        )
