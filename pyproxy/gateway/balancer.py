"""Choosing a deployment: filter, priority, then weighted power-of-two-choices on load.

Pure: a function of the deployments' state, a clock reading and a random source.
The load of a deployment is Finagle's / Linkerd's peak-EWMA cost: its latency
estimate times its outstanding requests plus one. The estimate jumps up at once
to a slower observation (the "peak") and decays towards faster ones with a time
constant, so a deployment that turned slow is avoided at once and one that
recovered wins traffic back over a few seconds.
"""

from __future__ import annotations

import math
import random
from typing import Collection, List, Mapping, Optional, Sequence, Tuple

from pyproxy.gateway.config import Deployment
from pyproxy.gateway.state import UpstreamState

# Seconds over which old latency observations lose weight (Finagle's default decay).
EWMA_DECAY = 10.0
# Latency assumed for a deployment not measured yet, and the floor of every estimate:
# with a zero estimate the outstanding-requests term would count for nothing.
DEFAULT_RTT = 0.001


def observe_latency(state: UpstreamState, rtt: float, now: float) -> None:
    """Peak-EWMA update with one time to first byte."""
    ewma = state.ewma
    if ewma <= 0.0 or rtt > ewma:
        state.ewma = rtt
    else:
        elapsed = now - state.ewma_at
        weight = math.exp(-elapsed / EWMA_DECAY) if elapsed > 0.0 else 1.0
        state.ewma = ewma * weight + rtt * (1.0 - weight)
    state.ewma_at = now


def cost(state: UpstreamState, weight: float) -> float:
    ewma = state.ewma
    return (ewma if ewma > DEFAULT_RTT else DEFAULT_RTT) * (state.in_flight + 1) / weight


def is_uniform(deployments: Sequence[Deployment]) -> bool:
    """Two or more deployments of one weight and one priority tier: ``choose`` may draw
    its two first and filter only them (see there)."""
    first = deployments[0]
    return len(deployments) > 1 and all(d.weight == first.weight and d.priority == first.priority for d in deployments)


def _available(state: UpstreamState, now: float) -> bool:
    return not (state.ejected_until > now or state.cooling_until > now or state.in_flight >= state.max_connections)


def choose(
    deployments: Sequence[Deployment],
    states: Mapping[str, UpstreamState],
    now: float,
    rng: random.Random,
    tried: Collection[str] = (),
    uniform: bool = False,
) -> Optional[Deployment]:
    """Decide which deployment gets the next attempt (None: nothing is available; see
    ``soonest_recovery``).

    Dropped: deployments already tried for this request, ejected, cooling down after
    a 429, at their connection bound. Of the rest, the lowest priority tier; in it,
    two picked at random in proportion to weight, and the cheaper of the two. Written
    for the hot path: one pass, one small list, no allocation when one is left.

    ``uniform`` (``is_uniform(deployments)``, known beforehand): the two are drawn
    from all deployments first and only they are checked, as Finagle's P2C does;
    when either is unavailable, the full pass decides. Both ways every pair of
    available deployments is equally likely."""
    if uniform and not tried:
        count = len(deployments)
        i = int(rng.random() * count)
        j = int(rng.random() * (count - 1))
        first, second = deployments[i], deployments[j + 1 if j >= i else j]
        a, b = states[first.upstream], states[second.upstream]
        # _available and cost, written out: this is the hot path of every request.
        if not (
            a.ejected_until > now
            or a.cooling_until > now
            or a.in_flight >= a.max_connections
            or b.ejected_until > now
            or b.cooling_until > now
            or b.in_flight >= b.max_connections
        ):
            # One weight: compare latency x (outstanding + 1). The draw was in random
            # order, so on equal costs first is a fair pick.
            ewma_a = a.ewma if a.ewma > DEFAULT_RTT else DEFAULT_RTT
            ewma_b = b.ewma if b.ewma > DEFAULT_RTT else DEFAULT_RTT
            return first if ewma_a * (a.in_flight + 1) <= ewma_b * (b.in_flight + 1) else second
    tier = -1
    candidates: List[Deployment] = []
    for dep in deployments:
        if tried and dep.upstream in tried:
            continue
        if not _available(states[dep.upstream], now):
            continue
        if tier < 0 or dep.priority < tier:
            tier = dep.priority
            candidates = [dep]
        elif dep.priority == tier:
            candidates.append(dep)
    count = len(candidates)
    if count < 2:
        return candidates[0] if count else None
    if count == 2:
        first, second = candidates  # the two choices are these two
    else:
        first, second = _two_by_weight(candidates, rng)
    a, b = states[first.upstream], states[second.upstream]
    cost_a, cost_b = cost(a, first.weight), cost(b, second.weight)
    if cost_a == cost_b and count == 2:
        # Equal loads: by weight, as a draw of two from two would be.
        return first if rng.random() * (first.weight + second.weight) < first.weight else second
    return first if cost_a <= cost_b else second


def soonest_recovery(
    deployments: Sequence[Deployment], states: Mapping[str, UpstreamState], now: float, tried: Collection[str] = ()
) -> float:
    """Seconds until a deployment ``choose`` dropped may be chosen again (Retry-After)."""
    soonest = math.inf
    for dep in deployments:
        if dep.upstream in tried:
            continue
        state = states[dep.upstream]
        if state.ejected(now) or state.cooling(now):
            soonest = min(soonest, max(state.ejected_until, state.cooling_until) - now)
        elif state.full():
            soonest = min(soonest, 1.0)
    return soonest if soonest != math.inf else 1.0


def _two_by_weight(candidates: Sequence[Deployment], rng: random.Random) -> Tuple[Deployment, Deployment]:
    """Two distinct deployments, each drawn with probability in proportion to its weight."""
    total = 0.0
    weight = candidates[0].weight
    uniform = True
    for dep in candidates:
        total += dep.weight
        if dep.weight != weight:
            uniform = False
    if uniform:  # the common case: two distinct indices, uniformly
        count = len(candidates)
        i = int(rng.random() * count)
        j = int(rng.random() * (count - 1))
        return candidates[i], candidates[j + 1 if j >= i else j]
    first = _draw(candidates, total, rng, None)
    second = _draw(candidates, total - first.weight, rng, first)
    return first, second


def _draw(candidates: Sequence[Deployment], total: float, rng: random.Random, skip: Optional[Deployment]) -> Deployment:
    point = rng.random() * total
    last = candidates[0]
    for dep in candidates:
        if dep is skip:
            continue
        last = dep
        point -= dep.weight
        if point < 0:
            return dep
    return last
