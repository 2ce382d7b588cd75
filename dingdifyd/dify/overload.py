"""Which Dify failures mean "Dify is not coping" (pure): they count against the circuit, and most of them, when
they come before any part of the answer, have the request tried once more after a short jittered pause.

A stock Dify whose database pool is exhausted answers 500 after its pool timeout (SQLAlchemy's "QueuePool
limit ... reached, connection timed out"), or stalls; a Dify restarting refuses or resets connections; a
proxy in front of it answers 502/503/504. A 4xx, a conversation not found, a refused key or an error event
inside a running stream (the model provider failed) are answers of a Dify that copes.

This is narrower than `PeerError.retryable` (worth asking again later): a rate limit, and the refusals of our
own circuit and queue, are worth another try later but say nothing of whether Dify copes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from dingdifyd.errors import (
    DifyAuthError,
    DifyError,
    DifyStreamCut,
    DifyTimeout,
    DifyTotalTimeout,
    DifyUnavailable,
)

RETRY_DELAY = (0.5, 1.5)  # seconds, drawn uniformly: a pause, and a spread so retries do not come in a burst
_POOL_EXHAUSTED = re.compile(r"QueuePool limit|connection timed out|too many connections|pool.*timeout", re.I)


def is_overload(error: BaseException) -> bool:
    """Dify failed as an overloaded or unreachable service does (a failure for the circuit)."""
    if isinstance(error, DifyAuthError | DifyTotalTimeout):
        return False
    if isinstance(error, DifyUnavailable | DifyTimeout | DifyStreamCut):
        return True
    if isinstance(error, DifyError):
        status = error.status or 0
        return status >= 500 or bool(_POOL_EXHAUSTED.search(str(error)))
    return False


def worth_retrying(error: BaseException) -> bool:
    """A failure before any part of the answer that one more try may get past (5xx, connection refused or
    reset, an exhausted pool). Not a timeout waiting for Dify's answer: that request may be running."""
    return is_overload(error) and not isinstance(error, DifyTimeout)


def retry_delay(rng: Callable[[], float] = random.random) -> float:
    low, high = RETRY_DELAY
    return low + (high - low) * rng()
