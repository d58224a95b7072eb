"""The controller's ledger against a simulated FIFO pipeline that fails at random points."""

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnpipe.serve.delivery import DeliveryError, Ledger


def simulate(total: int, window: int, stored: int, actions: list[int]) -> tuple[list[int], int]:
    """Drive the ledger with a pipeline that may lose everything in flight (a switch) at any step, and whose
    old connection may still deliver results after the switch. Returns the inputs stored, in order, and the
    largest number of inputs ever in flight."""
    ledger = Ledger(total, window, stored)
    pipe: deque = deque()  # (epoch, wire sequence, input) in FIFO order, as the stages hold them
    stale: deque = deque()  # results still arriving on a connection a switch closed
    out: list[int] = []
    peak = 0
    steps = iter(actions)
    for _ in range(100 * (total + 1) + len(actions)):
        if ledger.done:
            break
        action = next(steps, 0)  # after the random prefix: send and deliver until done
        if action == 0:  # the source sends what the window allows
            wire = ledger.wire_sequence
            index = ledger.next_input()
            if index is not None:
                pipe.append((ledger.epoch, wire, index))
            elif pipe:
                action = 1
        if action == 1 and pipe:  # the last stage returns the oldest result
            epoch, wire, index = pipe.popleft()
            got = ledger.result(epoch, wire)
            assert got in (None, index)
            if got is not None:
                out.append(got)
        elif action == 2:  # a device fails: the pipeline's contents are lost, some still trickle in
            stale.extend(pipe)
            pipe.clear()
            ledger.switch()
        elif action == 3 and stale:  # a late result from before the switch
            epoch, wire, _ = stale.popleft()
            assert ledger.result(epoch, wire) is None
        peak = max(peak, ledger.in_flight, len(pipe))
    assert ledger.done, f"not finished: stored up to {ledger.first_unstored} of {total}"
    return out, peak


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 40), window=st.integers(1, 6), data=st.data(),
       actions=st.lists(st.integers(0, 3), max_size=200))
def test_every_result_stored_exactly_once_in_order(total, window, data, actions):
    stored = data.draw(st.integers(0, total))
    out, peak = simulate(total, window, stored, actions)
    assert out == list(range(stored, total))
    assert peak <= window


def test_window_bounds_what_is_sent():
    ledger = Ledger(10, 3)
    assert [ledger.next_input() for _ in range(5)] == [0, 1, 2, None, None]
    assert ledger.result(0, 0) == 0
    assert ledger.next_input() == 3


def test_switch_replays_from_the_first_unstored_input():
    ledger = Ledger(6, 4)
    for _ in range(4):
        ledger.next_input()
    assert ledger.result(0, 0) == 0 and ledger.result(0, 1) == 1
    epoch = ledger.switch()
    assert epoch == 1 and ledger.wire_sequence == 0
    assert [ledger.next_input() for _ in range(4)] == [2, 3, 4, 5]
    assert ledger.result(0, 2) is None  # a late result of the closed connection
    assert [ledger.result(1, k) for k in range(4)] == [2, 3, 4, 5]
    assert ledger.done and ledger.stored == 6


def test_a_result_out_of_order_is_an_error():
    ledger = Ledger(4, 4)
    ledger.next_input()
    with pytest.raises(DeliveryError, match="result 1 of epoch 0 where 0 was expected"):
        ledger.result(0, 1)
    ledger.next_input()
    ledger.result(0, 0), ledger.result(0, 1)
    with pytest.raises(DeliveryError):
        ledger.result(0, 2)  # nothing in flight


def test_resume_skips_what_is_stored():
    ledger = Ledger(5, 2, stored=3)
    assert [ledger.next_input(), ledger.next_input(), ledger.next_input()] == [3, 4, None]
    assert Ledger(3, 1, stored=3).done
    with pytest.raises(ValueError):
        Ledger(3, 0)


def simulate_routes(total: int, window: int, stored: int, actions: list[int], live: bool,
                    anywhere: bool = False) -> list[int]:
    """As `simulate`, with the controller's routes: a planned switch (action 4) opens a new route behind the old
    one (the old drains first, the epoch stays), a device loss (2) cuts every route and starts a new epoch, at
    any point, also while a planned switch is draining. With `live`, the total is learnt only when the feed runs
    dry (a live feed). With `anywhere`, the newest route's results may come before the older routes drained
    (action 5); then the inputs stored are returned sorted (each route is FIFO, the routes are not)."""
    ledger = Ledger(None if live else total, window, stored)
    routes: list[deque] = [deque()]  # each route: (epoch, wire sequence, input) in FIFO order
    stale: deque = deque()
    out: list[int] = []
    steps = iter(actions)
    for _ in range(100 * (total + 1) + len(actions)):
        if ledger.done:
            break
        action = next(steps, 0)
        if action == 0:
            if live and ledger.total is None and ledger.peek() is not None and ledger.peek() >= total:
                ledger.end_at(total)  # the feed says input `total` will never come
            wire, index = ledger.wire_sequence, ledger.next_input()
            if index is not None:
                routes[-1].append((ledger.epoch, wire, index))
            elif any(routes):
                action = 1
        if action in (1, 5):  # the oldest route's next result, or (5) the newest route's, ahead of the old
            while len(routes) > 1 and not routes[0]:
                routes.pop(0)  # its END came through
            route = routes[-1] if action == 5 and routes[-1] else routes[0]
            if route:
                epoch, wire, index = route.popleft()
                got = ledger.result(epoch, wire)
                assert got in (None, index)
                if got is not None:
                    out.append(got)
        elif action == 2:
            for route in routes:
                stale.extend(route)
            routes = [deque()]
            ledger.switch()
        elif action == 3 and stale:
            epoch, wire, _ = stale.popleft()
            assert ledger.result(epoch, wire) is None
        elif action == 4:
            routes.append(deque())
            ledger.barrier()
    assert ledger.done, f"not finished: stored up to {ledger.first_unstored} of {total}"
    return sorted(out) if anywhere else out


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 40), window=st.integers(1, 6), data=st.data(), live=st.booleans(),
       actions=st.lists(st.integers(0, 4), max_size=200))
def test_exactly_once_across_barrier_switches_and_faults_during_them(total, window, data, live, actions):
    stored = data.draw(st.integers(0, total))
    assert simulate_routes(total, window, stored, actions, live) == list(range(stored, total))


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 40), window=st.integers(1, 6), data=st.data(), live=st.booleans(),
       actions=st.lists(st.integers(0, 5), max_size=200))
def test_exactly_once_when_the_new_routes_results_overtake_the_old(total, window, data, live, actions):
    stored = data.draw(st.integers(0, total))
    assert simulate_routes(total, window, stored, actions, live, anywhere=True) == list(range(stored, total))


def test_a_new_route_frees_its_credits_before_the_old_route_drained():
    ledger = Ledger(10, 4)
    assert [ledger.next_input() for _ in range(3)] == [0, 1, 2]  # the old route
    ledger.barrier()
    assert ledger.next_input() == 3 and ledger.next_input() is None
    assert ledger.result(0, 3) == 3 and ledger.in_flight == 3  # the new route's first result, ahead of 0..2
    assert ledger.next_input() == 4  # its credit is free at once
    with pytest.raises(DeliveryError, match="result 5 of epoch 0 where 4 was expected"):
        ledger.result(0, 5)  # a gap inside one route
    with pytest.raises(DeliveryError, match="result 1 of epoch 0 where 0 was expected"):
        ledger.result(0, 1)
    assert [ledger.result(0, k) for k in (0, 1, 2, 4)] == [0, 1, 2, 4]
    assert ledger.first_unstored == 5 and ledger.in_flight == 0


def test_a_live_feed_ends_when_exhausted():
    ledger = Ledger(None, 4)
    assert ledger.next_input() == 0 and not ledger.done
    ledger.end_at(1)
    assert ledger.next_input() is None and ledger.result(0, 0) == 0 and ledger.done
    with pytest.raises(DeliveryError):
        Ledger(None, 4, stored=3).end_at(2)
