"""
The claim policy alone, over plain values: which queued jobs a holder gets
(priority, queue turns, queue limits, resource fit, requirements), and how
little of the queues it reads.
"""

from operator import itemgetter

from dispatcher.model._claims import (
    MAX_SKIPPED,
    choose_jobs,
    queues_at_limit,
    room_in_queues,
)
from dispatcher.model._jobs import JobSpec, Offer, Resources

PRIORITY = itemgetter(0)
SPEC = itemgetter(2)


def job(name, priority=0, **kw):
    """A candidate row: its priority, a name to tell it by, its spec."""
    return (priority, name, JobSpec(command=("true",), priority=priority, **kw))


class Counted:
    """An iterator over rows that counts how many were read."""

    def __init__(self, rows):
        self.rows = iter(rows)
        self.read = 0

    def __iter__(self):
        return self

    def __next__(self):
        row = next(self.rows)
        self.read += 1
        return row


def choose(queued, capacity, queues=None, turn=0, room=None, offer=None, free=None, **kw):
    queues = queues if queues is not None else sorted(queued)
    iterators = {q: iter(rows) for q, rows in queued.items()}
    room = room if room is not None else {q: capacity for q in queued}
    offer = offer if offer is not None else Offer("h", capacity)
    free = free if free is not None else offer.resources
    return choose_jobs(iterators, room, queues, turn, offer, free, capacity,
                       PRIORITY, SPEC, **kw)


def names(choice):
    return [row[1] for row, _ in choice.chosen]


def test_highest_priority_first_then_in_order():
    """Within a queue the rows come best first; the policy keeps that order
    and stops at the capacity, leaving the queue not drained."""
    rows = [job("a", 5), job("b", 5), job("c", 0)]
    choice = choose({"default": rows}, 2)
    assert names(choice) == ["a", "b"]
    assert choice.taken == {"default": 2}
    assert not choice.drained
    assert [spec for _, spec in choice.chosen] == [rows[0][2], rows[1][2]]


def test_a_higher_priority_in_another_queue_goes_first():
    """Across queues the highest priority wins, whatever the turn."""
    choice = choose({"a": [job("a1", 0)], "b": [job("b1", 7)]}, 1, turn=0)
    assert names(choice) == ["b1"]


def test_queues_take_turns_among_equal_priorities():
    """Among equal priorities the queues take turns, starting at the given
    turn, and the turn returned is the queue after the one served last."""
    queued = {"a": [job(f"a{i}") for i in range(5)], "b": [job("b0"), job("b1")],
              "c": [job("c0")]}
    choice = choose(queued, 5, queues=["a", "b", "c"], turn=1)
    assert names(choice) == ["b0", "c0", "a0", "b1", "a1"]
    assert choice.turn == 1
    again = choose({"a": [job("a0")], "b": [job("b0")]}, 1, queues=["a", "b"], turn=1)
    assert names(again) == ["b0"] and again.turn == 0


def test_one_queue_keeps_its_turn():
    """With a single queue configured there are no turns to move."""
    choice = choose({"default": [job("x"), job("y")]}, 2, queues=["default"], turn=0)
    assert choice.turn == 0 and names(choice) == ["x", "y"]


def test_a_queue_gives_no_more_than_its_room():
    """A queue with room for one job gives one and the others go on; the
    queue left with jobs is not drained."""
    queued = {"gpu": [job("g0"), job("g1")], "default": [job("d0"), job("d1")]}
    choice = choose(queued, 4, room={"gpu": 1, "default": 4})
    assert sorted(names(choice)) == ["d0", "d1", "g0"]
    assert choice.taken == {"gpu": 1, "default": 2}
    assert not choice.drained


def test_jobs_that_do_not_fit_the_free_resources_are_passed_over():
    """A job asking for more than the holder has free is passed over and
    counted; each job taken uses up the free resources for the next."""
    big = job("big", resources=Resources(cpus=4))
    half = [job(f"half{i}", resources=Resources(cpus=1, memory_mb=512)) for i in range(3)]
    offer = Offer("h", 8, Resources(cpus=2, memory_mb=2048))
    choice = choose({"default": [big, *half]}, 8, offer=offer)
    assert names(choice) == ["half0", "half1"]
    assert choice.skipped == 2
    assert not choice.drained
    partly = choose({"default": [half[0]]}, 8, offer=offer, free=Resources(cpus=0.5))
    assert names(partly) == [] and partly.skipped == 1


def test_requirements_and_tasks_are_met_or_passed_over():
    """A job whose requirements the holder's labels do not meet, or whose
    task it does not know, is passed over; a holder that has them takes it."""
    needs = job("needs", requirements={"site": "x"})
    task = (0, "task", JobSpec(task="t"))
    plain = job("plain")
    choice = choose({"default": [needs, task, plain]}, 3,
                    offer=Offer("h", 3, tasks=frozenset()))
    assert names(choice) == ["plain"] and choice.skipped == 2
    fits = choose({"default": [needs, task, plain]}, 3,
                  offer=Offer("h", 3, labels={"site": "x"}, tasks=frozenset({"t"})))
    assert names(fits) == ["needs", "task", "plain"] and fits.drained


def test_reads_only_as_far_as_it_needs():
    """The queues are read lazily: one row past the last taken at most, and
    a spec is made only for the rows taken off a queue's head."""
    rows = Counted([job(f"r{i}") for i in range(1000)])
    made = []

    def spec_of(row):
        made.append(row[1])
        return row[2]

    choice = choose_jobs({"default": rows}, {"default": 3}, ["default"], 0,
                         Offer("h", 3), Resources(), 3, PRIORITY, spec_of)
    assert names(choice) == ["r0", "r1", "r2"]
    assert rows.read == 4 and made == ["r0", "r1", "r2"]


def test_passing_over_is_bounded():
    """A claim gives up after passing over max_skipped jobs, however many
    more are queued."""
    rows = Counted([job(f"r{i}", requirements={"site": "x"}) for i in range(5000)])
    choice = choose_jobs({"default": rows}, {"default": 1}, ["default"], 0,
                         Offer("h", 1), Resources(), 1, PRIORITY, SPEC)
    assert choice.chosen == [] and choice.skipped == MAX_SKIPPED
    assert rows.read == MAX_SKIPPED + 1
    assert not choice.drained


def test_drained_when_every_queue_was_read_to_its_end():
    """Taking every job of every queue read, passing none over, drains."""
    choice = choose({"a": [job("a0")], "b": [job("b0")]}, 5)
    assert sorted(names(choice)) == ["a0", "b0"] and choice.drained
    empty = choose({}, 5, queues=["default"])
    assert empty.chosen == [] and empty.drained


def test_room_in_queues():
    """A queue without a limit has room for the whole claim; one with a
    limit has what is left under it, none when at or over it."""
    room = room_in_queues(["a", "b", "c", "d"], {"a": 0, "b": 3, "c": 2, "d": 1},
                          {"b": 1, "c": 2, "d": 5}, 4)
    assert room == {"a": 4, "b": 2, "c": 0, "d": -4}


def test_queues_at_limit():
    """Only the queues with a limit that their running jobs have reached
    are at their limit."""
    assert queues_at_limit({"a": 0, "b": 2, "c": 2}, {"a": 9, "b": 2, "c": 1}) == {"b": 2}
