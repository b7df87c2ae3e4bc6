"""
Wait reasons alone, over plain values: which queued jobs the holders say
no holder could ever take, in what words, and how often a verdict is made.
"""

from dispatcher.core._reasons import (
    MAX_REASONS,
    explainer,
    unconfigured_queue,
    unplaceable,
)
from dispatcher.model._jobs import Job, JobSpec, JobState, Offer, Resources

QUEUES = {"default": 0}


def queued(spec=None, state=JobState.QUEUED, reason=None, job_id="j1"):
    """A job as the store gives it, queued unless told otherwise."""
    spec = spec if spec is not None else JobSpec(command=("true",))
    return Job(job_id, state, spec, 0.0, wait_reason=reason)


class Counting(Offer):
    """An offer that counts how often it is asked whether it refuses a spec."""

    asked = 0

    def refuses(self, spec):
        Counting.asked += 1
        return super().refuses(spec)


def test_no_offers_is_the_no_holder_reason():
    """With no holder at all, every spec gets the reason that says no
    worker is connected and the dispatcher runs none itself."""
    reason = unplaceable(JobSpec(command=("true",)), [])
    assert reason == (
        "no worker is connected and this dispatcher runs no jobs itself "
        "([executor] slots = 0)"
    )


def test_one_holder_that_could_take_it_is_enough():
    """A spec that one holder of several could run has no reason, whatever
    the others lack."""
    spec = JobSpec(command=("true",), requirements={"site": "b"})
    offers = [Offer("a", 1, labels={"site": "a"}), Offer("b", 1, labels={"site": "b"})]
    assert unplaceable(spec, offers) is None


def test_every_refusal_is_named_up_to_three_then_counted():
    """The reason names each holder with what it lacks, the first three of
    them, and counts the rest."""
    spec = JobSpec(command=("true",), requirements={"site": "z"})
    offers = [Offer(f"w{i}", 1, labels={"site": "a"}) for i in range(5)]
    assert unplaceable(spec, offers) == (
        "no connected worker can take it: w0 lacks the label site=z; "
        "w1 lacks the label site=z; w2 lacks the label site=z; and 2 more"
    )
    assert unplaceable(spec, offers[:3]).endswith("w2 lacks the label site=z")


def test_resources_and_tasks_are_reasons_too():
    """A holder too small, or that does not know the task, says which."""
    big = JobSpec(command=("true",), resources=Resources(cpus=8.0))
    assert unplaceable(big, [Offer("a", 1, Resources(cpus=4.0))]) == (
        "no connected worker can take it: a has 4 CPUs, not 8"
    )
    task = JobSpec(task="render")
    assert unplaceable(task, [Offer("a", 1, tasks=frozenset({"other"}))]) == (
        "no connected worker can take it: a does not know the task 'render'"
    )


def test_a_job_that_fits_comes_back_as_it_is():
    """A queued job some holder could take is returned unchanged, the same
    object, so an answer need not be rebuilt."""
    job = queued()
    assert explainer([Offer("local", 1)], QUEUES)(job) is job


def test_only_queued_jobs_are_explained():
    """A job in any other state keeps its reason, even where no holder
    could take it."""
    explain = explainer([], QUEUES)
    for state in JobState:
        if state is JobState.QUEUED:
            continue
        job = queued(state=state)
        assert explain(job) is job
    assert explain(queued()).wait_reason == unplaceable(JobSpec(command=("true",)), [])


def test_a_job_no_holder_could_take_says_why():
    """A queued job no holder could take gets the holders' reason, and keeps
    everything else it had."""
    spec = JobSpec(command=("true",), requirements={"gpu": "yes"})
    job = queued(spec, reason="it is queued")
    explained = explainer([Offer("local", 2)], QUEUES)(job)
    assert explained.wait_reason == (
        "no connected worker can take it: local lacks the label gpu=yes"
    )
    assert (explained.id, explained.state, explained.spec) == (job.id, job.state, spec)


def test_an_unconfigured_queue_is_the_reason_before_any_holder():
    """A job whose queue is not configured says so, even when a holder
    could run it."""
    job = queued(JobSpec(command=("true",), queue="gpu"))
    explained = explainer([Offer("local", 1)], QUEUES)(job)
    assert explained.wait_reason == unconfigured_queue("gpu")
    assert explained.wait_reason.startswith("its queue gpu is not in the configuration")


def test_a_reason_already_given_is_not_given_again():
    """A job that already carries the reason it would get is returned as
    it is."""
    spec = JobSpec(command=("true",), requirements={"site": "z"})
    offers = [Offer("a", 1)]
    job = queued(spec, reason=unplaceable(spec, offers))
    assert explainer(offers, QUEUES)(job) is job


def test_jobs_that_need_the_same_are_judged_once():
    """The holders are asked once per kind of need (task, resources,
    requirements), however many jobs share it."""
    Counting.asked = 0
    explain = explainer([Counting("a", 1)], QUEUES)
    same = JobSpec(command=("true",), requirements={"site": "z"})
    for i in range(10):
        explain(queued(same, job_id=f"j{i}"))
    assert Counting.asked == 1
    explain(queued(JobSpec(command=("true",), resources=Resources(gpus=1))))
    assert Counting.asked == 2


def test_the_verdicts_remembered_are_bounded():
    """Past C{max_reasons} kinds of need, the verdicts are forgotten and
    made again, and they stay right."""
    Counting.asked = 0
    explain = explainer([Counting("a", 1)], QUEUES, max_reasons=2)
    specs = [JobSpec(command=("true",), requirements={"n": str(i)}) for i in range(3)]
    for spec in specs:
        explain(queued(spec))
    assert Counting.asked == 3
    # The first verdict went when the third was made.
    again = explain(queued(specs[0]))
    assert Counting.asked == 4
    assert again.wait_reason == "no connected worker can take it: a lacks the label n=0"
    assert MAX_REASONS >= 2
