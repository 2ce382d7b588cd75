"""The project's exception tree and the sysexits codes the commands map them to.

Adapters turn every transport failure into one of these, so that nothing above them
needs to know aiohttp, websockets or the DingTalk SDK.

    DingdifydError                  exit_code
    ├── ConfigError                 the problems, each named by its key path
    ├── StoreUnavailable
    └── PeerError                   status, code, retryable, rate_limited, brief(), user_message
        ├── DifyError               DifyAuthError, ConversationNotFound, DifyRateLimited (DifyQueueFull),
        │                           DifyTimeout (DifyTotalTimeout), DifyStreamCut, RunNotFollowable,
        │                           FormAnswerRefused, UnsupportedAppMode, DifyUnavailable, DifyOverloaded
        └── DingTalkError           DingTalkAuthError, DingTalkPermissionDenied, DingTalkRateLimited,
                                    DingTalkUnavailable, CardAlreadyExists,
                                    RegistrationError (RegistrationRefused, RegistrationExpired)
"""

from __future__ import annotations

from typing import ClassVar

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78


class DingdifydError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = EX_SOFTWARE


class ConfigError(DingdifydError):
    """The configuration is invalid. Carries every problem found, each named by its key path."""

    exit_code = EX_CONFIG

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class PeerError(DingdifydError):
    """A call to DingTalk or Dify failed: the HTTP `status` and the peer's error `code` when it answered (None
    when not). `user_message` is safe to show to the person chatting; `brief()` is the error's log line."""

    exit_code = EX_TEMPFAIL
    user_message = "The service did not answer. Please try again in a moment."
    # The peer said "slow down" (a QPS limit, 429): the caller waits before asking again, and asks again.
    rate_limited: ClassVar[bool] = False
    # Whether asking again later may succeed, when the class alone says (None: the HTTP status says).
    _retryable: ClassVar[bool | None] = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        self.status = status
        self.code = code
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        """Asking again later may succeed: a rate limit, a peer unreachable, busy or too slow, a 5xx answer.
        Not: refused credentials, a 4xx, an answer that says what is wrong with the request."""
        if self._retryable is not None:
            return self._retryable
        return self.rate_limited or (self.status or 0) >= 500

    def brief(self) -> str:
        """One line for a log: the class, the status and code when known, the message (no secret: adapters
        never put one in an error)."""
        details = " ".join(str(x) for x in (self.status, self.code) if x)
        return f"{type(self).__name__}{f' {details}' if details else ''}: {self}"


def brief(exc: BaseException) -> str:
    """One line on any failure a call to a peer may end with: a PeerError's `brief()`, "no answer in time" for a
    timeout, else the class and its message (a bug)."""
    if isinstance(exc, PeerError):
        return exc.brief()
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class StoreUnavailable(DingdifydError):
    """The bot's store could not be written (or read): a full or read-only disk, a locked database, Redis
    out of reach. What was asked did not happen; the caller keeps it (or does not ACK the message)."""

    exit_code = EX_TEMPFAIL


# --- Dify -------------------------------------------------------------------------------------------------


class DifyError(PeerError):
    """Dify answered with an error, before or inside the stream."""

    user_message = "The AI service reported an error. Please try again."


class DifyAuthError(DifyError):
    """401/403: the app API key is wrong or the app is disabled. Retrying will not help."""

    exit_code = EX_CONFIG
    user_message = "This bot is not set up correctly (its Dify API key was refused). Please tell its admin."
    _retryable = False


class ConversationNotFound(DifyError):
    """404 "Conversation Not Exists": the stored conversation id is no longer valid."""


class DifyRateLimited(DifyError):
    user_message = "The AI service is busy right now. Please try again in a minute."
    rate_limited = True


class DifyTimeout(DifyError):
    user_message = "The AI service took too long to answer. Please try again."
    _retryable = True


class DifyTotalTimeout(DifyTimeout):
    """The whole answer took longer than `dify_total_timeout`, however lively the stream was."""

    user_message = "The AI app took longer than this bot allows for one answer. Please try a smaller request."
    _retryable = False  # the same question would take as long again


class DifyStreamCut(DifyError):
    """The stream ended without a terminal event (proxy timeout, worker crash)."""

    user_message = "The answer was cut off by the AI service. Please try again."
    _retryable = True


class RunNotFollowable(DifyError):
    """A Dify run cannot be followed on its events route (Dify ≥ 1.14): the route is missing or refused, or
    does not know the run (another user's, or gone). Nothing of the run was read."""


class FormAnswerRefused(DifyError):
    """Dify refused an answer to a human-input form: `kind` is submitted (answered already), expired, gone (no
    such form any more), or invalid (Dify's reason in the message)."""

    def __init__(self, kind: str, message: str, *, status: int | None = None, code: str | None = None):
        self.kind = kind
        super().__init__(message, status=status, code=code)


class UnsupportedAppMode(DifyError):
    """The key belongs to a 1.x app no chat can use (`channel`, `rag-pipeline`)."""

    exit_code = EX_CONFIG
    user_message = "This bot is not set up correctly (its Dify app cannot answer chat messages). Please tell its admin."

    def __init__(self, mode: str):
        self.mode = mode
        super().__init__(f"the Dify app is a {mode} app, which cannot answer chat messages", code="unsupported_mode")


class DifyUnavailable(DifyError):
    """Connection refused, DNS failure, TLS error: Dify could not be reached at all."""

    user_message = "The AI service cannot be reached right now. Please try again later."
    _retryable = True


class DifyOverloaded(DifyError):
    """Most recent requests to this Dify failed (its circuit is open): it is not asked, for now."""

    user_message = "The AI service is having trouble right now, so I did not ask it. Please try again in a minute."
    _retryable = True


class DifyQueueFull(DifyRateLimited):
    """The answer waited for its turn at Dify longer than dingdifyd lets an answer wait."""

    user_message = "Too many questions are waiting for the AI service right now. Please try again in a few minutes."


# --- DingTalk ---------------------------------------------------------------------------------------------


class DingTalkError(PeerError):
    """A call to DingTalk failed: the OpenAPI, the Stream gateway, or the QR-code app registration."""


class DingTalkAuthError(DingTalkError):
    """The app's client id / secret were refused. Retrying will not help."""

    exit_code = EX_CONFIG
    _retryable = False


class DingTalkPermissionDenied(DingTalkError):
    """403 AccessTokenPermissionDenied: the app lacks a permission (scope) the call needs."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 required_scopes: tuple[str, ...] = ()):
        super().__init__(message, status=status, code=code)
        self.required_scopes = required_scopes


class DingTalkRateLimited(DingTalkError):
    """403 Forbidden.AccessDenied.QpsLimit* or 429: slow down and retry."""

    rate_limited = True


class DingTalkUnavailable(DingTalkError):
    """Connection failure or timeout talking to DingTalk."""

    _retryable = True


class CardAlreadyExists(DingTalkError):
    """Creating a card found it created already: by an earlier process (a resumed answer), or by an earlier
    attempt of this one that seemed to fail."""


class RegistrationError(DingTalkError):
    """The QR-code app registration cannot go on; `str()` says what happened, for the admin."""


class RegistrationRefused(RegistrationError):
    """FAIL: the scan was refused (by the admin, or by DingTalk, e.g. an account in no organisation)."""


class RegistrationExpired(RegistrationError):
    """EXPIRED, or nobody scanned in time."""
