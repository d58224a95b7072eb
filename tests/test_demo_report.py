"""demo/report.py's pure parts: what the report says of each board's quota and CPU a frame against the plan."""

from dnnpipe.demo.report import quota_lines


def spent(device, compute_ms, link_ms, cpu, inference, used, hop_ms=0.0):
    return {"device": device, "planned_compute_ms": compute_ms, "planned_link_cpu_ms": link_ms,
            "planned_period_ms": max(compute_ms + link_ms, hop_ms), "cpu_ms_per_frame": cpu,
            "inference_cpu_ms": inference, "cores_used": used}


FLEET = [{"device": 1, "cpu_cores": 0.5}, {"device": 2, "cpu_cores": 0.2}]


def test_the_bottleneck_and_the_fastest_board_alone_are_judged_against_their_quotas_and_the_plan():
    measured = {"fleet": FLEET, "spent": {
        "pipeline": [spent(1, 14.0, 1.0, 8.0, 7.5, 0.49), spent(2, 10.0, 6.0, 3.5, 2.0, 0.195)],  # 16 ms: stage 2
        "single": [spent(1, 17.0, 0.8, 9.9, 9.0, 0.40)]}}
    bottleneck, single = quota_lines(measured)
    assert bottleneck.startswith("- the pipeline's bottleneck, stage 2 on board 2: used about 0.195 of its 0.2 cores "
                                 "(98%: the host gave it its quota)")
    assert ("3.50 ms of CPU a frame against 3.20 planned (2.00 compute, 1.20 links and frame); its inference, its "
            "input cut copied in and its output cut out, took 2.00 of it") in bottleneck
    assert single.startswith("- the fastest board alone (board 1): used about 0.400 of its 0.5 cores (80%: under its "
                             "quota")
    assert "9.90 ms of CPU a frame against 8.90 planned (8.50 compute, 0.40 links and frame)" in single


def test_nothing_is_said_without_what_the_boards_spent():
    assert quota_lines({"fleet": FLEET}) == []  # a measured.json from before it was recorded
    no_cpu = {"fleet": FLEET, "spent": {"pipeline": [spent(1, 14.0, 1.0, None, None, None)],
                                        "single": [spent(1, 17.0, 0.8, None, None, None)]}}
    assert quota_lines(no_cpu) == []


def test_the_bottleneck_is_the_stage_of_the_longest_planned_period_its_hop_included_and_95_percent_is_the_line():
    measured = {"fleet": FLEET, "spent": {
        "pipeline": [spent(1, 14.0, 1.0, 8.0, 7.5, 0.474, hop_ms=20.0), spent(2, 10.0, 6.0, 3.5, 2.0, 0.19)],
        "single": [spent(1, 17.0, 0.8, 9.9, 9.0, 0.476)]}}
    bottleneck, single = quota_lines(measured)
    assert bottleneck.startswith("- the pipeline's bottleneck, stage 1 on board 1: used about 0.474 of its 0.5 cores "
                                 "(95%: under its quota")  # 94.8%: just under the line
    assert "(95%: the host gave it its quota)" in single  # 95.2%
