"""How a value of each kind is read and checked (settings.Kind).

A reader gets the value as written (YAML, or an environment string), its setting, and `problem`, which
records a problem under the value's key path (`problem(message)`, or `problem(message, "sub")` for a key
inside the value). A bad value is recorded and replaced by a placeholder, so that
checking goes on and every problem of a file is reported at once.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from dingdifyd.config.secret import redact_url
from dingdifyd.config.settings import DIFY_CONTEXT_INPUTS, Kind, Setting
from dingdifyd.paths import parse_listen

Problem = Callable[..., None]  # (message: str, sub: str = "") -> None
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_UNSET = ("", "null", "None")
_OFF = ("off", "false", "no")


def read(setting: Setting, value: Any, problem: Problem) -> Any:
    """The checked value of `setting` as written (`value`)."""
    if setting.optional and is_unset(value):
        return None
    return READERS[setting.kind](value, setting, problem)


def is_unset(value: Any) -> bool:
    return value is None or str(value).strip() in _UNSET


def from_env(text: str) -> str:
    """Environment values are strings; `.env` files often quote them."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text


def bound(limit: float) -> str:
    """A range's end as people write it: 1000000, not 1e+06; 0.1 as 0.1."""
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


def _text(value: Any, setting: Setting, problem: Problem) -> str:
    if value is None or str(value).strip() == "" or isinstance(value, dict | list):
        problem("missing" if value in (None, "") else "must be a string")
        return ""
    return str(value).strip()


def _free_text(value: Any, setting: Setting, problem: Problem) -> str:
    """Free text that may be empty (e.g. a reply to switch off with "")."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        problem("must be a string")
        return ""
    return str(value).strip()


def _boolean(value: Any, setting: Setting, problem: Problem) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text not in _FALSE:
        problem(f"{value!r} is not true or false")
    return False


def _choice(value: Any, setting: Setting, problem: Problem) -> str:
    """One of the setting's choices, compared in their case (`log_level`'s are upper-case, the others lower)."""
    allowed = setting.choices
    fallback = setting.default if setting.default is not None else allowed[0]
    if value is None or value == "":
        if setting.required:
            problem(f"missing (one of: {', '.join(allowed)})")
        return str(fallback)
    text = str(value).strip()
    text = text.upper() if all(choice.isupper() for choice in allowed) else text.lower()
    if text not in allowed:
        problem(f"{value!r} is not one of: {', '.join(allowed)}")
        return str(fallback)
    return text


def _number(value: Any, setting: Setting, problem: Problem) -> float:
    """A number within the setting's limits (inclusive). NaN and infinity are never within."""
    assert setting.limits is not None, f"{setting.key}: a number needs limits"
    minimum, maximum = setting.limits
    whole = setting.kind is Kind.WHOLE
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        problem(f"{value!r} is not a number")
        return minimum
    kind = "a whole number" if whole else "a number"
    in_range = math.isfinite(number) and minimum <= number <= maximum
    if isinstance(value, bool) or not in_range or (whole and not number.is_integer()):
        problem(f"{value!r} must be {kind} from {bound(minimum)} to {bound(maximum)}")
        return minimum
    return number


def _whole(value: Any, setting: Setting, problem: Problem) -> int:
    return int(_number(value, setting, problem))


def _url(value: Any, setting: Setting, problem: Problem) -> str:
    text = str(value or "").strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        problem(f"{value!r} is not an http(s) URL")
    return text


def _store(value: Any, setting: Setting, problem: Problem) -> str:
    text = str(value or "").strip()
    if text != "disk" and not text.startswith(("redis://", "rediss://", "unix://")):
        problem(f"{redact_url(text)!r} must be 'disk' or a redis:// URL")
    elif text != "disk" and importlib.util.find_spec("redis") is None:
        problem("a redis store needs the redis package: pip install 'dingdifyd[redis]'")
    return text


def _ids(value: Any, setting: Setting, problem: Problem) -> tuple[str, ...] | None:
    """A list of ids, or a string of them separated by commas or spaces; null: the default."""
    default: tuple[str, ...] | None = setting.default
    if value is None:
        return default
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, tuple):  # a built-in default
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        problem("must be a list of ids")
        return default
    return tuple(str(v) for v in value)


def _context_inputs(value: Any, setting: Setting, problem: Problem) -> dict[str, str]:
    """`dify_inputs`: which Dify variable gets which piece of DingTalk context; null or "" switches one off.
    Keys not given keep their defaults."""
    mapping = dict(DIFY_CONTEXT_INPUTS)
    if value is None:
        return mapping
    if not isinstance(value, dict):
        problem(f"must be a mapping of {', '.join(DIFY_CONTEXT_INPUTS)} to variable names")
        return mapping
    for name, variable in value.items():
        if name not in DIFY_CONTEXT_INPUTS:
            problem(f"unknown; one of: {', '.join(DIFY_CONTEXT_INPUTS)}", name)
        elif variable is None or str(variable).strip() == "":
            mapping.pop(name, None)
        elif isinstance(variable, dict | list):
            problem("must be a variable name", name)
        else:
            mapping[name] = str(variable).strip()
    return mapping


def _listen_address(value: Any, setting: Setting, problem: Problem) -> str | None:
    """`HOST:PORT`, `[IPV6]:PORT` or `unix:/PATH`; none (the default): off."""
    if is_unset(value) or str(value).strip().lower() in _OFF:
        return None
    text = str(value).strip()
    try:
        parse_listen(text)  # the one parser, also used to bind
    except ValueError as exc:
        problem(f"{value!r}: {exc}")
    return text


def _socket_path(value: Any, setting: Setting, problem: Problem) -> str | None:
    if is_unset(value):
        return None
    text = str(value).strip()
    if text != "off" and not text.startswith("/"):
        problem(f"{value!r} must be an absolute path, or off")
    return text


def _ignored(value: Any, setting: Setting, problem: Problem) -> None:
    return None


READERS: dict[Kind, Callable[[Any, Setting, Problem], Any]] = {
    Kind.TEXT: _text,
    Kind.FREE_TEXT: _free_text,
    Kind.BOOL: _boolean,
    Kind.CHOICE: _choice,
    Kind.NUMBER: _number,
    Kind.WHOLE: _whole,
    Kind.URL: _url,
    Kind.STORE: _store,
    Kind.IDS: _ids,
    Kind.INPUTS: _context_inputs,
    Kind.LISTEN: _listen_address,
    Kind.SOCKET: _socket_path,
    Kind.IGNORED: _ignored,
}
