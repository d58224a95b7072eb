"""serve.roles: the role lines of a switch, the links that stay named by the running generation."""

from __future__ import annotations

from dnnpipe.runtime.agent import check_role
from dnnpipe.serve.roles import Running, role_messages

ADDRESS = {0: ("controller", 9000), 1: ("one", 5001), 2: ("two", 5002), 3: ("three", 5003)}


def roles(stages, abort=False, running=None, idle=()):
    return role_messages(7, stages, abort, running, ADDRESS.__getitem__, lambda d, units: 1.5 * d, idle)


def test_each_stage_is_told_its_units_neighbours_and_where_to_send():
    (d1, first), (d2, second), (d3, idle) = roles(((1, 10, 2), (11, 20, 1)), idle=(1, 2, 3))
    assert (d1, d2, d3) == (2, 1, 3)
    assert first == {"kind": "role", "generation": 7, "stage": 1, "units": [1, 10], "from": 0, "to": 1,
                     "host": "one", "port": 5001, "pace": 3.0, "abort": False, "keep_from": None, "keep_to": None}
    assert (second["from"], second["to"], second["host"], second["port"]) == (2, 0, "controller", 9000)
    assert idle == {"kind": "role", "generation": 7, "units": None, "abort": False}
    for _, message in roles(((1, 10, 2), (11, 20, 1)), idle=(3,)):  # every line passes the agent's check
        check_role(message, 20, "test")


def test_links_that_stay_name_the_running_generation_and_an_abort_keeps_none():
    running = Running(6, (1, 2))
    joined = dict(roles(((1, 5, 1), (6, 12, 2), (13, 20, 3)), running=running))
    assert [(joined[d]["keep_from"], joined[d]["keep_to"]) for d in (1, 2, 3)] == [(6, 6), (6, None), (None, None)]
    moved = dict(roles(((1, 8, 1), (9, 20, 2)), running=running))  # cuts moved, same devices: every link stays
    assert [(moved[d]["keep_from"], moved[d]["keep_to"]) for d in (1, 2)] == [(6, 6), (6, 6)]
    aborted = dict(roles(((1, 8, 1), (9, 20, 2)), abort=True, running=running))
    assert all(m["keep_from"] is None and m["keep_to"] is None for m in aborted.values())
    first = dict(roles(((1, 20, 1),)))  # the first plan: nothing runs before it
    assert first[1]["keep_from"] is None and first[1]["keep_to"] is None
