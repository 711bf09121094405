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
    if state.ewma <= 0.0 or rtt > state.ewma:
        state.ewma = rtt
    else:
        weight = math.exp(-max(0.0, now - state.ewma_at) / EWMA_DECAY)
        state.ewma = state.ewma * weight + rtt * (1.0 - weight)
    state.ewma_at = now


def cost(state: UpstreamState, weight: float) -> float:
    return max(state.ewma, DEFAULT_RTT) * (state.in_flight + 1) / weight


def choose(
    deployments: Sequence[Deployment],
    states: Mapping[str, UpstreamState],
    now: float,
    rng: random.Random,
    tried: Collection[str] = (),
) -> Optional[Deployment]:
    """Decide which deployment gets the next attempt (None: nothing is available; see
    ``soonest_recovery``).

    Dropped: deployments already tried for this request, ejected, cooling down after
    a 429, at their connection bound. Of the rest, the lowest priority tier; in it,
    two picked at random in proportion to weight, and the cheaper of the two. Written
    for the hot path: one pass, one small list, no allocation when one is left."""
    tier = -1
    candidates: List[Deployment] = []
    for dep in deployments:
        if tried and dep.upstream in tried:
            continue
        state = states[dep.upstream]
        if state.ejected_until > now or state.cooling_until > now or state.in_flight >= state.max_connections:
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
    for dep in candidates:
        total += dep.weight
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
