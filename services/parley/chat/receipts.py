"""Delivery and read receipts reported by the realtime service, persisted by the worker.

CONTRACT (the worker issue implements the bodies; the realtime service calls these):
- `await record_delivery(conversation_id=, user_id=, seq=)`: called after a `message`
  frame was written to a recipient's socket. Must be cheap and coalesced: a busy room
  must not cause one task per message per recipient.
- `await record_read(conversation_id=, user_id=, seq=)`: called for a WebSocket `read`
  frame. Once it returns, the read must survive this process dying.
Both end in `services.receipts_advance` run by a Celery task (idempotent, GREATEST).
"""

from __future__ import annotations

from asgiref.sync import sync_to_async

from parley.chat import services


async def record_delivery(*, conversation_id: int, user_id: int, seq: int) -> None:
    # Interim until the worker issue: apply directly (correct, not yet coalesced).
    await sync_to_async(services.receipts_advance, thread_sensitive=False)(
        conversation_id=conversation_id, user_id=user_id, delivered_seq=seq
    )


async def record_read(*, conversation_id: int, user_id: int, seq: int) -> None:
    await sync_to_async(services.receipts_advance, thread_sensitive=False)(
        conversation_id=conversation_id, user_id=user_id, delivered_seq=seq, read_seq=seq
    )
