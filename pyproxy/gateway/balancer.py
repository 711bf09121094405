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
from typing import Collection, Mapping, Optional, Sequence, Tuple

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


class Choice:
    __slots__ = ("deployment", "retry_after")

    def __init__(self, deployment: Optional[Deployment], retry_after: float) -> None:
        self.deployment = deployment  # None: nothing available
        self.retry_after = retry_after  # seconds until the soonest recovery, when None


def choose(
    deployments: Sequence[Deployment],
    states: Mapping[str, UpstreamState],
    now: float,
    rng: random.Random,
    tried: Collection[str] = (),
) -> Choice:
    """Decide which deployment gets the next attempt.

    Dropped: deployments already tried for this request, ejected, cooling down after
    a 429, at their connection bound. Of the rest, the lowest priority tier; in it,
    two picked at random in proportion to weight, and the cheaper of the two."""
    available = []
    soonest = math.inf
    for dep in deployments:
        if dep.upstream in tried:
            continue
        state = states[dep.upstream]
        if state.ejected(now) or state.cooling(now):
            soonest = min(soonest, max(state.ejected_until, state.cooling_until) - now)
            continue
        if state.full():
            soonest = min(soonest, 1.0)
            continue
        available.append(dep)
    if not available:
        return Choice(None, soonest if soonest != math.inf else 1.0)
    tier = min(dep.priority for dep in available)
    candidates = [dep for dep in available if dep.priority == tier]
    if len(candidates) == 1:
        return Choice(candidates[0], 0.0)
    first, second = _two_by_weight(candidates, rng)
    a, b = states[first.upstream], states[second.upstream]
    return Choice(first if cost(a, first.weight) <= cost(b, second.weight) else second, 0.0)


def _two_by_weight(candidates: Sequence[Deployment], rng: random.Random) -> Tuple[Deployment, Deployment]:
    """Two distinct deployments, each drawn with probability in proportion to its weight."""
    total = sum(dep.weight for dep in candidates)
    first = _draw(candidates, total, rng)
    rest = [dep for dep in candidates if dep is not first]
    second = _draw(rest, total - first.weight, rng)
    return first, second


def _draw(candidates: Sequence[Deployment], total: float, rng: random.Random) -> Deployment:
    point = rng.random() * total
    for dep in candidates:
        point -= dep.weight
        if point < 0:
            return dep
    return candidates[-1]
