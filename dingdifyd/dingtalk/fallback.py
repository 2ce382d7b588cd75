"""The fallback ladder's memory and its words: why a way of answering failed, and what the admin can do.

The ladder (replies.py): the configured card template → DingTalk's built-in AI card template → a markdown
reply through the message's sessionWebhook → the same through the robot send API. This module is pure apart
from logging: `hint_for` maps a DingTalk error to a fix hint, `CauseLog` logs each cause once per process at
WARNING (afterwards at DEBUG, so fifty failing answers make one line, not fifty), and `TemplateMemory`
remembers for a while that a rung is broken, so that every answer does not pay for the same refusal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dingdifyd.errors import DingTalkPermissionDenied, PeerError, brief

log = logging.getLogger(__name__)

CARD_SCOPES = "Card.Streaming.Write / Card.Instance.Write"
TEMPLATE_CODES = frozenset({"param.templateNotExist", "param.templateUnpublished"})
# Refusals that no card template can avoid: the ladder goes straight to a plain reply for a while.
CARDS_UNUSABLE_CODES = frozenset({
    "Forbidden.AccessDenied.AccessTokenPermissionDenied",
    "Forbidden.AccessDenied.ApiCountLimitForOrg",
})

_HINTS: tuple[tuple[str, str], ...] = (
    # (code or code prefix, hint); the first match wins
    ("Forbidden.AccessDenied.AccessTokenPermissionDenied",
     "grant {scopes} in the DingTalk developer console (the app's Permissions page), then publish the app"),
    ("param.templateNotExist",
     "check dingtalk_ai_card_template_id (the template id ends in .schema), or remove it to use the built-in "
     "AI card template"),
    ("param.templateUnpublished",
     "publish the template in the DingTalk card platform, or remove dingtalk_ai_card_template_id"),
    ("Forbidden.AccessDenied.ApiCountLimitForOrg",
     "the organisation's monthly DingTalk API quota is used up: upgrade the DingTalk edition, or set "
     "dingtalk_api_monthly_budget so that card updates are spread over the month"),
    ("Forbidden.AccessDenied.QpsLimit",
     "another program or host uses this app's call rate too: lower dingtalk_card_qps"),
    ("param.openSpaceIdInvalid",
     "the sender has no staff id (an external contact?): cards can only go to members of the organisation"),
    ("param.stream.content", "the answer is longer than a card takes"),
    ("invalidParameter.robotCode.auth",
     "the robot does not belong to this app: check dingtalk_app_client_id and that the robot is published"),
    ("300001", "the conversation's sessionWebhook is unknown to DingTalk"),
    ("300002", "the conversation's sessionWebhook expired (an answer took longer than its lifetime)"),
)


def hint_for(code: str | None, *, status: int | None = None, required_scopes: tuple[str, ...] = ()) -> str:
    """What an admin can do about a DingTalk error code (empty when there is nothing to suggest)."""
    text = code or ""
    for prefix, hint in _HINTS:
        if text.startswith(prefix):
            return hint.format(scopes=" / ".join(required_scopes) if required_scopes else CARD_SCOPES)
    if status is not None and status >= 500:
        return "DingTalk is busy or failing; nothing to fix here if it passes"
    if status is None and not text:
        return "DingTalk could not be reached: check the network path to dingtalk_api_base"
    return ""


def describe(exc: BaseException) -> tuple[str, str]:
    """(the cause, as a short stable key for `CauseLog`; the hint) of a DingTalk error."""
    code, status = (exc.code, exc.status) if isinstance(exc, PeerError) else (None, None)
    scopes = exc.required_scopes if isinstance(exc, DingTalkPermissionDenied) else ()
    cause = str(code or status or type(exc).__name__)
    return cause, hint_for(code, status=status, required_scopes=scopes)


class CauseLog:
    """Logs each (stage, cause) once per process at WARNING with its hint; repeats go to DEBUG."""

    def __init__(self, logger: logging.Logger = log):
        self._log = logger
        self._seen: set[tuple[str, str]] = set()

    def failed(self, stage: str, exc: BaseException, then: str) -> bool:
        """`stage` failed with `exc`; `then` says what happens instead. True when this was the first time."""
        cause, hint = describe(exc)
        return self.note(stage, cause, f"{stage} failed ({brief(exc)}); {then}", hint)

    def note(self, stage: str, cause: str, message: str, hint: str = "") -> bool:
        first = (stage, cause) not in self._seen
        self._seen.add((stage, cause))
        text = f"{message}. Fix: {hint}" if hint else message
        self._log.log(logging.WARNING if first else logging.DEBUG, "%s", text)
        return first


class TemplateMemory:
    """Which rung a new card starts on: the configured template, the built-in one, or none (plain replies).

    A rung refused for good is skipped for `cooldown` seconds, then tried again, so that a template published
    or a permission granted meanwhile is picked up without a restart.
    """

    CONFIGURED = "configured"
    BUILTIN = "builtin"
    NONE = "none"

    def __init__(self, template_id: str | None, *, cooldown: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.template_id = template_id
        self.cooldown = cooldown
        self._clock = clock
        self._broken_until: dict[str, float] = {}

    def _broken(self, rung: str) -> bool:
        return self._clock() < self._broken_until.get(rung, float("-inf"))

    def rungs(self) -> list[str]:
        """The card rungs a new answer tries, in order; empty: answer with a plain reply."""
        if self._broken(self.NONE):
            return []
        rungs = [self.CONFIGURED] if self.template_id and not self._broken(self.CONFIGURED) else []
        return [*rungs, self.BUILTIN]

    def refused(self, rung: str, code: str | None) -> str | None:
        """A card on `rung` was refused with `code`: returns the next rung to try for this answer, or None."""
        until = self._clock() + self.cooldown
        if code in CARDS_UNUSABLE_CODES:
            self._broken_until[self.NONE] = until
            return None
        if rung == self.CONFIGURED and code in TEMPLATE_CODES:
            self._broken_until[self.CONFIGURED] = until
            return self.BUILTIN
        return None
