"""`RedisStore`: sessions and turn locks in Redis, shared by every replica behind a load balancer.

Every key starts with `prefix` (`chatstream:session:<id>`, `chatstream:lock:<id>`), so one Redis
can serve several deployments. Sessions are JSON strings whose TTL is refreshed on every read
(`GETEX`). A turn lock is `SET NX PX` with a random token and a short TTL (`lock_ttl`, 3 s) that the
running turn refreshes every third of it, so a replica that dies mid-turn (SIGKILL, a lost node)
frees its conversations within `lock_ttl` seconds, and the 409 meanwhile says `Retry-After`;
release and refresh check the token in one Lua script, so nobody frees a lock it lost. A turn
whose client left marks its lock as ending (`chatstream:ending:<id>` holds its token), so the
next turn of that conversation waits for it instead of being refused.

A lock must never outlive the request that took it, even when Redis stalls. Two things see to it.
Taking the lock carries the caller's deadline on Redis's clock, from a lower bound of the offset
between the clocks (a round trip's worth early, never late): a `SET NX` that Redis runs after its
caller gave up (503) takes nothing. And every token whose lock call or release went unanswered is
kept as an orphan, released (compare-and-delete) before this store's next load or lock: a
`SET NX` that ran just before the deadline but whose answer came too late, or a release Redis
never received, frees its conversation as soon as Redis answers again, not after the lock's TTL.

Every call is bounded by `timeout`: a Redis that is down or stalled turns into
`SessionStoreUnavailable` (503) quickly instead of a hung request, and the next call simply
tries again, so service resumes by itself when Redis is back. redis-py's asyncio client makes
this store asyncio-only (uvicorn, hypercorn's asyncio worker).
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from chatstream_asgi.errors import SessionStoreUnavailable
from chatstream_asgi.sessions.store import DEFAULT_MAX_SESSION_BYTES, stored_text

if TYPE_CHECKING:
    import redis.asyncio

# Take the lock only while the request that asks is still waiting for the answer: a `SET NX`
# queued behind a stalled Redis would otherwise run after the caller gave up (503) and hold the
# conversation for the lock's whole TTL with a token nobody has. ARGV[3] is the caller's
# deadline on Redis's own clock, in milliseconds.
_LOCK_UNTIL_DEADLINE = """
local now = redis.call('time')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[3]) then return -1 end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
#: Seconds a turn lock lives unless the running turn refreshes it (it does, every third of that):
#: how long a replica that died mid-turn (SIGKILL, a lost node) keeps its conversations locked.
DEFAULT_LOCK_TTL = 3.0
# Seconds between measurements of the offset between Redis's clock and ours.
_CLOCK_CHECK_EVERY = 300.0
# Orphaned lock tokens kept for release at most: the oldest go first (their locks expire anyway).
_MAX_ORPHANS = 10_000
_UNLOCK_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1], KEYS[2]) end
return 0
"""
_MARK_ENDING_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return 0
"""
_ENDING = """
local holder = redis.call('get', KEYS[1])
if holder and holder == redis.call('get', KEYS[2]) then return 1 end
return 0
"""
_EXTEND_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


class RedisStore:
    """Session store in Redis (install with `pip install "chatstream-asgi[redis]"`).

    `url` is any URL redis-py takes: `redis://`, `rediss://` (TLS; certificate options go in its
    query, e.g. `?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem`) or `unix://`. For Sentinel,
    pass `client=` a `redis.asyncio.Redis` of your own (`Sentinel(...).master_for(name,
    decode_responses=True)`): it follows a failover, and `url` then only names the store in
    messages. Redis Cluster is not supported: the turn lock's scripts read two keys at once.
    """

    shared: bool = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "chatstream:",
        ttl: float = 86400,
        timeout: float = 2.0,
        max_turns: int | None = 100,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        max_session_bytes: int | None = DEFAULT_MAX_SESSION_BYTES,
        client: redis.asyncio.Redis | None = None,
    ) -> None:
        try:
            import redis.asyncio as redis_asyncio
            from redis.exceptions import RedisError
        except ImportError as error:
            raise ImportError('RedisStore needs redis-py: pip install "chatstream-asgi[redis]"') from error
        if ttl <= 0 or timeout <= 0 or lock_ttl <= 0:
            raise ValueError("ttl, timeout and lock_ttl must be positive seconds")
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be at least 1 (or None), not {max_turns}")
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = timeout
        self.max_turns = max_turns
        self.max_session_bytes = max_session_bytes
        self.lock_ttl: float | None = lock_ttl
        self._lock_ttl_ms = int(lock_ttl * 1000)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        if client is None:
            client = redis_asyncio.Redis.from_url(
                url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        elif not client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore's client= must be made with decode_responses=True")
        self._redis = client
        #: Called after every call to Redis with its seconds and whether it failed (the metrics).
        self.observer: Callable[[float, bool], None] | None = None
        self._lock = self._redis.register_script(_LOCK_UNTIL_DEADLINE)
        self._unlock = self._redis.register_script(_UNLOCK_IF_OWNER)
        self._clock_offset_ms: float | None = None  # Redis's clock minus ours
        self._clock_measured = 0.0
        # (session id, token) of locks no request holds any more, to release: see the module docstring.
        self._orphans: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._extend = self._redis.register_script(_EXTEND_IF_OWNER)
        self._mark_ending = self._redis.register_script(_MARK_ENDING_IF_OWNER)
        self._ending = self._redis.register_script(_ENDING)

    async def load(self, session_id: str) -> dict[str, Any] | None:
        await self._release_orphans()  # any request of this replica frees them, not only a new turn
        text = await self._call(self._redis.getex(self._session_key(session_id), ex=int(self.ttl)))
        if text is None:
            return None
        data: dict[str, Any] = json.loads(text)
        return data

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        text = stored_text(data, self.max_turns, self.max_session_bytes)
        await self._call(self._redis.set(self._session_key(session_id), text, ex=int(self.ttl)))

    async def delete(self, session_id: str) -> None:
        await self._call(self._redis.delete(self._session_key(session_id)))

    async def lock_turn(self, session_id: str) -> str | None:
        await self._release_orphans()
        token = secrets.token_hex(16)
        offset = await self._clock_offset()
        deadline_ms = int(time.time() * 1000 + offset + self.timeout * 1000)
        key = self._lock_key(session_id)
        try:
            taken = await self._call(self._lock(keys=[key], args=[token, self._lock_ttl_ms, deadline_ms]))
        except BaseException:  # unanswered (a stall, a cancel): Redis may have run it, or run it yet
            self._orphan(session_id, token)
            raise
        if taken == -1:  # Redis ran it after the deadline: this caller is still here, Redis was slow
            raise SessionStoreUnavailable(f"the session store at {self.safe_url()} answered after the deadline")
        return token if taken == 1 else None

    async def _clock_offset(self) -> float:
        """A lower bound of Redis's clock minus this process's, in ms (measured once, then every
        few minutes), so that a lock's deadline on Redis's clock errs early, never late.

        Redis read its clock at some moment before our reading `after` arrived, so the offset is
        at least its time minus `after`; of two readings the tighter counts, since the first may
        include opening a connection (under load, a long wait of its own).
        """
        if self._clock_offset_ms is None or time.monotonic() - self._clock_measured > _CLOCK_CHECK_EVERY:
            bounds = []
            for _ in range(2):
                seconds, microseconds = await self._call(self._redis.time())
                after = time.time()
                bounds.append((seconds + microseconds / 1e6 - after) * 1000)
            self._clock_offset_ms = max(bounds)
            self._clock_measured = time.monotonic()
        return self._clock_offset_ms

    async def refresh_turn(self, session_id: str, token: str) -> None:
        # Refreshes come every third of the TTL; one that waits longer than that for Redis gives
        # up, so that the next still comes while the lock lives (a lapse needs two in a row).
        refresh = self._extend(keys=[self._lock_key(session_id)], args=[token, self._lock_ttl_ms])
        await self._call(refresh, timeout=min(self.timeout, self._lock_ttl_ms / 3000))

    async def unlock_turn(self, session_id: str, token: str) -> None:
        try:
            await self._call(self._unlock(keys=self._lock_keys(session_id), args=[token]))
        except BaseException:  # released with the orphans once Redis answers again
            self._orphan(session_id, token)
            raise

    def _orphan(self, session_id: str, token: str) -> None:
        """Remember a token whose lock may be held in Redis though no request holds it any more."""
        self._orphans[session_id, token] = time.monotonic()
        while len(self._orphans) > _MAX_ORPHANS:
            self._orphans.popitem(last=False)

    async def _release_orphans(self) -> None:
        """Release every orphaned token's lock (if it still holds one), in one round trip."""
        expired = time.monotonic() - 2 * self._lock_ttl_ms / 1000  # their locks have expired by now
        for orphan in [orphan for orphan, since in self._orphans.items() if since < expired]:
            del self._orphans[orphan]
        if not self._orphans:
            return
        orphans = list(self._orphans)
        async with self._redis.pipeline(transaction=False) as pipeline:  # given back even if Redis is slow
            for session_id, token in orphans:
                await self._unlock(keys=self._lock_keys(session_id), args=[token], client=pipeline)  # queued
            await self._call(pipeline.execute())
        for orphan in orphans:
            self._orphans.pop(orphan, None)

    async def mark_turn_ending(self, session_id: str, token: str) -> None:
        await self._call(self._mark_ending(keys=self._lock_keys(session_id), args=[token, self._lock_ttl_ms]))

    async def turn_ending(self, session_id: str) -> bool:
        return bool(await self._call(self._ending(keys=self._lock_keys(session_id))))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

    async def ping(self) -> None:
        """Check that Redis answers now (`/ready`): `SessionStoreUnavailable` if it does not."""
        await self._call(self._redis.ping())

    async def _call(self, operation: Any, timeout: float | None = None) -> Any:
        started = time.monotonic()
        failed = False
        try:
            with anyio.fail_after(self.timeout if timeout is None else timeout):
                return await operation
        except self._errors as error:
            failed = True
            raise SessionStoreUnavailable(
                f"the session store at {self.safe_url()} did not answer: {type(error).__name__}"
            ) from error
        finally:  # a call its request abandoned (the client left) is timed, not counted as failed
            if self.observer is not None:
                self.observer(time.monotonic() - started, failed)

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _lock_key(self, session_id: str) -> str:
        return f"{self.prefix}lock:{session_id}"

    def _lock_keys(self, session_id: str) -> list[str]:
        """The turn lock and its "ending" mark (the holder's token, set when its client left)."""
        return [self._lock_key(session_id), f"{self.prefix}ending:{session_id}"]

    def safe_url(self) -> str:
        """The URL without a password, for error messages."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
