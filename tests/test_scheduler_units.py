"""Scheduler arithmetic that needs no network: D13 and the body cache."""
from impetus.scheduler import BodyCache, max_retries_auto


def test_max_retries_auto_counts_doubling_intervals_inside_expiration():
    # 1200+2400+4800+9600+19200+38400 = 75600 <= 86400; the next (43200 cap) overflows
    assert max_retries_auto(1200, 43200, 86400) == 6
    # vendor example: intervals capped at 1200 -> 72 fit in a day
    assert max_retries_auto(1200, 1200, 86400) == 72
    assert max_retries_auto(1200, 43200, 1000) == 0
    assert max_retries_auto(1, 43200, 3) == 2   # 1 + 2 = 3 fits; + 4 would not


def test_body_cache_is_bounded():
    c = BodyCache(limit_bytes=1000)
    for i in range(10):
        c.put(str(i), b"x" * 200)
    assert c.size <= 1000
    assert c.get("9") == b"x" * 200 and c.get("0") is None
    c.drop("9")
    assert c.get("9") is None


def test_connection_allocation_aggressiveness():
    from impetus.scheduler import should_open_connection as grow
    assert not grow(0, 0, 0, 32, "normal")            # nothing to send
    assert grow(5, 0, 0, 32, "normal")                # first connection
    assert not grow(5, 1, 1, 32, "normal")            # normal: one being set up at a time
    assert grow(5, 1, 0, 32, "normal")                # ...then the next
    assert grow(5, 3, 3, 32, "high")                  # high: one per waiting message
    assert not grow(3, 3, 3, 32, "high")
    assert not grow(50, 2, 0, 2, "high")              # Max_Outbound_Connections
    assert grow(50, 100, 0, 0, "normal")              # 0 = no limit


def test_take_batch_from_an_emptied_queue_returns_nothing():
    """Two workers may route/connect at once; the second finds the queue empty."""
    from impetus.scheduler import DomainQueue, Scheduler
    q = DomainQueue("default", "example.test")
    assert Scheduler._take_batch(None, q, 10) == []
