"""``limits_backend = "redis://..."``: one set of limit counters for every instance.

The same GCRA as ``limits`` (see there), run inside Redis by one Lua script per
admission -- one round trip, atomic across instances, with Redis ``TIME`` as
the one clock (instances' clocks need not agree). In-flight slots are *leases*:
a sorted set per scope of lease ids scored by their expiry. The holder refreshes
its live leases every ``LEASE_TTL / 3``; a crashed instance stops refreshing, and
its slots free themselves within ``LEASE_TTL``. The end of a request (slot
freed, tokens reconciled, usage counted per key and tenant) is one more script,
fire-and-forget.

Redis is never a request's dependency: every call has a deadline, and a failure
opens the circuit (``pyproxy.circuit``) -- while it is open, admission decides in
this process alone, with its share of every limit (``limits_local_share``).

Keys: ``pyproxy:l:<scope>:r|t|p`` (requests tat, tokens tat, leases) expire on
their own once idle; ``pyproxy:u:k:<key>`` and ``pyproxy:u:t:<tenant>`` hold the
usage totals admin ``/usage`` reads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from pyproxy.circuit import Circuit
from pyproxy.gateway import limits as gcra
from pyproxy.gateway.keys import Limits
from pyproxy.resp import RespClient, Script

log = logging.getLogger("pyproxy.keys")

LEASE_TTL = 30.0  # seconds a lease lives without its holder's refresh
MAX_PENDING_ENDS = 4096  # request ends waiting to be written; beyond, dropped (leases expire)
LIMITS_PREFIX = "pyproxy:l:"
USAGE_PREFIX = "pyproxy:u:"
USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "estimated")

# KEYS: per scope its requests tat, tokens tat, leases. ARGV: cost, lease id, lease
# TTL (us), then per scope rpm, tpm, max_parallel (0: uncapped). Times in
# microseconds; numbers travel as %.17g strings (Lua numbers are doubles; an integer
# reply would truncate them).
_ADMIT = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = 60000000
local cost = tonumber(ARGV[1])
local ttl = tonumber(ARGV[3])
local n = #KEYS / 3
local tr, tt = {}, {}
local function f(x) return string.format('%.17g', x) end
for i = 1, n do
  local k, a = (i - 1) * 3, 3 + (i - 1) * 3
  local rpm, tpm, par = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  tr[i] = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
  tt[i] = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
  if par > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 3]) >= par then
      return {0, i, 'concurrency', '1000000', f(now), f(tr[i]), f(tt[i])}
    end
  end
  if rpm > 0 then
    local after = math.max(tr[i], now) + W / rpm
    if after - now > W + 0.001 then return {0, i, 'requests', f(after - now - W), f(now), f(tr[i]), f(tt[i])} end
  end
  if tpm > 0 and cost > 0 then
    local after = math.max(tt[i], now) + math.min(cost, tpm) * W / tpm
    if after - now > W + 0.001 then return {0, i, 'tokens', f(after - now - W), f(now), f(tr[i]), f(tt[i])} end
  end
end
for i = 1, n do
  local k, a = (i - 1) * 3, 3 + (i - 1) * 3
  local rpm, tpm, par = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if par > 0 then
    redis.call('ZADD', KEYS[k + 3], now + ttl, ARGV[2])
    redis.call('PEXPIRE', KEYS[k + 3], math.ceil(ttl / 500))
  end
  if rpm > 0 then
    tr[i] = math.max(tr[i], now) + W / rpm
    redis.call('SET', KEYS[k + 1], f(tr[i]), 'PX', math.ceil((tr[i] - now) / 1000) + 1000)
  end
  if tpm > 0 and cost > 0 then
    tt[i] = math.max(tt[i], now) + math.min(cost, tpm) * W / tpm
    redis.call('SET', KEYS[k + 2], f(tt[i]), 'PX', math.ceil((tt[i] - now) / 1000) + 1000)
  end
end
return {1, f(now), f(tr[1]), f(tt[1])}
"""
)

# KEYS: the key's and the tenant's usage hashes, then per scope its tokens tat and
# leases. ARGV: lease id, tokens used, reserved (-1: nothing to reconcile), whether
# to count usage (0|1), input, output, estimated (0|1), then per scope tpm (0: none)
# and whether it holds a lease.
_END = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = 60000000
local used, reserved = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] == '1' then
  for j = 1, 2 do
    redis.call('HINCRBY', KEYS[j], 'requests', 1)
    redis.call('HINCRBY', KEYS[j], 'input_tokens', ARGV[5])
    redis.call('HINCRBY', KEYS[j], 'output_tokens', ARGV[6])
    redis.call('HINCRBY', KEYS[j], 'estimated', ARGV[7])
  end
end
local n = (#KEYS - 2) / 2
for i = 1, n do
  local tk, pk = KEYS[2 + (i - 1) * 2 + 1], KEYS[2 + (i - 1) * 2 + 2]
  local tpm, leased = tonumber(ARGV[7 + (i - 1) * 2 + 1]), ARGV[7 + (i - 1) * 2 + 2]
  if leased == '1' then redis.call('ZREM', pk, ARGV[1]) end
  if tpm > 0 and reserved >= 0 then
    local delta = (used - math.min(reserved, tpm)) * W / tpm
    if delta ~= 0 then
      local tat = tonumber(redis.call('GET', tk) or '0') + delta
      if delta < 0 then tat = math.max(tat, now) end
      if tat > now then
        redis.call('SET', tk, string.format('%.17g', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
      else
        redis.call('DEL', tk)
      end
    end
  end
end
return 1
"""
)

# KEYS: leases sets; ARGV: TTL (us), then the lease id held in each.
_REFRESH = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(ttl / 500))
end
return #KEYS
"""
)


class SharedTicket:
    """An admission decided by Redis: the scopes it holds, its lease and reservation."""

    __slots__ = ("scopes", "lease", "reserved", "leased", "state")

    def __init__(self, scopes: Sequence[Tuple[str, Limits]], lease: bytes, reserved: int, state: gcra.Bucket) -> None:
        self.scopes = scopes
        self.lease = lease
        self.reserved = reserved
        self.leased = [limits.max_parallel is not None for _, limits in scopes]
        self.state = state  # the first scope as Redis left it, for the x-ratelimit fields


class SharedRefusal:
    __slots__ = ("scope", "limits", "reason", "retry_after", "bucket")

    def __init__(self, scope: str, limits: Limits, reason: str, retry_after: float, bucket: gcra.Bucket) -> None:
        self.scope = scope
        self.limits = limits
        self.reason = reason
        self.retry_after = retry_after
        self.bucket = bucket  # the scope's state as Redis saw it, for the x-ratelimit fields


def _state(scope: str, limits: Limits, now_us: float, tat_r: float, tat_t: float) -> gcra.Bucket:
    """A Bucket holding Redis's view of one scope on a clock whose now is 0 (what
    limit_headers reads with now = 0: no second clock to reconcile)."""
    bucket = gcra.Bucket(scope, limits)
    bucket.tat_requests = (tat_r - now_us) / 1e6
    bucket.tat_tokens = (tat_t - now_us) / 1e6
    return bucket


class SharedLimits:
    def __init__(self, url: str, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.client = RespClient(url, timeout, loop)
        self.circuit = Circuit("redis", log, loop.time, "limits are enforced by each process at its share")
        self._instance = os.urandom(6).hex().encode("ascii")
        self._ids = itertools.count(1)
        # Live leases: lease id -> the leases keys holding it (refreshed until the end).
        self.leases: Dict[bytes, List[str]] = {}
        self._ends: Set["asyncio.Task[None]"] = set()
        self._refresh: Optional[asyncio.TimerHandle] = None
        self.admitted = 0  # admissions Redis decided (the tests and /metrics read these)
        self.ends_dropped = 0

    @property
    def available(self) -> bool:
        return self.circuit.available

    def start(self) -> None:
        self._refresh = self.loop.call_later(LEASE_TTL / 3, self._refresh_leases)

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        for task in list(self._ends):
            task.cancel()
        self.client.close()

    # --- admission -------------------------------------------------------------------------

    async def admit(self, scopes: Sequence[Tuple[str, Limits]], cost: int) -> "SharedTicket | SharedRefusal | None":
        """Redis's decision, or None when Redis could not give one (the caller decides
        locally; the circuit is open now)."""
        lease = b"%s:%d" % (self._instance, next(self._ids))
        keys: List[str] = []
        args: List[Any] = [cost, lease, int(LEASE_TTL * 1e6)]
        for scope, limits in scopes:
            base = LIMITS_PREFIX + scope
            keys += (base + ":r", base + ":t", base + ":p")
            args += (limits.rpm or 0, limits.tpm or 0, limits.max_parallel or 0)
        call = self.loop.create_task(self.client.run(_ADMIT, keys, args))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The client left while Redis decided: whatever it decides is undone.
            call.add_done_callback(lambda done: self._abandoned(done, scopes, lease, cost))
            raise
        except Exception as exc:
            self.circuit.failed("admission", exc)
            return None
        self.circuit.succeeded()
        return self._decision(reply, scopes, lease, cost)

    def _decision(
        self, reply: Any, scopes: Sequence[Tuple[str, Limits]], lease: bytes, cost: int
    ) -> "SharedTicket | SharedRefusal":
        if reply[0] == 1:
            self.admitted += 1
            state = _state(scopes[0][0], scopes[0][1], float(reply[1]), float(reply[2]), float(reply[3]))
            ticket = SharedTicket(scopes, lease, cost, state)
            held = [LIMITS_PREFIX + scope + ":p" for (scope, _), leased in zip(scopes, ticket.leased) if leased]
            if held:
                self.leases[lease] = held
            return ticket
        index = int(reply[1]) - 1
        scope, limits = scopes[index]
        bucket = _state(scope, limits, float(reply[4]), float(reply[5]), float(reply[6]))
        return SharedRefusal(scope, limits, reply[2].decode("ascii"), float(reply[3]) / 1e6, bucket)

    def _abandoned(
        self, call: "asyncio.Task[Any]", scopes: Sequence[Tuple[str, Limits]], lease: bytes, cost: int
    ) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        decision = self._decision(call.result(), scopes, lease, cost)
        if type(decision) is SharedTicket:
            self.end(decision, 0, "", "", 0, 0, False, count=False)

    # --- the end of a request -----------------------------------------------------------

    def end(
        self,
        ticket: Optional[SharedTicket],
        used: int,
        key: str,
        tenant: str,
        used_in: int,
        used_out: int,
        estimated: bool,
        count: bool = True,
    ) -> None:
        """Free the lease, reconcile the tokens, count the usage: in the background.
        ``ticket`` None: a key without limits (its usage only)."""
        lease = b""
        scope_keys: List[str] = []
        scope_args: List[Any] = []
        reserved = -1
        if ticket is not None:
            lease = ticket.lease
            self.leases.pop(lease, None)  # not refreshed any more: expires if the end is lost
            reserved = ticket.reserved if ticket.reserved else -1
            for (scope, limits), leased in zip(ticket.scopes, ticket.leased):
                base = LIMITS_PREFIX + scope
                scope_keys += (base + ":t", base + ":p")
                scope_args += (limits.tpm or 0, 1 if leased else 0)
        if not count and not scope_keys:
            return
        if not self.available or len(self._ends) >= MAX_PENDING_ENDS:
            self.ends_dropped += 1
            return
        usage_keys = [USAGE_PREFIX + "k:" + key, USAGE_PREFIX + "t:" + tenant]
        usage_args = [1 if count else 0, used_in, used_out, 1 if estimated else 0]
        task = self.loop.create_task(
            self._end(usage_keys + scope_keys, [lease, used, reserved] + usage_args + scope_args)
        )
        self._ends.add(task)
        task.add_done_callback(self._ends.discard)

    async def _end(self, keys: List[str], args: List[Any]) -> None:
        try:
            await self.client.run(_END, keys, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.ends_dropped += 1
            self.circuit.failed("request end", exc)
        else:
            self.circuit.succeeded()

    def _refresh_leases(self) -> None:
        self._refresh = self.loop.call_later(LEASE_TTL / 3, self._refresh_leases)
        if not self.leases or not self.available:
            return
        keys: List[str] = []
        args: List[Any] = [int(LEASE_TTL * 1e6)]
        for lease, held in self.leases.items():
            for key in held:
                keys.append(key)
                args.append(lease)
        task = self.loop.create_task(self._run_refresh(keys, args))
        self._ends.add(task)
        task.add_done_callback(self._ends.discard)

    async def _run_refresh(self, keys: List[str], args: List[Any]) -> None:
        try:
            await self.client.run(_REFRESH, keys, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.circuit.failed("lease refresh", exc)

    async def usage(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        return await read_usage(self.client)


async def read_usage(client: RespClient) -> Dict[str, Dict[str, Dict[str, int]]]:
    """The usage totals of every instance, per key and tenant (admin /usage). Found by
    SCAN, so keys removed from the file since still show. Raises when Redis cannot
    answer."""
    out: Dict[str, Dict[str, Dict[str, int]]] = {"keys": {}, "tenants": {}}
    cursor: Any = b"0"
    names: List[bytes] = []
    while True:
        reply = await client.call(b"SCAN", cursor, b"MATCH", USAGE_PREFIX + "*", b"COUNT", 1000)
        if not isinstance(reply, list) or len(reply) != 2:
            raise ConnectionError(f"unexpected SCAN reply from redis: {reply!r}")
        cursor, found = reply
        names += found
        if cursor == b"0":
            break
    replies = await asyncio.gather(*(client.call(b"HGETALL", name) for name in names))
    for name, reply in zip(names, replies):
        if not isinstance(reply, list) or not reply:
            continue
        kind, _, who = name.decode("utf-8", "replace")[len(USAGE_PREFIX) :].partition(":")
        table = out["keys"] if kind == "k" else out["tenants"] if kind == "t" else None
        if table is None:
            continue
        row = {f.decode(): int(v) for f, v in zip(reply[::2], reply[1::2])}
        table[who] = {field: row.get(field, 0) for field in USAGE_FIELDS}
    return out
