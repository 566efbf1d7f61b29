"""The shared store on Redis: the processes of any machines that reach one server.

Every update is one Lua script, which Redis runs atomically, and each reads the time
with ``redis.call('TIME')``: Redis's clock is the store's, so the clients' clocks (and
their skew) never enter a booking. The bookings of one identity are a sorted set (the
booked time of each grant) and a hash (its costs, and their running sums: a grant reads
only the newest row and the oldest it needs, never the whole window; decision 0295); its
concurrency slots a sorted set of expiry times; its declared limits a hash with a sorted
set of their expiry times. Keys are ``fanflow:{IDENTITY}:...`` (one hash slot per
identity, for Redis Cluster), and expire by themselves when no process uses them.
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

# The running sums of one identity's bookings: the costs hash's field 'sum', "N S1 S2 S3
# S4 D1 D2 D3 D4": the rows in the grants zset, the sum of their costs per rate, and
# how many of them cost other than 1 of each rate. Every script that books, settles or
# removes a row keeps it, so a grant reads only the rows it needs: the newest (the
# spacing), and the oldest while the window's total is over a cap; when every row costs
# 1 of a rate (its requests), the i oldest cost i, and only the i-th is read.
_SUMS = """
local function parse(v, n)  -- 'a b c d' -> {a, b, c, d}; nil (no such field): n zeros
  local out = {}
  if not v then
    for k = 1, n do out[k] = 0 end
    return out
  end
  for x in string.gmatch(v, '%S+') do out[#out + 1] = tonumber(x) end
  return out
end
local function add(sums, v, sign)  -- a row's costs v into (or out of) the sums
  sums[1] = sums[1] + sign
  for k = 1, 4 do
    sums[k + 1] = sums[k + 1] + sign * v[k]
    if v[k] ~= 1 then sums[k + 5] = sums[k + 5] + sign end
  end
end
local function shown(v)  -- integers (and any double) exactly
  local out = {}
  for k = 1, #v do out[k] = string.format('%.17g', v[k]) end
  return table.concat(out, ' ')
end
"""

# KEYS: grants zset, costs hash, id counter. ARGV: window, horizon, 4 caps (-1: none),
# the number of sends, then 4 costs per send. Returns Redis's now, then delay, id pairs
# (id 0: not booked, due more than a horizon away). Times go through string.format:
# Lua's own number to string conversion keeps 14 digits, 0.1 ms of an epoch time.
# Each send is booked by _sqlite.earliest's rule over every row in the window (read in
# time order, the running sums standing for their total); decision 0295.
_GRANT = (
    _NOW
    + _SUMS
    + """
local g, c, n = KEYS[1], KEYS[2], KEYS[3]
local window, horizon = tonumber(ARGV[1]), tonumber(ARGV[2])
local caps = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local count = tonumber(ARGV[7])
local cut = string.format('%.6f', now - window)
local kept = redis.call('HGET', c, 'sum')
local sums = parse(kept, 9)  -- the rows; their costs of rate k (k + 1); not 1 (k + 5)
if #sums ~= 9 then kept, sums = nil, parse(nil, 9) end  -- another layout: count again
-- The rows that left the window, taken out of the sums (a few hundred at a time: unpack).
local gone = redis.call('ZRANGEBYSCORE', g, '-inf', cut)
for a = 1, #gone, 256 do
  local ids = {unpack(gone, a, math.min(a + 255, #gone))}
  local costs = redis.call('HMGET', c, unpack(ids))
  for x = 1, #ids do
    add(sums, parse(costs[x], 4), -1)
  end
  redis.call('HDEL', c, unpack(ids))
end
redis.call('ZREMRANGEBYSCORE', g, '-inf', cut)
local live = redis.call('ZCARD', g)
if not kept or sums[1] ~= live or redis.call('HLEN', c) ~= live + 1 then
  -- No sums, or rows changed without them (keys lost, another version): count them all.
  local all, costs = redis.call('HGETALL', c), {}
  for x = 1, #all, 2 do costs[all[x]] = all[x + 1] end
  sums = parse(nil, 9)
  for _, id in ipairs(redis.call('ZRANGE', g, 0, -1)) do
    if not costs[id] then redis.call('HSET', c, id, '0 0 0 0') end  -- as it was read
    add(sums, parse(costs[id], 4), 1)
    costs[id] = nil
  end
  costs['sum'] = nil
  for id in pairs(costs) do redis.call('HDEL', c, id) end  -- costs of no row
end
-- Row i (time order) is the i-th oldest of the live rows, then the i - live-th of those
-- booked here. The oldest are read as the window's total needs them, 32 to 256 at once.
local old, new, ats = {}, {}, {}
local function row(i)
  if i > live then return new[i - live] end
  while #old < i do
    local a = #old
    local b = math.min(live, a + math.min(256, math.max(32, a))) - 1
    local part = redis.call('ZRANGE', g, a, b, 'WITHSCORES')
    local ids = {}
    for x = 1, #part, 2 do ids[#ids + 1] = part[x] end
    local costs = redis.call('HMGET', c, unpack(ids))
    for x = 1, #ids do
      local v = parse(costs[x], 4)
      table.insert(v, 1, tonumber(part[2 * x]))
      old[#old + 1] = v
    end
  end
  return old[i]
end
local function at(i)  -- row i's time alone
  if i > live then return new[i - live][1] end
  if not old[i] and not ats[i] then
    ats[i] = tonumber(redis.call('ZRANGE', g, i - 1, i - 1, 'WITHSCORES')[2])
  end
  return old[i] and old[i][1] or ats[i]
end
local last = nil  -- the newest row: {at, c1..c4}
if live > 0 then
  local top = redis.call('ZRANGE', g, -1, -1, 'WITHSCORES')
  last = parse(redis.call('HGET', c, top[1]), 4)
  table.insert(last, 1, tonumber(top[2]))
end
-- Per rate: how many of the oldest rows the window's total has left out so far, and
-- their costs. A total only grows from one send to the next, so neither goes back.
local dropped, freed = {0, 0, 0, 0}, {0, 0, 0, 0}
local out = {string.format('%.6f', now)}
for j = 0, count - 1 do
  local cost = {}
  for k = 1, 4 do cost[k] = tonumber(ARGV[7 + 4 * j + k]) end
  local rows = live + #new
  local t = now
  if last and last[1] > t then t = last[1] end
  for k = 1, 4 do
    if caps[k] > 0 and last then  -- spaced evenly: see _sqlite.earliest
      local spaced = last[1] + last[k + 1] * window / caps[k]
      if spaced > t then t = spaced end
    end
    local total = cost[k] + sums[k + 1]
    if caps[k] >= 0 and cost[k] > 0 and total > caps[k] then
      local i
      if sums[k + 5] == 0 then  -- every row costs 1: the i oldest cost i
        i = math.min(rows, math.ceil(total - caps[k]))
        while i > 0 and total - (i - 1) <= caps[k] do i = i - 1 end
        while i < rows and total - i > caps[k] do i = i + 1 end
      else
        total = total - freed[k]
        i = dropped[k]
        while total > caps[k] and i < rows do
          i = i + 1
          local v = row(i)[k + 1]
          total = total - v
          freed[k] = freed[k] + v
        end
        dropped[k] = i
      end
      if i > 0 and at(i) + window + 0.000001 > t then t = at(i) + window + 0.000001 end
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
  last = {t, cost[1], cost[2], cost[3], cost[4]}
  new[#new + 1] = last
  add(sums, cost, 1)
  out[#out + 1] = string.format('%.6f', t - now)
  out[#out + 1] = id
end
redis.call('HSET', c, 'sum', shown(sums))
local keep = math.ceil((window + horizon) * 2000)
redis.call('PEXPIRE', g, keep)
redis.call('PEXPIRE', c, keep)
redis.call('PEXPIRE', n, keep)
return out
"""
)

# KEYS: grants zset, costs hash. ARGV: per grant, its id and 4 costs (all 0: give it
# back, it was never sent). The running sums follow (none kept: the next grant counts).
_SETTLE = (
    _SUMS
    + """
local g, c = KEYS[1], KEYS[2]
local kept = redis.call('HGET', c, 'sum')
local sums = parse(kept, 9)
if #sums ~= 9 then kept, sums = nil, parse(nil, 9) end
for i = 1, #ARGV, 5 do
  local id = ARGV[i]
  local cost = ARGV[i + 1] .. ' ' .. ARGV[i + 2] .. ' ' .. ARGV[i + 3] .. ' ' .. ARGV[i + 4]
  local was = redis.call('HGET', c, id)
  local booked = redis.call('ZSCORE', g, id)
  if cost == '0 0 0 0' then
    redis.call('ZREM', g, id)
    redis.call('HDEL', c, id)
    if booked then add(sums, parse(was, 4), -1) end
  elseif was then
    redis.call('HSET', c, id, cost)
    if booked then
      add(sums, parse(was, 4), -1)
      add(sums, parse(cost, 4), 1)
    end
  end
end
if kept then redis.call('HSET', c, 'sum', shown(sums)) end
"""
)

# Keeps the slots zset and the id counter (KEYS[1], KEYS[2]) for twice the slots' TTL
# after the last change, so an identity nobody uses is dropped.
_KEEP_SLOTS = """
local function keep_slots(ttl)
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
  redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 2000))
end
"""

# KEYS: slots zset, id counter. ARGV: the limit, the TTL. Returns the slot's id, or 0.
_TRY_SLOT = (
    _NOW
    + _KEEP_SLOTS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local id = redis.call('INCR', KEYS[2])
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.6f', now + ttl), id)
keep_slots(ttl)
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
    + _KEEP_SLOTS
    + """
local ttl = tonumber(ARGV[1])
for i = 3, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
local out = {}
for _ = 1, tonumber(ARGV[2]) do
  local id = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], string.format('%.6f', now + ttl), id)
  out[#out + 1] = id
end
keep_slots(ttl)
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

# KEYS: declarations hash, their expiry zset, their first times (a hash). ARGV:
# holder, body, TTL. Returns every live holder, its first time and its body: a holder's
# first time is Redis's now when it declared with no live declaration, kept while it
# renews (the processes' rank in an outage, decision 0309).
_DECLARE = (
    _NOW
    + """
local cut = string.format('%.6f', now)
for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cut)) do
  redis.call('HDEL', KEYS[1], h)
  redis.call('HDEL', KEYS[3], h)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cut)
local ttl = tonumber(ARGV[3])
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) or not redis.call('HGET', KEYS[3], ARGV[1]) then
  redis.call('HSET', KEYS[3], ARGV[1], cut)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.6f', now + ttl), ARGV[1])
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], math.ceil(ttl * 2000)) end
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = redis.call('HGET', KEYS[3], all[i]) or ''
  out[#out + 1] = all[i + 1]
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
    ) -> dict[str, tuple[float, dict[str, Any]]]:
        keys = [f"fanflow:{{{ident}}}:{k}" for k in ("d", "de", "dj")]
        out = await self._call("declare", keys, [holder, json.dumps(body), ttl])
        declared: dict[str, tuple[float, dict[str, Any]]] = {}
        for i in range(0, len(out), 3):
            name = out[i].decode() if isinstance(out[i], bytes) else str(out[i])
            since = float(out[i + 1]) if out[i + 1] else -math.inf  # an older version's
            declared[name] = (since, json.loads(out[i + 2]))
        return declared

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
