"""The error tree: every peer error carries its HTTP status and error code, says whether asking again later may
succeed, and has one log line (`brief`)."""

from __future__ import annotations

import pytest

from dingdifyd.errors import (
    CardAlreadyExists,
    ConversationNotFound,
    DifyAuthError,
    DifyError,
    DifyOverloaded,
    DifyQueueFull,
    DifyRateLimited,
    DifyStreamCut,
    DifyTimeout,
    DifyTotalTimeout,
    DifyUnavailable,
    DingTalkAuthError,
    DingTalkError,
    DingTalkPermissionDenied,
    DingTalkRateLimited,
    DingTalkUnavailable,
    FormAnswerRefused,
    PeerError,
    RegistrationError,
    RegistrationExpired,
    UnsupportedAppMode,
    brief,
)

QPS = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"


@pytest.mark.parametrize(
    ("error", "retryable", "rate_limited"),
    [
        (DingTalkRateLimited("qps", status=403, code=QPS), True, True),
        (DingTalkRateLimited("too many", status=429), True, True),
        (DingTalkUnavailable("no answer within 10s"), True, False),
        (DingTalkError("busy", status=500, code="system.busy"), True, False),
        (DingTalkError("bad", status=400, code="param.invalid"), False, False),
        (DingTalkPermissionDenied("denied", status=403, code="Forbidden.AccessDenied.AccessTokenPermissionDenied"),
         False, False),
        (DingTalkAuthError("refused", status=500), False, False),  # the class says: never worth retrying
        (CardAlreadyExists("exists", status=400, code="param.cardAlreadyExist"), False, False),
        (RegistrationExpired("the code expired"), False, False),
        (DifyRateLimited("too many", status=429, code="too_many_requests"), True, True),
        (DifyQueueFull("waited 60 s"), True, True),
        (DifyUnavailable("connection refused"), True, False),
        (DifyTimeout("no first byte within 60 s"), True, False),
        (DifyStreamCut("cut off"), True, False),
        (DifyOverloaded("circuit open"), True, False),
        (DifyError("internal", status=502), True, False),
        (DifyTotalTimeout("took longer than 1200 s"), False, False),
        (DifyAuthError("invalid key", status=401, code="unauthorized"), False, False),
        (ConversationNotFound("Conversation Not Exists.", status=404, code="not_found"), False, False),
        (DifyError("invalid_param", status=400, code="invalid_param"), False, False),
        (FormAnswerRefused("expired", "the form expired", status=400), False, False),
        (UnsupportedAppMode("channel"), False, False),
        (PeerError("a data: URL that is not base64"), False, False),
    ],
)
def test_each_peer_error_says_whether_asking_again_may_help(error: PeerError, retryable: bool, rate_limited: bool):
    assert (error.retryable, error.rate_limited) == (retryable, rate_limited)


def test_status_and_code_are_on_every_peer_error():
    for error in (PeerError("x"), DifyError("x"), DingTalkError("x"), RegistrationError("x"), DifyTimeout("x")):
        assert error.status is None and error.code is None
    assert UnsupportedAppMode("channel").code == "unsupported_mode"
    denied = DingTalkPermissionDenied("denied", status=403, code="c", required_scopes=("Card.Instance.Write",))
    assert (denied.status, denied.code, denied.required_scopes) == (403, "c", ("Card.Instance.Write",))


def test_brief_names_the_class_the_status_the_code_and_the_message():
    assert DingTalkRateLimited("slow down", status=403, code=QPS).brief() == f"DingTalkRateLimited 403 {QPS}: slow down"
    assert DifyError("internal", status=500).brief() == "DifyError 500: internal"
    assert DifyStreamCut("the stream ended").brief() == "DifyStreamCut: the stream ended"


def test_brief_of_any_failure_is_one_line():
    assert brief(DifyError("refused", status=400, code="invalid_param")) == "DifyError 400 invalid_param: refused"
    assert brief(TimeoutError()) == "no answer in time"
    assert brief(RuntimeError("a bug")) == "RuntimeError: a bug"
    assert brief(KeyError()) == "KeyError"
