"""The `store: redis://...` backend: one bot's state shared by the daemons of several hosts.

Several dingdifyd processes may serve the same DingTalk app (DingTalk hands each message to one of the app's
connections at random). With this store they share what must be shared:
- message claims: `SET NX EX`, atomic in Redis, so a redelivery landing on any host is answered once;
- conversations: the next message of a person continues their Dify conversation whichever host gets it;
- answers in flight: each record names the process that owns it, and each process holds a lease (a key
  with a TTL that it refreshes, see dingdifyd.worker.adoption). Only the answers of a process whose lease has
  expired (it crashed, or its host is gone) are adopted, each by exactly one other process (a compare-and-set
  in Lua). Host B therefore never resumes an answer host A is still streaming;
- pending human-input forms: a hash per chat (person -> JSON with its own forget time), so a person's answer
  finds their form whichever host gets it; the hash lives as long as its latest form.

Calls are synchronous, like the disk store's: the bridge claims a message before the frame is ACKed, and a
Redis round trip on a LAN is well under a millisecond. Every call goes through `_call` (bounded: 1 s socket
timeouts, no retries). What can degrade does when Redis is unreachable: conversations are not known,
counters and peers keep their last values. What matters raises StoreUnavailable instead, so that the caller
keeps it: a claim (the bridge then answers without shared state, `grants_claims_when_unreachable`: a
redelivery could be answered twice, though never into a second card), and recording or ending an answer in
flight (the bridge remembers the write and replays it once Redis is back, bridge/ledger.py). After a failure,
Redis is left alone for a few seconds, so an outage costs one timeout per few seconds, not one per call; the
lease renewal alone is always tried, since a lapsed lease lets other hosts adopt this one's answers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dingdifyd.config import redact_url, url_secrets
from dingdifyd.errors import ConfigError, StoreUnavailable
from dingdifyd.logs.setup import register_secret
from dingdifyd.store.base import MESSAGE_CLAIM_TTL, InFlight
from dingdifyd.store.slots import SLOT_LEASE, WAITING_TTL

log = logging.getLogger(__name__)

T = TypeVar("T")

LEASE_TTL = 30.0  # a process silent this long is gone: its answers in flight may be adopted
SOCKET_TIMEOUT = 1.0
RETRY_AFTER = 5.0  # after a failure, seconds during which Redis is not asked again

# The client decodes every reply (`decode_responses=True`), so replies are str; redis-py's types cannot know that
# (they say `bytes | str`), hence the few casts to str types below.

# Claim a message and, in the same step, record its answer in flight (with its owner): a crash between two
# writes cannot leave a claimed message that nobody answers.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
    if ARGV[3] ~= '' then
        redis.call('HSET', KEYS[2], ARGV[4], ARGV[3])
    end
    return 1
end
return 0
"""
# Adopt an in-flight record only if it is still exactly what the caller saw: of two hosts that find the
# same orphan at once, one wins.
_ADOPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
    return 1
end
return 0
"""
# Keep a person's form in the chat's hash; the hash lives at least until this form may be forgotten.
_SAVE_FORM = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""
# The Dify slot table (store/slots.py) in Redis, shared by every host: a sorted set of slots scored by when
# their lease ends, and one of the processes waiting, scored by since when (with their own expiries). Redis's
# clock decides the leases, so the hosts' clocks need not agree on them.
_SLOT_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
    redis.call('ZREM', KEYS[2], gone)
    redis.call('ZREM', KEYS[3], gone)
end
"""
_SLOT_TAKE = _SLOT_PRELUDE + """
local limit, since, owner, slot = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local lease, waiting_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local other = nil
local first = redis.call('ZRANGE', KEYS[2], 0, 1, 'WITHSCORES')
for i = 1, #first, 2 do
    if first[i] ~= owner then other = tonumber(first[i + 1]) break end
end
if redis.call('ZCARD', KEYS[1]) < limit and (other == nil or since <= other) then
    redis.call('ZADD', KEYS[1], now + lease, slot)
    redis.call('PEXPIRE', KEYS[1], lease)
    return 1
end
redis.call('ZADD', KEYS[2], since, owner)
redis.call('ZADD', KEYS[3], now + waiting_ttl, owner)
redis.call('PEXPIRE', KEYS[2], waiting_ttl)
redis.call('PEXPIRE', KEYS[3], waiting_ttl)
return 0
"""
_SLOT_RENEW = _SLOT_PRELUDE + """
local lease, waiting_ttl, owner, since = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
for i = 5, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
if #ARGV >= 5 then redis.call('PEXPIRE', KEYS[1], lease) end
if since ~= '' then
    redis.call('ZADD', KEYS[2], tonumber(since), owner)
    redis.call('ZADD', KEYS[3], now + waiting_ttl, owner)
    redis.call('PEXPIRE', KEYS[2], waiting_ttl)
    redis.call('PEXPIRE', KEYS[3], waiting_ttl)
end
return 1
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
    on_error: Callable[[], None] | None = None  # told of every failed call (the metrics' store errors)
    grants_claims_when_unreachable = True  # answer rather than stay silent while Redis is out of reach

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
        self.lease_renewed_at: float | None = None  # clock time of the last successful renewal
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
        self._claim = self._redis.register_script(_CLAIM)
        self._adopt = self._redis.register_script(_ADOPT)
        self._slot_take = self._redis.register_script(_SLOT_TAKE)
        self._slot_renew = self._redis.register_script(_SLOT_RENEW)
        self._incr = self._redis.register_script(_INCR)
        self._save_form = self._redis.register_script(_SAVE_FORM)
        if self._check_access():
            self.keep_alive()

    def _check_access(self) -> bool:
        """A wrong password or database is a configuration error; an unreachable server is an outage."""
        try:
            self._redis.ping()
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            raise ConfigError([f"store: {self.url} refused this bot: {exc}"]) from None
        except redis.RedisError as exc:
            self._fail("connecting", exc)
            return False
        log.info("store: %s (shared by every process serving this bot)", self.url)
        return True

    # --- the choke point ---------------------------------------------------------------------------------

    def _call(self, what: str, operation: Callable[[], T], fallback: T) -> T:
        """`operation`, or `fallback` when Redis cannot be reached (now, or recently)."""
        try:
            return self._must(what, operation)
        except StoreUnavailable:
            return fallback

    def _must(self, what: str, operation: Callable[[], T], *, even_if_down: bool = False) -> T:
        """`operation`; raises StoreUnavailable when Redis cannot be reached (now, or recently)."""
        if self._clock() < self._down_until and not even_if_down:
            raise StoreUnavailable(f"store {self.url}: {what}: unreachable")
        try:
            result = operation()
        except redis.RedisError as exc:
            self._fail(what, exc)
            raise StoreUnavailable(f"store {self.url}: {what}: {type(exc).__name__}") from None
        if self._down:
            self._down = False
            self._down_until = 0.0
            log.info("store %s is reachable again", self.url)
        return result

    def _fail(self, what: str, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error()
        self._down_until = self._clock() + self._retry_after
        if not self._down:
            self._down = True
            log.error(
                "store %s failed while %s (%s); answering without shared state (duplicates and lost context "
                "are possible) until it is back",
                self.url, what, type(exc).__name__,
            )  # fmt: skip

    # --- Store protocol ----------------------------------------------------------------------------------

    def claim_message(self, message_key: str, record: InFlight | None = None) -> bool:
        key = self._prefix + "msg:" + message_key
        value = self._encode(record, self.consumer_id) if record is not None else ""
        args: list[str | int] = [self.consumer_id, int(MESSAGE_CLAIM_TTL), value, message_key]
        return bool(self._must("claiming a message", lambda: self._claim([key, self._inflight], args)))

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
        self._must("recording an answer in flight", lambda: self._redis.hset(self._inflight, field, value))

    def end_answer(self, message_key: str) -> None:
        self._must("ending an answer in flight", lambda: self._redis.hdel(self._inflight, message_key))

    def unfinished_answers(self) -> list[InFlight]:
        """The answers in flight of processes whose lease has expired, each now adopted by this one."""
        raw: dict[str, str] = self._call("listing answers", lambda: self._hash(self._inflight), {})
        if not raw:
            return []
        decoded: dict[str, tuple[str, InFlight]] = {}
        for field, value in raw.items():
            parsed = self._decode(value)
            if parsed is None:
                log.warning("store: dropping an unreadable in-flight record")
                self._call("dropping a record", functools.partial(self._redis.hdel, self._inflight, field), None)
            elif parsed[0] != self.consumer_id:
                decoded[field] = parsed
        owners = sorted({owner for owner, _ in decoded.values()})
        alive = dict(zip(owners, self._owners_alive(owners), strict=True))
        adopted = []
        for field, (owner, record) in decoded.items():
            if alive[owner]:
                continue
            args = [field, raw[field], self._encode(record, self.consumer_id)]
            won = self._call("adopting an answer", functools.partial(self._adopt, [self._inflight], args), 0)
            if won == 1:
                log.info("adopted answer %s from %s, which is gone", record.message_key, owner)
                adopted.append(record)
        return adopted

    def incr(self, key: str, amount: int = 1, expire: float | None = None) -> int:
        """Add to a counter shared by every host (the DingTalk calls an app made today, this month); returns
        the new value, or 0 while Redis is unreachable."""
        args: list[str | int] = [amount, str(max(int(expire * 1000), 1)) if expire else ""]
        value = self._call("counting", lambda: self._incr([self._prefix + "count:" + key], args), 0)
        return int(value)

    def counter(self, key: str) -> int:
        value = self._call("reading a counter", lambda: self._redis.get(self._prefix + "count:" + key), None)
        try:
            return int(value) if value is not None else 0
        except ValueError:
            return 0

    def save_form(self, chat_key: str, person: str, record: dict[str, Any], forget_at: float) -> None:
        value = json.dumps({"forget_at": forget_at, "record": record})
        keep_ms = max(int((forget_at - time.time()) * 1000), 1)
        args: list[str | int] = [person, value, keep_ms]
        self._call("saving a form", lambda: self._save_form([self._forms_key(chat_key)], args), None)

    def forms_in_chat(self, chat_key: str) -> dict[str, dict[str, Any]]:
        raw: dict[str, str] = self._call("reading forms", lambda: self._hash(self._forms_key(chat_key)), {})
        now = time.time()
        forms: dict[str, dict[str, Any]] = {}
        for person, value in raw.items():
            try:
                entry = json.loads(value)
                forget_at, record = float(entry["forget_at"]), entry["record"]
            except (ValueError, KeyError, TypeError):
                continue
            if forget_at > now and isinstance(record, dict):
                forms[person] = record
            else:  # past its time (the hash lives as long as its latest form)
                self.forget_form(chat_key, person)
        return forms

    def forget_form(self, chat_key: str, person: str) -> None:
        key = self._forms_key(chat_key)
        self._call("forgetting a form", lambda: self._redis.hdel(key, person), None)

    def keep_alive(self) -> bool:
        """Renew this process's lease; a lapsed lease lets other processes adopt its answers. Tried even
        during an outage (it is the one call whose absence others act on); True when it was renewed."""
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": int(time.time())})
        lease_ms = max(int(self.lease_ttl * 1000), 1)
        started = self._clock()

        def renew() -> None:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._lease_key(self.consumer_id), info, px=lease_ms)
                pipe.sadd(self._consumers, self.consumer_id)
                pipe.execute()

        try:
            self._must("renewing this process's lease", renew, even_if_down=True)
        except StoreUnavailable:
            return False
        self.lease_renewed_at = started  # the lease runs from when the renewal was sent, at the latest
        return True

    def lease_expires_at(self) -> float | None:
        """Clock time by which the lease lapses unless renewed (others may then adopt this one's answers)."""
        return None if self.lease_renewed_at is None else self.lease_renewed_at + self.lease_ttl

    def take_new_identity(self) -> str:
        """Give up this process's identity (its lease could not be renewed in time): its answers in flight
        become adoptable once the old lease lapses, by any process, this one included. Returns the old id."""
        old, self.consumer_id = self.consumer_id, consumer_id()
        self.lease_renewed_at = None
        return old

    def peers(self) -> list[str]:
        """The other live processes serving this bot through this store (`host:pid:token`)."""
        members = self._call("listing peers", lambda: cast("set[str]", self._redis.smembers(self._consumers)), None)
        if members is None:
            return self._peers  # unreachable: as far as we know, nothing changed
        others = sorted(m for m in members if m != self.consumer_id)
        alive = self._owners_alive(others)
        gone = [m for m, live in zip(others, alive, strict=True) if not live]
        if gone:
            self._call("pruning peers", lambda: self._redis.srem(self._consumers, *gone), None)
        self._peers = [m for m, live in zip(others, alive, strict=True) if live]
        return self._peers

    def dify_slots(self) -> RedisSlots:
        """The Dify slot table, shared by every host on this Redis (and every bot: its keys name no bot)."""
        return RedisSlots(self)

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

    def _hash(self, key: str) -> dict[str, str]:
        return cast("dict[str, str]", self._redis.hgetall(key))  # decoded (see the casts above)

    def _lease_key(self, owner: str) -> str:
        return self._prefix + "lease:" + owner

    def _forms_key(self, chat_key: str) -> str:
        return self._prefix + "forms:" + chat_key

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
            fields = dict(obj["record"])
            fields["pending_sends"] = tuple(dict(send) for send in fields.get("pending_sends", ()))
            return str(obj["owner"]), InFlight(**fields)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None



class RedisSlots:
    """store/slots.py's SlotTable in Redis, through the store's choke point (StoreUnavailable when out of reach)."""

    def __init__(self, store: RedisStore, *, lease: float = SLOT_LEASE, waiting_ttl: float = WAITING_TTL):
        self._store = store
        self.owner = consumer_id()
        self.lease_ms = max(int(lease * 1000), 1)
        self.waiting_ttl_ms = max(int(waiting_ttl * 1000), 1)

    @staticmethod
    def _keys(base: str) -> list[str]:
        digest = hashlib.sha256(base.encode()).hexdigest()[:16]
        return [f"dingdifyd:dify:{digest}:slots", f"dingdifyd:dify:{digest}:waiting",
                f"dingdifyd:dify:{digest}:waiting-expiry"]  # fmt: skip

    def try_acquire(self, base: str, limit: int, since: float) -> str | None:
        slot = f"{self.owner}:{secrets.token_hex(6)}"
        args: list[str | int] = [limit, int(since * 1000), self.owner, slot, self.lease_ms, self.waiting_ttl_ms]
        store = self._store
        won = store._must("taking a Dify slot", lambda: store._slot_take(self._keys(base), args))
        return slot if won == 1 else None

    def renew(self, base: str, slot_ids: Sequence[str], waiting_since: float | None) -> None:
        since = "" if waiting_since is None else str(int(waiting_since * 1000))
        args: list[str | int] = [self.lease_ms, self.waiting_ttl_ms, self.owner, since, *slot_ids]
        store = self._store
        store._must("renewing Dify slots", lambda: store._slot_renew(self._keys(base), args))

    def release(self, base: str, slot_id: str) -> None:
        key = self._keys(base)[0]
        self._store._must("freeing a Dify slot", lambda: self._store._redis.zrem(key, slot_id))

    def stop_waiting(self, base: str) -> None:
        _, waiting, expiry = self._keys(base)

        def leave() -> None:
            with self._store._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(waiting, self.owner)
                pipe.zrem(expiry, self.owner)
                pipe.execute()

        self._store._must("leaving the Dify queue", leave)

    def close(self) -> None:
        pass  # the store's connection is the store's to close
