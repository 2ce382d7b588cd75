"""What a person is told when an answer fails: the error's own short message, and Dify's reason when it is one
a person may read. Pure.

Dify's error texts are written for developers: a node's `[Errno 111] Connection refused`, a model provider's
message, a stack of pydantic lines. A few say plainly what is wrong with the request and name nothing internal:
a required input the app did not get (0.15 answers HTTP 400 with it, 1.x fails the run with it inside the
stream), a file Dify would not take. Only those are shown; everything else stays in the log.
"""

from __future__ import annotations

import re

from dingdifyd.errors import DifyError, PeerError

FAILED_WITH_REASON = "The AI app could not answer: {reason}"

MAX_REASON = 200
_SAFE_REASONS = (
    re.compile(r"^[\w.-]{1,64} is required in input form$"),
    re.compile(r"^[\w.-]{1,64} in input form must be (a string|less than \d+ characters|one of the following: .*)$"),
    re.compile(r"^Invalid upload file$"),
    re.compile(r"^Missing required inputs: [\w., -]{1,200}$"),
)


def safe_reason(message: str) -> str | None:
    """Dify's reason when a person may read it as it is, else None."""
    text = " ".join(message.split())
    if len(text) > MAX_REASON:
        return None
    return text if any(pattern.match(text) for pattern in _SAFE_REASONS) else None


def failure_note(exc: PeerError) -> str:
    """The note a failed answer ends with."""
    if isinstance(exc, DifyError):
        reason = safe_reason(str(exc))
        if reason is not None:
            return FAILED_WITH_REASON.format(reason=reason)
    return exc.user_message
