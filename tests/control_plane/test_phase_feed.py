"""The reader's place in the feed of every job's phase changes (`phase_feed.FeedCursor`): an event that
commits late, below ids already delivered, is still new for `LOOK_BACK_SECONDS`, and none is new twice."""

from __future__ import annotations

from stillhouse.control_plane.phase_feed import LOOK_BACK_SECONDS, FeedCursor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_late_event_below_the_position_is_new_until_the_look_back_has_passed():
    clock = Clock()
    cursor = FeedCursor(10, clock=clock)
    cursor.tick()
    for event_id in (11, 13):  # 12 has not committed yet
        assert cursor.is_new(event_id)
        cursor.delivered(event_id)
    assert cursor.position == 13 and not cursor.is_new(13) and not cursor.is_new(10)

    clock.now += LOOK_BACK_SECONDS / 2
    cursor.tick()
    assert cursor.settled == 10 and cursor.is_new(12) and not cursor.is_new(11)
    cursor.delivered(12)
    assert cursor.position == 13 and not cursor.is_new(12)

    clock.now += LOOK_BACK_SECONDS
    cursor.tick()
    clock.now += 1
    cursor.tick()
    assert cursor.settled == 13 and cursor.delivered_since_settled == set()
    assert not cursor.is_new(12) and cursor.is_new(14)
