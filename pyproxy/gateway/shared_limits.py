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
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from pyproxy.circuit import Circuit
from pyproxy.gateway import limits as gcra
from pyproxy.gateway.keys import Limits
from pyproxy.resp import Command, RespClient, Script, bulk

log = logging.getLogger("pyproxy.keys")

LEASE_TTL = 30.0  # seconds a lease lives without its holder's refresh
MAX_PENDING_ENDS = 4096  # request ends waiting to be written; beyond, dropped (leases expire)
LIMITS_PREFIX = "pyproxy:l:"
USAGE_PREFIX = "pyproxy:u:"
USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "estimated")

# Both scripts take a *batch*: the admissions (or request ends) of one event-loop
# iteration go to Redis as one call, so a busy process pays one round trip and one
# script run for many requests. Times are microseconds; numbers travel as %.17g
# strings (Lua numbers are doubles; an integer reply would truncate them).
#
# ADMIT. ARGV: lease TTL (us), the number of admissions, then per admission: its
# number of scopes, its token cost, its lease id, then per scope rpm, tpm,
# max_parallel (0: uncapped). KEYS: per scope its requests tat, tokens tat, leases.
# Each admission is decided over all its scopes first, then acted on all or none.
# Reply per admission: {1, now, tat_r, tat_t} (the first scope, after), or
# {0, scope index, reason, retry after (us), now, tat_r, tat_t} (the refusing scope).
_ADMIT = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = 60000000
local ttl = tonumber(ARGV[1])
local function f(x) return string.format('%.17g', x) end
local function admit(n, cost, lease, k0, a0)
  local tr, tt = {}, {}
  for i = 1, n do
    local k, a = k0 + (i - 1) * 3, a0 + (i - 1) * 3
    local rpm, tpm, par = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    tr[i] = tonumber(redis.call('GET', KEYS[k]) or '0')
    tt[i] = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    if par > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', now)
      if redis.call('ZCARD', KEYS[k + 2]) >= par then
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
    local k, a = k0 + (i - 1) * 3, a0 + (i - 1) * 3
    local rpm, tpm, par = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    if par > 0 then
      redis.call('ZADD', KEYS[k + 2], now + ttl, lease)
      redis.call('PEXPIRE', KEYS[k + 2], math.ceil(ttl / 500))
    end
    if rpm > 0 then
      tr[i] = math.max(tr[i], now) + W / rpm
      redis.call('SET', KEYS[k], f(tr[i]), 'PX', math.ceil((tr[i] - now) / 1000) + 1000)
    end
    if tpm > 0 and cost > 0 then
      tt[i] = math.max(tt[i], now) + math.min(cost, tpm) * W / tpm
      redis.call('SET', KEYS[k + 1], f(tt[i]), 'PX', math.ceil((tt[i] - now) / 1000) + 1000)
    end
  end
  return {1, f(now), f(tr[1]), f(tt[1])}
end
local out = {}
local a, k = 3, 1
for j = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  out[j] = admit(n, tonumber(ARGV[a + 1]), ARGV[a + 2], k, a + 3)
  a = a + 3 + 3 * n
  k = k + 3 * n
end
return out
"""
)

# END. ARGV: the number of usage rows, then per row its requests, input, output,
# estimated increments (KEYS: one usage hash per row); then the number of ends,
# then per end: its number of scopes, lease id, tokens used, reserved (-1: nothing
# to reconcile), then per scope tpm (0: none) and whether it holds a lease (KEYS:
# per scope its tokens tat and leases).
_END = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = 60000000
local rows = tonumber(ARGV[1])
local a = 2
for j = 1, rows do
  redis.call('HINCRBY', KEYS[j], 'requests', ARGV[a])
  if ARGV[a + 1] ~= '0' then redis.call('HINCRBY', KEYS[j], 'input_tokens', ARGV[a + 1]) end
  if ARGV[a + 2] ~= '0' then redis.call('HINCRBY', KEYS[j], 'output_tokens', ARGV[a + 2]) end
  if ARGV[a + 3] ~= '0' then redis.call('HINCRBY', KEYS[j], 'estimated', ARGV[a + 3]) end
  a = a + 4
end
local k = rows + 1
local ends = tonumber(ARGV[a])
a = a + 1
for j = 1, ends do
  local n, lease = tonumber(ARGV[a]), ARGV[a + 1]
  local used, reserved = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  for i = 1, n do
    local tpm, leased = tonumber(ARGV[a]), ARGV[a + 1]
    local tk, pk = KEYS[k], KEYS[k + 1]
    a = a + 2
    k = k + 2
    if leased == '1' then redis.call('ZREM', pk, lease) end
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
end
return ends
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


class ScopeSet:
    """The scopes one (key, model) is admitted by, with their parts of the scripts'
    commands encoded once (admission memoizes these per key and model)."""

    __slots__ = ("scopes", "leases_keys", "admit_keys", "admit_args", "end_keys", "end_args")

    def __init__(self, scopes: Sequence[Tuple[str, Limits]]) -> None:
        self.scopes = list(scopes)
        self.leases_keys = [LIMITS_PREFIX + scope + ":p" for scope, limits in scopes if limits.max_parallel is not None]
        base = [LIMITS_PREFIX + scope for scope, _ in scopes]
        self.admit_keys = b"".join(bulk(b + suffix) for b in base for suffix in (":r", ":t", ":p"))
        self.admit_args = b"".join(
            bulk(cap or 0) for _, limits in scopes for cap in (limits.rpm, limits.tpm, limits.max_parallel)
        )
        self.end_keys = b"".join(bulk(b + suffix) for b in base for suffix in (":t", ":p"))
        self.end_args = b"".join(
            bulk(limits.tpm or 0) + bulk(1 if limits.max_parallel is not None else 0) for _, limits in scopes
        )

    def __len__(self) -> int:
        return len(self.scopes)


class SharedTicket:
    """An admission decided by Redis: the scopes it holds, its lease and reservation."""

    __slots__ = ("scopes", "lease", "reserved", "state")

    def __init__(self, scopes: ScopeSet, lease: bytes, reserved: int, state: gcra.Bucket) -> None:
        self.scopes = scopes
        self.lease = lease
        self.reserved = reserved
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
        # This loop iteration's admissions and ends, sent as one script call each.
        self._admissions: List[Tuple[ScopeSet, int, bytes, Callable[[Any], None]]] = []
        self._ends: List[Tuple[Optional[SharedTicket], int]] = []
        self._usage: Dict[str, List[int]] = {}  # usage hash -> [requests, input, output, estimated]
        self._calls: Set["asyncio.Future[Any]"] = set()  # ends and refreshes in flight
        self._refresh: Optional[asyncio.TimerHandle] = None
        self.admitted = 0  # admissions Redis decided (the tests read these)
        self.admission_calls = 0  # the script calls they took (batches of one loop iteration)
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
        for call in list(self._calls):
            call.cancel()
        self.client.close()

    # --- admission -------------------------------------------------------------------------

    def admit(self, scopes: ScopeSet, cost: int, then: Callable[[Any], None]) -> None:
        """Ask Redis; ``then`` gets its decision -- a SharedTicket, a SharedRefusal, or
        None when Redis could not decide (the caller decides locally; the circuit is
        open now). A plain callback, called from the reply's arrival: no future and no
        task per request (on PyPy's pure-Python event loop each costs microseconds).
        ``then`` owns a SharedTicket from then on: it must end it."""
        lease = b"%s:%d" % (self._instance, next(self._ids))
        if not self._admissions:
            self.loop.call_soon(self._send_admissions)
        self._admissions.append((scopes, cost, lease, then))

    def _send_admissions(self) -> None:
        batch, self._admissions = self._admissions, []
        self.admission_calls += 1
        command = Command()
        command.arg(int(LEASE_TTL * 1e6))
        command.arg(len(batch))
        for scopes, cost, lease, _ in batch:
            n = len(scopes)
            command.arg(n)
            command.arg(cost)
            command.arg(lease)
            command.encoded_args(scopes.admit_args, 3 * n)
            command.encoded_keys(scopes.admit_keys, 3 * n)
        self.client.submit(_ADMIT, command).add_done_callback(lambda done: self._decided(done, batch))

    def _decided(self, done: "asyncio.Future[Any]", batch: List[Any]) -> None:
        failure = ConnectionError("cancelled") if done.cancelled() else done.exception()
        if failure is not None:
            self.circuit.failed("admission", failure)
            decisions: List[Any] = [None] * len(batch)
        else:
            self.circuit.succeeded()
            decisions = [
                self._decision(reply, scopes, lease, cost)
                for (scopes, cost, lease, _), reply in zip(batch, done.result())
            ]
        for (_, _, _, then), decision in zip(batch, decisions):
            try:
                then(decision)
            except Exception:  # pragma: no cover - a bug in a continuation; the others go on
                log.exception("unexpected error after a shared admission")

    def _decision(self, reply: Any, scopes: ScopeSet, lease: bytes, cost: int) -> "SharedTicket | SharedRefusal":
        if reply[0] == 1:
            self.admitted += 1
            first = scopes.scopes[0]
            state = _state(first[0], first[1], float(reply[1]), float(reply[2]), float(reply[3]))
            ticket = SharedTicket(scopes, lease, cost, state)
            if scopes.leases_keys:
                self.leases[lease] = scopes.leases_keys
            return ticket
        index = int(reply[1]) - 1
        scope, limits = scopes.scopes[index]
        bucket = _state(scope, limits, float(reply[4]), float(reply[5]), float(reply[6]))
        return SharedRefusal(scope, limits, reply[2].decode("ascii"), float(reply[3]) / 1e6, bucket)

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
        """Free the lease, reconcile the tokens, count the usage: with this loop
        iteration's other ends, in the background. ``ticket`` None: a key without
        limits (its usage only)."""
        if ticket is not None:
            self.leases.pop(ticket.lease, None)  # not refreshed any more: expires if the end is lost
        if not self.available:
            self.ends_dropped += 1
            return
        if not self._ends and not self._usage:
            self.loop.call_soon(self._send_ends)
        if ticket is not None:
            self._ends.append((ticket, used))
        if count:
            for name in (USAGE_PREFIX + "k:" + key, USAGE_PREFIX + "t:" + tenant):
                row = self._usage.get(name)
                if row is None:
                    row = self._usage[name] = [0, 0, 0, 0]
                row[0] += 1
                row[1] += used_in
                row[2] += used_out
                row[3] += estimated

    def _send_ends(self) -> None:
        ends, self._ends = self._ends, []
        usage, self._usage = self._usage, {}
        if not ends and not usage:
            return
        if len(self._calls) >= MAX_PENDING_ENDS:
            self.ends_dropped += len(ends)
            return
        command = Command()
        command.arg(len(usage))
        for name, row in usage.items():
            command.key(name)
            for value in row:
                command.arg(value)
        command.arg(len(ends))
        for ticket, used in ends:
            assert ticket is not None
            scopes = ticket.scopes
            n = len(scopes)
            command.arg(n)
            command.arg(ticket.lease)
            command.arg(used)
            command.arg(ticket.reserved if ticket.reserved else -1)
            command.encoded_args(scopes.end_args, 2 * n)
            command.encoded_keys(scopes.end_keys, 2 * n)
        call = self.client.submit(_END, command)
        self._calls.add(call)
        call.add_done_callback(lambda done: self._ended(done, len(ends)))

    def _ended(self, done: "asyncio.Future[Any]", count: int) -> None:
        self._calls.discard(done)
        failure = ConnectionError("cancelled") if done.cancelled() else done.exception()
        if failure is not None:
            self.ends_dropped += count
            self.circuit.failed("request end", failure)
        else:
            self.circuit.succeeded()

    def _refresh_leases(self) -> None:
        self._refresh = self.loop.call_later(LEASE_TTL / 3, self._refresh_leases)
        if not self.leases or not self.available:
            return
        command = Command()
        command.arg(int(LEASE_TTL * 1e6))
        for lease, held in self.leases.items():
            for key in held:
                command.key(key)
                command.arg(lease)
        call = self.client.submit(_REFRESH, command)
        self._calls.add(call)
        call.add_done_callback(self._refreshed)

    def _refreshed(self, done: "asyncio.Future[Any]") -> None:
        self._calls.discard(done)
        failure = ConnectionError("cancelled") if done.cancelled() else done.exception()
        if failure is not None:
            self.circuit.failed("lease refresh", failure)

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
