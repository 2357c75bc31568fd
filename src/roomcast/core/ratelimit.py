"""Token buckets: ``rate`` requests a second, bursts up to ``burst`` — one per connection,
or one per caller of the REST API (:class:`Buckets`)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.stamp = self.clock()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty (the request is refused)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Buckets:
    """A :class:`TokenBucket` per key (a caller without a connection: a token's user, a
    client address), for at most ``most`` keys: the least recently seen is forgotten first,
    so a node called by millions of addresses keeps ``most`` buckets. ``rate`` 0: no limit."""

    def __init__(self, rate: float, burst: int, most: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.most = most
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str) -> bool:
        """Spend one of ``key``'s tokens; False when its bucket is empty."""
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.most:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)
