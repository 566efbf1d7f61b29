"""The shared store on Redis: the processes of any machines that reach one server.

Every update is one Lua script, which Redis runs atomically, and each reads the time
with ``redis.call('TIME')``: Redis's clock is the store's, so the clients' clocks (and
their skew) never enter a booking. The bookings of one identity are a sorted set (the
booked time of each grant) and a hash (its costs); its concurrency slots a sorted set of
expiry times; its declared limits a hash with a sorted set of their expiry times. Keys
are ``fanflow:{IDENTITY}:...`` (one hash slot per identity, for Redis Cluster), and
expire by themselves when no process uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncGenerator
from typing import Any

from .._exceptions import ConfigError
from .._log import log

__all__ = ["RedisStore"]

# At shutdown, the updates still pending are sent within this many seconds, or dropped.
_LAST_FLUSH = 2.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: grants zset, costs hash, id counter. ARGV: window, horizon, 4 caps (-1: none),
# the number of sends, then 4 costs per send. Returns Redis's now, then delay, id pairs
# (id 0: not booked, due more than a horizon away). Times go through string.format:
# Lua's own number to string conversion keeps 14 digits, 0.1 ms of an epoch time.
_GRANT = (
    _NOW
    + """
local g, c, n = KEYS[1], KEYS[2], KEYS[3]
local window, horizon = tonumber(ARGV[1]), tonumber(ARGV[2])
local caps = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local count = tonumber(ARGV[7])
local cut = string.format('%.6f', now - window)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', g, '-inf', cut)) do redis.call('HDEL', c, id) end
redis.call('ZREMRANGEBYSCORE', g, '-inf', cut)
local live = redis.call('ZRANGE', g, 0, -1, 'WITHSCORES')
local all, costs = redis.call('HGETALL', c), {}  -- one call, not one HGET per booking
for i = 1, #all, 2 do costs[all[i]] = all[i + 1] end
local rows = {}
for i = 1, #live, 2 do
  local row = {tonumber(live[i + 1])}
  for v in string.gmatch(costs[live[i]] or '0 0 0 0', '%S+') do
    row[#row + 1] = tonumber(v)
  end
  rows[#rows + 1] = row
end
local out = {string.format('%.6f', now)}
for j = 0, count - 1 do
  local cost = {}
  for k = 1, 4 do cost[k] = tonumber(ARGV[7 + 4 * j + k]) end
  local t = now
  if #rows > 0 and rows[#rows][1] > t then t = rows[#rows][1] end
  for k = 1, 4 do
    if caps[k] > 0 and #rows > 0 then  -- spaced evenly: see _sqlite.earliest
      local spaced = rows[#rows][1] + rows[#rows][k + 1] * window / caps[k]
      if spaced > t then t = spaced end
    end
    if caps[k] >= 0 and cost[k] > 0 then
      local total = cost[k]
      for _, r in ipairs(rows) do total = total + r[k + 1] end
      local i = 0
      while total > caps[k] and i < #rows do
        i = i + 1
        total = total - rows[i][k + 1]
      end
      if i > 0 and rows[i][1] + window + 0.000001 > t then t = rows[i][1] + window + 0.000001 end
    end
  end
  if t - now > horizon then
    for _ = j, count - 1 do
      out[#out + 1] = string.format('%.6f', t - now)
      out[#out + 1] = 0
    end
    break
  end
  local id = redis.call('INCR', n)
  redis.call('ZADD', g, string.format('%.6f', t), id)
  redis.call('HSET', c, id, table.concat(cost, ' '))
  rows[#rows + 1] = {t, cost[1], cost[2], cost[3], cost[4]}
  out[#out + 1] = string.format('%.6f', t - now)
  out[#out + 1] = id
end
local keep = math.ceil((window + horizon) * 2000)
redis.call('PEXPIRE', g, keep)
redis.call('PEXPIRE', c, keep)
redis.call('PEXPIRE', n, keep)
return out
"""
)

# KEYS: grants zset, costs hash. ARGV: per grant, its id and 4 costs (all 0: give it
# back, it was never sent).
_SETTLE = """
for i = 1, #ARGV, 5 do
  local id = ARGV[i]
  local cost = ARGV[i + 1] .. ' ' .. ARGV[i + 2] .. ' ' .. ARGV[i + 3] .. ' ' .. ARGV[i + 4]
  if cost == '0 0 0 0' then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  elseif redis.call('HEXISTS', KEYS[2], id) == 1 then
    redis.call('HSET', KEYS[2], id, cost)
  end
end
"""

# KEYS: slots zset, id counter. ARGV: the limit, the TTL. Returns the slot's id, or 0.
_TRY_SLOT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local id = redis.call('INCR', KEYS[2])
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.6f', now + ttl), id)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 2000))
return id
"""
)

# KEYS: slots zset. ARGV: the TTL, then the slots' ids.
_RENEW = (
    _NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', string.format('%.6f', now + ttl), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
"""
)

# KEYS: slots zset, id counter. ARGV: the TTL, the number of slots to take whatever the
# limit, then the ids of the slots they replace. Returns the new slots' ids.
_ADOPT = (
    _NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 3, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
local out = {}
for _ = 1, tonumber(ARGV[2]) do
  local id = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], string.format('%.6f', now + ttl), id)
  out[#out + 1] = id
end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 2000))
return out
"""
)

# KEYS: the capacity learnt (a string: Redis's time, a space, the JSON). ARGV: the
# JSON, how long it is kept (seconds).
_PUBLISH = (
    _NOW
    + """
local keep = math.ceil(tonumber(ARGV[2]) * 1000)
redis.call('SET', KEYS[1], string.format('%.6f', now) .. ' ' .. ARGV[1], 'PX', keep)
"""
)

# KEYS: the capacity learnt. Returns its age in seconds and the JSON, or nothing.
_READ = (
    _NOW
    + """
local v = redis.call('GET', KEYS[1])
if not v then return {} end
local at, body = string.match(v, '^(%S+) (.*)$')
return {string.format('%.6f', math.max(0, now - tonumber(at))), body}
"""
)

# KEYS: declarations hash, their expiry zset. ARGV: holder, body, TTL. Returns the
# other live holders' bodies.
_DECLARE = (
    _NOW
    + """
local cut = string.format('%.6f', now)
for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cut)) do
  redis.call('HDEL', KEYS[1], h)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cut)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.6f', now + ttl), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 2000))
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then out[#out + 1] = all[i + 1] end
end
return out
"""
)


class RedisStore:
    """Bookings, slots and declared limits of every identity on one Redis server, for
    one event loop (a redis-py asyncio client belongs to the loop it was made on)."""

    def __init__(self, url: str, shown: str) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ConfigError(
                f"shared limits at {shown!r} need redis-py: pip install 'fanflow[redis]'"
            ) from None
        self.shown = shown
        self._client = aioredis.from_url(url)
        self._scripts = {
            name: self._client.register_script(body)
            for name, body in (
                ("grant", _GRANT),
                ("settle", _SETTLE),
                ("try_slot", _TRY_SLOT),
                ("renew", _RENEW),
                ("adopt", _ADOPT),
                ("release", "redis.call('ZREM', KEYS[1], ARGV[1])"),
                ("declare", _DECLARE),
                ("publish", _PUBLISH),
                ("read", _READ),
            )
        }
        self._closing = False
        # Fire-and-forget updates (settlements, releases), sent together by one task.
        self._pending: list[tuple[str, list[str], list[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._failed = False
        self._closer: AsyncGenerator[None, None] | None = None
        self.round_trips = 0

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        import redis.exceptions

        if self._closer is None:
            closer = self._closer = self._close_at_shutdown()
            await closer.__anext__()
        self.round_trips += 1
        try:
            return await self._scripts[name](keys=keys, args=args)
        except (redis.exceptions.ConnectionError, OSError) as exc:
            raise ConfigError(
                f"shared limits: cannot reach Redis at {self.shown!r} ({exc}); start it "
                f"or correct shared="
            ) from None

    async def _close_at_shutdown(self) -> AsyncGenerator[None, None]:
        """Send the updates still pending, then close the client's connections, when
        the loop shuts down. The loop finalizes the async generators still open
        (``asyncio.run`` does it after it cancelled the tasks, before it closes the
        loop), and nothing else tells a store that its loop is ending. A process that
        ends at once so still gives its last slots back (and leaves no task pending)."""
        try:
            yield
        finally:
            self._closing = True
            flusher = self._flusher
            if flusher is not None:  # made while the loop cancelled the tasks
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            with contextlib.suppress(Exception):
                # A Redis that does not answer may not hold up the process's exit.
                await asyncio.wait_for(self._flush(), _LAST_FLUSH)
            await self._client.aclose()

    def _later(self, name: str, keys: list[str], args: list[Any]) -> None:
        self._pending.append((name, keys, args))
        if self._flusher is None and not self._closing:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send the pending updates, all those gathered in one pipeline. They leave the
        list once sent: an update cancelled in flight (the loop is ending) is sent at
        shutdown, again (each is idempotent). A failure is logged once; a lost release
        comes back with the TTL, a lost settlement keeps its booking."""
        import redis.exceptions

        try:
            while self._pending:
                batch = list(self._pending)
                try:
                    await self._send(batch)
                except (redis.exceptions.ConnectionError, OSError):
                    pass  # unreachable: the meter says so, once, and goes local
                except redis.exceptions.RedisError as exc:
                    if not self._failed:
                        self._failed = True
                        log.warning("shared limits: an update to %s failed: %s", self.shown, exc)
                del self._pending[: len(batch)]
        finally:
            if asyncio.current_task() is self._flusher:
                self._flusher = None

    async def _send(self, batch: list[tuple[str, list[str], list[Any]]]) -> None:
        """One round trip of scripts (loaded first, and sent again, if a restarted
        Redis does not know them)."""
        import redis.exceptions

        for _ in range(2):
            pipe = self._client.pipeline(transaction=False)
            for name, keys, args in batch:
                pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
            self.round_trips += 1
            results = await pipe.execute(raise_on_error=False)
            errors = [r for r in results if isinstance(r, Exception)]
            if not any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
                if errors:
                    raise errors[0]
                return
            for name in {name for name, _, _ in batch}:
                await self._client.script_load(self._scripts[name].script)

    async def declare(
        self, ident: str, holder: str, body: dict[str, Any], ttl: float
    ) -> list[dict[str, Any]]:
        keys = [f"fanflow:{{{ident}}}:d", f"fanflow:{{{ident}}}:de"]
        others = await self._call("declare", keys, [holder, json.dumps(body), ttl])
        return [json.loads(o) for o in others]

    async def grant_many(
        self, ident: str, caps: list[float], window: float, costs: list[list[int]], horizon: float
    ) -> tuple[float, list[tuple[float, int]]]:
        keys = [f"fanflow:{{{ident}}}:{k}" for k in ("g", "c", "n")]
        args: list[Any] = [window, horizon, *(-1 if math.isinf(c) else c for c in caps)]
        args.append(len(costs))
        for cost in costs:
            args.extend(cost)
        out = await self._call("grant", keys, args)
        return float(out[0]), [(float(out[i]), int(out[i + 1])) for i in range(1, len(out), 2)]

    def settle(self, ident: str, settles: list[tuple[int, list[int]]]) -> None:
        keys = [f"fanflow:{{{ident}}}:g", f"fanflow:{{{ident}}}:c"]
        self._later("settle", keys, [v for grant, costs in settles for v in (grant, *costs)])

    async def try_slot(self, ident: str, holder: str, limit: int, ttl: float) -> int:
        keys = [f"fanflow:{{{ident}}}:s", f"fanflow:{{{ident}}}:sn"]
        return int(await self._call("try_slot", keys, [limit, ttl]))

    def release(self, ident: str, slot: int) -> None:
        self._later("release", [f"fanflow:{{{ident}}}:s"], [slot])

    async def renew(self, ident: str, slots: list[int], ttl: float) -> None:
        await self._call("renew", [f"fanflow:{{{ident}}}:s"], [ttl, *slots])

    async def adopt(self, ident: str, old: list[int], count: int, ttl: float) -> list[int]:
        """Take ``count`` slots whatever the limit, in place of the slots ``old``: those
        a process held while the store was lost."""
        keys = [f"fanflow:{{{ident}}}:s", f"fanflow:{{{ident}}}:sn"]
        return [int(i) for i in await self._call("adopt", keys, [ttl, count, *old])]

    def publish_capacity(self, ident: str, learnt: dict[str, float], keep: float) -> None:
        """Keep what a lane learnt of the server for ``keep`` seconds (fire and forget)."""
        self._later("publish", [f"fanflow:{{{ident}}}:k"], [json.dumps(learnt), keep])

    async def read_capacity(self, ident: str) -> tuple[dict[str, float], float] | None:
        """(what was learnt, its age in seconds), or None: nothing kept."""
        out = await self._call("read", [f"fanflow:{{{ident}}}:k"], [])
        return (json.loads(out[1]), float(out[0])) if out else None
