"""The live Feed as the controller sees it: inputs in order, results routed to their request exactly once."""

import threading

import numpy as np
import pytest

from dnnpipe.service.feed import LiveFeed, Refused


def rows(n, start=0):
    return [[np.full(2, start + i, np.float32)] for i in range(n)]


def test_requests_are_numbered_in_arrival_order_and_answered_once():
    feed = LiveFeed(capacity=8)
    a, b = feed.submit(rows(2)), feed.submit(rows(1, 10))
    assert feed.depth == 3 and feed.inflight == 0
    taken = [feed.wait_input(k, 0.01) for k in range(3)]
    assert [t[0][0] for t in taken] == [0, 1, 10]
    assert feed.wait_input(3, 0.01) is None and not feed.exhausted(3)
    assert feed.depth == 0 and feed.inflight == 3
    feed.deliver(2, [np.array([7.0])])
    assert b.wait(0) and b.error is None and b.results[0][0][0] == 7.0
    feed.deliver(1, [np.array([2.0])])
    assert not a.wait(0)
    feed.deliver(0, [np.array([1.0])])
    assert a.wait(0) and [r[0][0] for r in a.results] == [1.0, 2.0]
    feed.deliver(0, [np.array([9.0])])  # a second delivery changes nothing
    assert a.results[0][0][0] == 1.0


def test_a_full_queue_refuses_and_drain_ends_the_inputs():
    feed = LiveFeed(capacity=2)
    ticket = feed.submit(rows(2))
    with pytest.raises(Refused, match="queue is full"):
        feed.submit(rows(1))
    feed.drain()
    with pytest.raises(Refused, match="shutting down"):
        feed.submit(rows(1))
    assert feed.wait_input(1, 5) is not None  # accepted inputs are still served
    assert feed.wait_input(2, 5) is None and feed.exhausted(2)
    feed.abandon(0, "no plan left")
    assert ticket.wait(0) and ticket.status == 503 and "no plan left" in ticket.error


def test_a_waiting_pipeline_wakes_when_a_request_arrives():
    feed = LiveFeed(capacity=4)
    got = []
    waiter = threading.Thread(target=lambda: got.append(feed.wait_input(0, 10)))
    waiter.start()
    feed.submit(rows(1, 5))
    waiter.join(10)
    assert got and got[0][0][0] == 5


def test_expired_and_failed_requests_answer_once():
    feed = LiveFeed(capacity=4)
    late, stuck = feed.submit(rows(1)), feed.submit(rows(1))
    late.expire(504, "too late")
    feed.deliver(0, [np.array([1.0])])
    assert late.status == 504 and late.error == "too late"
    feed.fail_all(503, "the pipeline stopped")
    assert stuck.wait(0) and stuck.status == 503
    assert feed.submit(rows(4))  # failed requests no longer hold the queue


def test_after_shutting_down_every_input_not_held_is_exhausted():
    feed = LiveFeed(capacity=4)
    feed.submit(rows(2))
    feed.drain()
    assert not feed.exhausted(0) and not feed.exhausted(1) and feed.exhausted(2)
    feed.fail_all(503, "the service is shutting down")  # the pipeline still running must stop, not spin
    assert feed.exhausted(0) and feed.wait_input(0, 0) is None


def test_gauges_count_only_inputs_still_held_after_failures():
    """Inputs failed before the pipeline took them leave the queue depth (it stayed up, in-flight went negative)."""
    feed = LiveFeed(capacity=8)
    feed.submit(rows(3))
    assert feed.wait_input(0, 0) is not None
    assert (feed.depth, feed.inflight) == (2, 1)
    feed.abandon(2, "never taken")
    assert (feed.depth, feed.inflight) == (1, 1)
    feed.fail_all(503, "the pipeline stopped")
    assert (feed.depth, feed.inflight) == (0, 0)
