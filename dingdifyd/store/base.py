"""What one bot's durable state holds, whichever backend keeps it (store/disk.py, store/redis_store.py).

Records: conversations (session key -> Dify conversation id, with a sliding expiry), message claims (so a
redelivery is recognised even after a restart), answers in flight (so that a process that dies mid-answer is
followed by one that finishes it), counters (the DingTalk calls per day and month), pending human-input forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from dingdifyd.store.slots import SlotTable

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MESSAGE_CLAIM_TTL = 7 * 24 * 3600.0  # DingTalk redelivers within minutes; a week is generous and still bounded


@dataclass(frozen=True)
class InFlight:
    """An answer that was started and not finished: enough to finish it after a crash, and no more."""

    message_key: str
    message: dict[str, Any]  # IncomingMessage fields
    out_track_id: str
    attempts: int
    # the Dify run answering it, once its stream named it: a successor follows that run (Dify ≥ 1.14) instead of
    # asking again. Defaults, so that records of older versions still load.
    workflow_run_id: str = ""
    task_id: str = ""
    # the card (or the plain reply) shows the final answer: a successor must not ask Dify again, only send
    final_delivered: bool = False
    # what goes out after the card and has not yet: {"kind": "image" | "file", "target": media id or URL, "name"}
    pending_sends: tuple[dict[str, str], ...] = ()


class Store(Protocol):
    # True when several processes, on several hosts, use the store at once (redis): each then holds a lease
    # and adopts the answers of processes that are gone (dingdifyd.adoption). False: one process at a time.
    shared: bool
    # True: when the store cannot be reached, a message is answered all the same (without shared state; a
    # redelivery could then be answered twice). False: it is not taken, and DingTalk delivers it again.
    grants_claims_when_unreachable: bool

    def claim_message(self, message_key: str, record: InFlight | None = None) -> bool:
        """True the first time a message is seen (and, in the same transaction, `record` is kept as an answer
        in flight), False for a redelivery. Raises StoreUnavailable when it cannot tell."""
        ...

    def get_conversation(self, session_key: str) -> str | None: ...
    def set_conversation(self, session_key: str, conversation_id: str, ttl: float) -> None: ...
    def forget_conversation(self, session_key: str) -> None: ...

    def begin_answer(self, record: InFlight) -> None:
        """Keep (or replace) an answer in flight. Raises StoreUnavailable."""
        ...

    def end_answer(self, message_key: str) -> None:
        """Forget an answer in flight: it is finished. Raises StoreUnavailable."""
        ...

    def unfinished_answers(self) -> list[InFlight]: ...

    def dify_slots(self) -> SlotTable:
        """The table of answers in flight per Dify, shared with whoever shares this store's state."""
        ...

    def keep_alive(self) -> bool: ...
    def peers(self) -> list[str]: ...
    def incr(self, key: str, amount: int = 1, expire: float | None = None) -> int: ...
    def counter(self, key: str) -> int: ...
    def save_form(self, chat_key: str, person: str, record: dict[str, Any], forget_at: float) -> None: ...
    def forms_in_chat(self, chat_key: str) -> dict[str, dict[str, Any]]: ...
    def forget_form(self, chat_key: str, person: str) -> None: ...
    def close(self) -> None: ...
