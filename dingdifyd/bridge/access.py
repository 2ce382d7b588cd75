"""Who the bot answers: the allow and deny lists of one bot, as a pure decision (docs/design.md#access).

- `deny_users` / `deny_groups` always win.
- 1:1 chats: everyone, or only `allow_users` when it is set.
- Groups: when `allow_groups` is set, only those groups, and there every member; otherwise the people
  `allow_users` lets in (everyone when it is not set).

So "the team group, plus the three admins in 1:1" is `allow_groups: [team]` with `allow_users: [a, b, c]`, and
"only these people, wherever they ask" is `allow_users` alone. A person is matched by staff id or by DingTalk's
encrypted sender id, whichever the list names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dingdifyd.config import BotConfig
from dingdifyd.models import IncomingMessage


def _ids(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


@dataclass(frozen=True)
class AccessPolicy:
    allow_users: frozenset[str] | None = None  # None: not restricted
    allow_groups: frozenset[str] | None = None
    deny_users: frozenset[str] = frozenset()
    deny_groups: frozenset[str] = frozenset()

    @classmethod
    def from_bot(cls, bot: BotConfig) -> AccessPolicy:
        return cls(
            allow_users=_ids(bot.access.allow_users),
            allow_groups=_ids(bot.access.allow_groups),
            deny_users=frozenset(bot.access.deny_users),
            deny_groups=frozenset(bot.access.deny_groups),
        )

    def refusal(self, message: IncomingMessage) -> str | None:
        """None when the message may be answered; else which rule refused it (for the log, never shown)."""
        person = {message.sender_staff_id, message.sender_id} - {""}
        if person & self.deny_users:
            return "sender in deny_users"
        if message.is_group:
            if message.conversation_id in self.deny_groups:
                return "group in deny_groups"
            if self.allow_groups is not None:
                return None if message.conversation_id in self.allow_groups else "group not in allow_groups"
        if self.allow_users is not None and not person & self.allow_users:
            return "sender not in allow_users"
        return None
