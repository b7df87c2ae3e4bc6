"""
Model values: ids, times, transitions and outcomes.
"""

import datetime
import uuid

from hypothesis import given, strategies as st

from dispatcher.model._jobs import (
    FINAL_STATES,
    JobIds,
    JobState,
    Outcome,
    format_time,
    may_transition,
)


def test_ids_are_uuid7_and_ordered():
    """Ids are version-7 UUIDs, unique, and sort in the order they were made,
    within one millisecond and across a clock that steps back."""
    now = [1_800_000_000.0]
    ids = JobIds(lambda: now[0])
    made = [ids.new() for _ in range(5000)]
    now[0] -= 10
    made += [ids.new() for _ in range(10)]
    now[0] += 20
    made += [ids.new() for _ in range(10)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    for text in made[:10]:
        assert uuid.UUID(text).version == 7
    first = uuid.UUID(made[0]).int >> 80
    assert first == 1_800_000_000_000


def test_ids_made_together_are_those_made_one_by_one():
    """new_many() gives ids in the same order and form as new(): version-7,
    RFC 4122 variant, the text str(UUID) gives, later than every id made
    before, also past the 4,096 a millisecond holds and across a clock that
    steps back."""
    now = [1_800_000_000.0]
    ids = JobIds(lambda: now[0])
    made = [ids.new()] + ids.new_many(5000) + [ids.new()]
    now[0] -= 10
    made += ids.new_many(3)
    now[0] += 20
    made += ids.new_many(3) + [ids.new()]
    assert len(set(made)) == len(made) == 5009
    assert made == sorted(made)
    for text in made:
        value = uuid.UUID(text)
        assert str(value) == text
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
    stamps = [uuid.UUID(text).int >> 80 for text in made]
    assert stamps[0] == 1_800_000_000_000
    # 5,000 ids do not fit one millisecond's counter: later ones borrow the
    # next millisecond rather than wrap.
    assert stamps[5001] > stamps[0]
    assert stamps[-1] == 1_800_000_010_000
    assert ids.new_many(0) == []


def test_times_are_rfc3339_utc_with_microseconds():
    """Times show as RFC 3339 UTC with six fractional digits."""
    assert format_time(0.5) == "1970-01-01T00:00:00.500000Z"
    assert format_time(None) is None


@given(st.floats(min_value=-2e9, max_value=4e9) | st.integers(0, 4 * 10**15).map(lambda n: n / 2e6))
def test_times_round_as_datetime_does(when):
    """The formatted time is what datetime's strftime gives, to the rounded
    microsecond, across second boundaries, half microseconds and times
    before 1970."""
    expected = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    assert format_time(when) == expected


def test_final_states_change_only_by_retry():
    """No transition leaves a final state; active states can go back to queued."""
    for state in FINAL_STATES:
        assert not any(may_transition(state, t) for t in JobState)
    assert may_transition(JobState.RUNNING, JobState.QUEUED)
    assert not may_transition(JobState.QUEUED, JobState.SUCCEEDED)


def test_outcome_from_exit_code():
    """Exit 0 succeeds; other codes and signals fail with words."""
    assert Outcome.from_exit_code(0).state is JobState.SUCCEEDED
    assert Outcome.from_exit_code(2).error == "exited with code 2"
    assert Outcome.from_exit_code(-9).error == "killed by signal 9"
