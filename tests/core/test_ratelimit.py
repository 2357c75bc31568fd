from roomcast.core.ratelimit import Buckets, TokenBucket


def test_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token back at 2 a second
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_buckets_rate_each_caller_and_forget_the_least_recently_seen():
    buckets = Buckets(rate=0.001, burst=2, most=2)
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    assert buckets.take("b")
    assert not buckets.take("a")  # seen again: now b is the least recently seen
    assert buckets.take("c")  # a third caller: b is forgotten
    assert len(buckets) == 2
    assert not buckets.take("a")  # a kept its empty bucket
    assert [buckets.take("b") for _ in range(3)] == [True, True, False]  # b starts afresh
    assert all(Buckets(rate=0, burst=1, most=1).take("a") for _ in range(100))  # 0: no limit
