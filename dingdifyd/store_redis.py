"""The `store: redis://...` backend: one bot's state shared by the daemons of several hosts.

Several dingdifyd processes may serve the same DingTalk app (DingTalk hands each message to one of the app's
connections at random). With this store they share what must be shared:
- message claims: `SET NX EX`, atomic in Redis, so a redelivery landing on any host is answered once;
- conversations: the next message of a person continues their Dify conversation whichever host gets it;
- answers in flight: each record names the process that owns it, and each process holds a lease (a key
  with a TTL that it refreshes, see dingdifyd.adoption). Only the answers of a process whose lease has
  expired (it crashed, or its host is gone) are adopted, each by exactly one other process (a compare-and-set
  in Lua). Host B therefore never resumes an answer host A is still streaming.

Calls are synchronous, like the disk store's: the bridge claims a message before the frame is ACKed, and a
Redis round trip on a LAN is well under a millisecond. Every call goes through `_call`, which bounds it (1 s
socket timeouts, no retries) and, when Redis is unreachable, degrades instead of failing the answer: claims
are granted (a redelivery could then be answered twice, though never into a second card: the card id is
derived from the message), conversations are forgotten, in-flight records are skipped. After a failure,
Redis is left alone for a few seconds, so an outage costs one timeout per few seconds, not one per call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dingdifyd.config import redact_url, url_secrets
from dingdifyd.errors import ConfigError
from dingdifyd.logsetup import register_secret
from dingdifyd.store import MESSAGE_CLAIM_TTL, InFlight

log = logging.getLogger(__name__)

T = TypeVar("T")

LEASE_TTL = 30.0  # a process silent this long is gone: its answers in flight may be adopted
SOCKET_TIMEOUT = 1.0
RETRY_AFTER = 5.0  # after a failure, seconds during which Redis is not asked again

# Adopt an in-flight record only if it is still exactly what the caller saw: of two hosts that find the
# same orphan at once, one wins.
_ADOPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
    return 1
end
return 0
"""
# Add to a counter; give it its expiry on its first increment only (a day's count lives three days, say).
_INCR = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""


def consumer_id() -> str:
    """This process among all that serve the bot: host, pid, and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisStore:
    """The Store protocol on Redis; keys are `dingdifyd:<bot>:...`, so bots (and deployments with
    distinct bot names) may share one Redis database."""

    shared = True

    def __init__(
        self,
        url: str,
        bot_name: str,
        *,
        lease_ttl: float = LEASE_TTL,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = redact_url(url)
        for secret in url_secrets(url):
            register_secret(secret)  # whatever redis-py might ever say about its connection, never the password
        self.lease_ttl = lease_ttl
        self.consumer_id = consumer_id()
        self._retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._down = False
        self._prefix = f"dingdifyd:{bot_name}:"
        self._inflight = self._prefix + "inflight"
        self._consumers = self._prefix + "consumers"
        self._peers: list[str] = []
        try:
            self._redis = redis.Redis.from_url(
                url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0),  # redis-py retries 10 times with back-off by default
                decode_responses=True,
                encoding_errors="surrogatepass",
            )
        except ValueError as exc:
            raise ConfigError([f"store: {self.url} is not a usable Redis URL: {exc}"]) from None
        self._adopt = self._redis.register_script(_ADOPT)
        self._incr = self._redis.register_script(_INCR)
        self._check_access()
        self.keep_alive()

    def _check_access(self) -> None:
        """A wrong password or database is a configuration error; an unreachable server is an outage."""
        try:
            self._redis.ping()
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            raise ConfigError([f"store: {self.url} refused this bot: {exc}"]) from None
        except redis.RedisError as exc:
            self._fail("connecting", exc)
            return
        log.info("store: %s (shared by every process serving this bot)", self.url)

    # --- the choke point ---------------------------------------------------------------------------------

    def _call(self, what: str, operation: Callable[[], T], fallback: T) -> T:
        if self._clock() < self._down_until:
            return fallback
        try:
            result = operation()
        except redis.RedisError as exc:
            self._fail(what, exc)
            return fallback
        if self._down:
            self._down = False
            log.info("store %s is reachable again", self.url)
        return result

    def _fail(self, what: str, exc: Exception) -> None:
        self._down_until = self._clock() + self._retry_after
        if not self._down:
            self._down = True
            log.error(
                "store %s failed while %s (%s); answering without shared state (duplicates and lost context "
                "are possible) until it is back",
                self.url, what, type(exc).__name__,
            )  # fmt: skip

    # --- Store protocol ----------------------------------------------------------------------------------

    def claim_message(self, message_key: str) -> bool:
        key = self._prefix + "msg:" + message_key
        return bool(
            self._call(
                "claiming a message",
                lambda: self._redis.set(key, self.consumer_id, nx=True, ex=int(MESSAGE_CLAIM_TTL)),
                True,  # unreachable: answer rather than stay silent
            )
        )

    def get_conversation(self, session_key: str) -> str | None:
        key = self._prefix + "conv:" + session_key
        value = self._call("reading a conversation", lambda: self._redis.get(key), None)
        return value if isinstance(value, str) and value else None

    def set_conversation(self, session_key: str, conversation_id: str, ttl: float) -> None:
        key = self._prefix + "conv:" + session_key
        if ttl <= 0:  # `dify_conversation_remain_time: 0`: a new conversation with every message
            self._call("forgetting a conversation", lambda: self._redis.delete(key), None)
            return
        expiry_ms = max(int(ttl * 1000), 1)
        self._call("saving a conversation", lambda: self._redis.set(key, conversation_id, px=expiry_ms), None)

    def forget_conversation(self, session_key: str) -> None:
        key = self._prefix + "conv:" + session_key
        self._call("forgetting a conversation", lambda: self._redis.delete(key), None)

    def begin_answer(self, record: InFlight) -> None:
        value = self._encode(record, self.consumer_id)
        field = record.message_key
        self._call(
            "recording an answer in flight", lambda: self._redis.hset(self._inflight, field, value), None
        )

    def end_answer(self, message_key: str) -> None:
        self._call("ending an answer in flight", lambda: self._redis.hdel(self._inflight, message_key), None)

    def unfinished_answers(self) -> list[InFlight]:
        """The answers in flight of processes whose lease has expired, each now adopted by this one."""
        raw: dict[str, str] = self._call("listing answers", lambda: self._redis.hgetall(self._inflight), {})
        if not raw:
            return []
        decoded: dict[str, tuple[str, InFlight]] = {}
        for field, value in raw.items():
            parsed = self._decode(value)
            if parsed is None:
                log.warning("store: dropping an unreadable in-flight record")
                self._call("dropping a record", lambda f=field: self._redis.hdel(self._inflight, f), None)
            elif parsed[0] != self.consumer_id:
                decoded[field] = parsed
        owners = sorted({owner for owner, _ in decoded.values()})
        alive = dict(zip(owners, self._owners_alive(owners), strict=True))
        adopted = []
        for field, (owner, record) in decoded.items():
            if alive[owner]:
                continue
            args = [field, raw[field], self._encode(record, self.consumer_id)]
            won = self._call("adopting an answer", lambda args=args: self._adopt([self._inflight], args), 0)
            if won == 1:
                log.info("adopted answer %s from %s, which is gone", record.message_key, owner)
                adopted.append(record)
        return adopted

    def incr(self, key: str, amount: int = 1, expire: float | None = None) -> int:
        """Add to a counter shared by every host (the DingTalk calls an app made today, this month); returns
        the new value, or 0 while Redis is unreachable."""
        args = [amount, str(max(int(expire * 1000), 1)) if expire else ""]
        value = self._call("counting", lambda: self._incr([self._prefix + "count:" + key], args), 0)
        return int(value)

    def counter(self, key: str) -> int:
        value = self._call("reading a counter", lambda: self._redis.get(self._prefix + "count:" + key), None)
        try:
            return int(value) if value is not None else 0
        except ValueError:
            return 0

    def keep_alive(self) -> None:
        """Renew this process's lease; a lapsed lease lets other processes adopt its answers."""
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": int(time.time())})
        lease_ms = max(int(self.lease_ttl * 1000), 1)

        def renew() -> None:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._lease_key(self.consumer_id), info, px=lease_ms)
                pipe.sadd(self._consumers, self.consumer_id)
                pipe.execute()

        self._call("renewing this process's lease", renew, None)

    def peers(self) -> list[str]:
        """The other live processes serving this bot through this store (`host:pid:token`)."""
        members = self._call("listing peers", lambda: self._redis.smembers(self._consumers), None)
        if members is None:
            return self._peers  # unreachable: as far as we know, nothing changed
        others = sorted(m for m in members if m != self.consumer_id)
        alive = self._owners_alive(others)
        gone = [m for m, live in zip(others, alive, strict=True) if not live]
        if gone:
            self._call("pruning peers", lambda: self._redis.srem(self._consumers, *gone), None)
        self._peers = [m for m, live in zip(others, alive, strict=True) if live]
        return self._peers

    def close(self) -> None:
        # a graceful stop has ended its answers; whatever is left is adoptable at once
        def leave() -> None:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._lease_key(self.consumer_id))
                pipe.srem(self._consumers, self.consumer_id)
                pipe.execute()

        self._call("leaving", leave, None)
        self._redis.close()

    # --- helpers -----------------------------------------------------------------------------------------

    def _lease_key(self, owner: str) -> str:
        return self._prefix + "lease:" + owner

    def _owners_alive(self, owners: list[str]) -> list[bool]:
        if not owners:
            return []

        def check() -> list[bool]:
            with self._redis.pipeline(transaction=False) as pipe:
                for owner in owners:
                    pipe.exists(self._lease_key(owner))
                return [bool(n) for n in pipe.execute()]

        # unreachable: assume everyone is alive, so that nothing is adopted by mistake
        return self._call("checking leases", check, [True] * len(owners))

    @staticmethod
    def _encode(record: InFlight, owner: str) -> str:
        return json.dumps({"owner": owner, "record": dataclasses.asdict(record)})

    @staticmethod
    def _decode(value: str) -> tuple[str, InFlight] | None:
        try:
            obj = json.loads(value)
            return str(obj["owner"]), InFlight(**obj["record"])
        except (ValueError, KeyError, TypeError):
            return None

