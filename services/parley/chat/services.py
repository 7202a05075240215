"""Writes of the chat domain. Every write other members must see publishes its event on commit."""

from __future__ import annotations

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest
from django.utils.text import slugify

from parley.accounts.models import User
from parley.chat import events, notifications
from parley.chat.errors import BadRequest, Conflict, NotFound, TooLong
from parley.chat.models import Conversation, Membership, Message

CLIENT_ID_MAX = 64


def _membership_for_update(*, user: User, conversation_id: int) -> Membership:
    try:
        return Membership.objects.get(user=user, conversation_id=conversation_id)
    except Membership.DoesNotExist:
        raise NotFound("No such conversation, or you are not a member.") from None


def message_validate(*, body: object, client_id: object = None) -> tuple[str, str | None]:
    """Check a message's fields; return them normalized. Raises BadRequest/TooLong."""
    if not isinstance(body, str):
        raise BadRequest("body must be a string.")
    if not body.strip():
        raise BadRequest("body must not be empty.")
    if "\x00" in body:
        raise BadRequest("body must not contain NUL characters.")
    limit = settings.PARLEY_MAX_MESSAGE_CHARS
    if len(body) > limit:
        raise TooLong(f"body is {len(body)} characters; the limit is {limit}.")
    if client_id is not None:
        if not isinstance(client_id, str) or not client_id or len(client_id) > CLIENT_ID_MAX:
            raise BadRequest(f"client_id must be a string of 1 to {CLIENT_ID_MAX} characters.")
        if "\x00" in client_id:
            raise BadRequest("client_id must not contain NUL characters.")
    return body, client_id


def message_create(
    *, sender: User, conversation_id: int, body: object, client_id: object = None
) -> tuple[Message, bool]:
    """Commit a message and return (message, created).

    The seq comes from `UPDATE conversation SET last_seq = last_seq + 1 ... RETURNING`,
    in the same transaction as the insert: the row lock orders concurrent senders, and a
    rolled-back send takes its seq back with it, so seqs have no gap and no duplicate.
    The same (sender, client_id) again returns the first message (created=False): the
    unique constraint decides, even between concurrent retries.
    """
    body, client_id = message_validate(body=body, client_id=client_id)
    if client_id is not None:
        existing = _message_by_client_id(sender=sender, client_id=client_id)
        if existing is not None:
            return _idempotent_result(existing, conversation_id)
    if not Membership.objects.filter(user=sender, conversation_id=conversation_id).exists():
        raise NotFound("No such conversation, or you are not a member.")
    try:
        with transaction.atomic():
            seq = _allocate_seq(conversation_id)
            message = Message.objects.create(
                conversation_id=conversation_id,
                seq=seq,
                sender=sender,
                body=body,
                client_id=client_id,
            )
            # The sender has obviously seen their own message.
            Membership.objects.filter(user=sender, conversation_id=conversation_id).update(
                last_delivered_seq=Greatest(F("last_delivered_seq"), seq),
                last_read_seq=Greatest(F("last_read_seq"), seq),
            )
            events.publish_on_commit(
                events.conversation_group(conversation_id),
                events.message_event(message, sender),
            )
            # Offline members' notifications: one coalesced worker pass per conversation.
            notifications.notify_on_commit(conversation_id=conversation_id)
    except IntegrityError:
        # A concurrent retry with the same client_id won the unique constraint.
        existing = client_id and _message_by_client_id(sender=sender, client_id=client_id)
        if not existing:
            raise
        return _idempotent_result(existing, conversation_id)
    return message, True


def _allocate_seq(conversation_id: int) -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "UPDATE chat_conversation SET last_seq = last_seq + 1 WHERE id = %s RETURNING last_seq",
            [conversation_id],
        )
        row = cur.fetchone()
    if row is None:
        raise NotFound("No such conversation, or you are not a member.")
    return row[0]


def _message_by_client_id(*, sender: User, client_id: str) -> Message | None:
    return (
        Message.objects.select_related("sender").filter(sender=sender, client_id=client_id).first()
    )


def _idempotent_result(message: Message, conversation_id: int) -> tuple[Message, bool]:
    if message.conversation_id != conversation_id:
        raise Conflict("client_id was already used for a message in another conversation.")
    return message, False


# --- rooms and direct conversations -------------------------------------------------


def room_create(
    *, creator: User, name: object, slug: object = None, topic: object = "", public: object = True
) -> Conversation:
    """Create a room and make its creator a member."""
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("name must be a non-empty string.")
    name = name.strip()
    if len(name) > 80:
        raise BadRequest("name must be at most 80 characters.")
    if topic is None:
        topic = ""
    if not isinstance(topic, str) or len(topic) > 300:
        raise BadRequest("topic must be a string of at most 300 characters.")
    if not isinstance(public, bool):
        raise BadRequest("public must be true or false.")
    if slug in (None, ""):
        slug = slugify(name)[:80]
    elif not isinstance(slug, str) or slugify(slug) != slug or len(slug) > 80:
        raise BadRequest("slug may hold only lowercase letters, digits, hyphens and underscores.")
    if not slug:
        raise BadRequest("name must contain a letter or digit (or give a slug).")
    try:
        with transaction.atomic():
            room = Conversation.objects.create(
                kind=Conversation.Kind.ROOM,
                name=name,
                slug=slug,
                topic=topic.strip(),
                is_public=public,
                created_by=creator,
            )
            _join(user=creator, conversation=room)
    except IntegrityError:
        raise Conflict(f"A room with the slug {slug!r} exists.") from None
    return room


def _join(*, user: User, conversation: Conversation) -> Membership:
    # A newcomer starts with everything before them counted as read.
    membership = Membership.objects.create(
        user=user,
        conversation=conversation,
        last_delivered_seq=conversation.last_seq,
        last_read_seq=conversation.last_seq,
    )
    events.publish_on_commit(
        events.user_group(user.id),
        events.membership_event(conversation_id=conversation.id, event="joined"),
    )
    return membership


def _room_by_slug(slug: str) -> Conversation:
    room = Conversation.objects.filter(kind=Conversation.Kind.ROOM, slug=slug).first()
    if room is None:
        raise NotFound(f"No room {slug!r}.")
    return room


def room_join(*, user: User, slug: str) -> Conversation:
    """Join a public room (idempotent). Private rooms cannot be joined by slug."""
    room = _room_by_slug(slug)
    if Membership.objects.filter(user=user, conversation=room).exists():
        return room
    if not room.is_public:
        raise NotFound(f"No room {slug!r}.")
    try:
        with transaction.atomic():
            _join(user=user, conversation=room)
    except IntegrityError:
        pass  # joined concurrently: same outcome
    return room


def room_leave(*, user: User, slug: str) -> Conversation:
    """Leave a room (idempotent for a room one has already left)."""
    room = _room_by_slug(slug)
    with transaction.atomic():
        deleted, _ = Membership.objects.filter(user=user, conversation=room).delete()
        if deleted:
            events.publish_on_commit(
                events.user_group(user.id),
                events.membership_event(conversation_id=room.id, event="left"),
            )
    if not deleted and not room.is_public:
        raise NotFound(f"No room {slug!r}.")
    return room


def direct_get_or_create(*, user: User, username: object) -> tuple[Conversation, bool]:
    """The direct conversation between `user` and `username`, created on first use."""
    if not isinstance(username, str) or not username.strip():
        raise BadRequest("username must be a non-empty string.")
    other = User.objects.filter(username=username.strip(), is_active=True).first()
    if other is None:
        raise NotFound(f"No user {username.strip()!r}.")
    if other.id == user.id:
        raise BadRequest("A direct conversation needs another user.")
    low, high = sorted((user.id, other.id))
    key = f"{low}:{high}"
    existing = Conversation.objects.filter(direct_key=key).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            conv = Conversation.objects.create(kind=Conversation.Kind.DIRECT, direct_key=key)
            _join(user=user, conversation=conv)
            _join(user=other, conversation=conv)
    except IntegrityError:
        return Conversation.objects.get(direct_key=key), False
    return conv, True


# --- receipts and settings --------------------------------------------------------


def membership_mark_read(*, user: User, conversation_id: int, seq: object) -> Membership:
    """Move the caller's read (and so delivered) position forward to `seq`; never back."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise BadRequest("seq must be a non-negative integer.")
    membership = _membership_for_update(user=user, conversation_id=conversation_id)
    last_seq = Conversation.objects.values_list("last_seq", flat=True).get(pk=conversation_id)
    seq = min(seq, last_seq)
    with transaction.atomic():
        membership = receipts_advance(
            conversation_id=conversation_id,
            user_id=membership.user_id,
            delivered_seq=seq,
            read_seq=seq,
        )
        # Reading the conversation ends its notification burst.
        notifications.burst_close(user_id=user.id, conversation_id=conversation_id, read_seq=seq)
    return membership


def receipts_advance(
    *, conversation_id: int, user_id: int, delivered_seq: int = 0, read_seq: int = 0
) -> Membership | None:
    """Move receipts forward with one GREATEST update: safe to repeat and to reorder.

    Publishes a `receipt` frame to the conversation when anything moved.
    """
    read_seq = max(read_seq, 0)
    delivered_seq = max(delivered_seq, read_seq)
    with transaction.atomic():
        updated = (
            Membership.objects.filter(user_id=user_id, conversation_id=conversation_id)
            .filter(
                # Only touch the row (and broadcast) when something moves forward.
                Q(last_delivered_seq__lt=delivered_seq) | Q(last_read_seq__lt=read_seq)
            )
            .update(
                last_delivered_seq=Greatest(F("last_delivered_seq"), delivered_seq),
                last_read_seq=Greatest(F("last_read_seq"), read_seq),
            )
        )
        membership = Membership.objects.filter(
            user_id=user_id, conversation_id=conversation_id
        ).first()
        if updated and membership is not None:
            events.publish_on_commit(
                events.conversation_group(conversation_id),
                events.receipt_event(
                    conversation_id=conversation_id,
                    user_id=user_id,
                    delivered_seq=membership.last_delivered_seq,
                    read_seq=membership.last_read_seq,
                ),
            )
    return membership


def membership_set_muted(*, user: User, conversation_id: int, muted: object) -> Membership:
    if not isinstance(muted, bool):
        raise BadRequest("muted must be true or false.")
    membership = _membership_for_update(user=user, conversation_id=conversation_id)
    if membership.muted != muted:
        membership.muted = muted
        membership.save(update_fields=["muted"])
    return membership
