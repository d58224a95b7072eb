"""The one-command demo end to end on the tiny model: every artefact, plots, and the prediction it reports."""

import json
from pathlib import Path

import pytest

from helpers import assert_clean_error, run_script


def test_demo_runs_end_to_end(tmp_path):
    work = tmp_path / "work"
    result = run_script("dnnpipe", "demo", "--model", "tiny", "--work-dir", str(work), "--num-inputs", "150",
                        "--repeats", "10", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in ("model", "profile", "plan", "partition", "deploy", "run", "report"):
        assert f"== {step} ==" in result.stdout
    report = (work / "report.md").read_text()
    assert "## Plan" in report and "speed-up" in report and "![timeline](timeline.png)" in report
    for picture in ("timeline.png", "stage_times.png"):
        data = (work / picture).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    plan = json.loads((work / "configurations" / "tiny" / "pipeline_plan.json").read_text())
    measured = json.loads((work / "measured.json").read_text())
    assert measured["testbed"] in ("netns", "loopback") and f"testbed: {measured['testbed']}" in result.stdout
    # The prediction is the plan's stages and the hops between them, on the emulated (scaled) cluster.
    period = max(max(c, h) for c, h in zip(plan["compute_ms"], plan["output_hop_ms"][:-1] + [0.0]))
    assert measured["predicted_pipeline_throughput"] == pytest.approx(1000 / period * measured["emulation_scale"])
    # Measured against predicted throughput is a timing figure a busy machine moves: benchmarks/testbed.py
    # prints that ratio; here both runs must have measured something.
    for run in ("pipeline", "single"):
        assert measured[f"{run}_throughput"] > 0 and measured[f"predicted_{run}_throughput"] > 0, (run, measured)
    assert 0 < measured["latency_p50_ms"] <= measured["latency_p95_ms"]
    # throughput as sustained (the source unpaced), latency below saturation: what each run's source was given
    runs = measured["runs"]
    assert [runs[r]["source_fps"] for r in ("pipeline", "single")] == [None, None], runs
    assert measured["latency_load"] == runs["latency"]["load"] == 0.8
    assert measured["latency_rate"] == runs["latency"]["source_fps"] == pytest.approx(
        0.8 * measured["predicted_pipeline_throughput"])
    assert "pipeline_capacity" not in measured and sorted(p.name for p in (work / "logs").iterdir()) == [
        "latency", "pipeline", "single"]
    assert "sustained, " in report and "source unpaced" in report and "paced at 80% of the predicted" in report
    assert len(measured["stages"]) == len(plan["pipeline_plan"])
    # each stage's CPU per frame, every thread, and the inference's part of it, in measured.json and the report
    cpu, inference = zip(*[(s["cpu_ms_per_frame"], s["inference_cpu_ms"]) for s in measured["spent"]["pipeline"]])
    assert len(cpu) == len(inference) == len(plan["pipeline_plan"]) and all(0 < i < c for c, i in zip(cpu, inference))
    assert f"{cpu[0]:.2f} ({inference[0]:.2f} + {cpu[0] - inference[0]:.2f})" in report
    assert ("faithful: the host computed every stage" in report) != ("NOT faithful in" in report)
    assert (work / "results.h5").exists()
    assert (work / "logs" / "single" / "results.h5").exists() and (work / "logs" / "latency" / "results.h5").exists()
    devices = sorted(p.name for p in (work / "devices").iterdir())
    assert devices == sorted(f"device_{d}" for _, _, d in plan["pipeline_plan"])  # every stage deployed
    for _, _, d in plan["pipeline_plan"]:
        assert (work / "devices" / f"device_{d}" / "partitioned_submodels" / "tiny" / "manifest.json").exists()
    first = work / "devices" / f"device_{plan['pipeline_plan'][0][2]}"  # the inputs in the model's own folder
    assert (first / "partitioned_submodels" / "tiny" / "dataset.h5").exists() and not (first / "dataset.h5").exists()

    again = run_script("dnnpipe", "demo", "--model", "tiny", "--work-dir", str(work), "--steps", "report")
    assert again.returncode == 0 and "== profile ==" not in again.stdout


@pytest.mark.parametrize("text, fragment", [
    ('{"C": [1, "x"], "M": [100, 100]}', "cluster.json: 'C[1]' must be a finite number, got 'x'"),
    ('{"C": [1, 0.5], "M": [100]}', "cluster.json: 'M' has 1 values but N = 2"),
    ('{"C": [1], "M": [1], "B_lnk": [[1]]}', "cluster.json: unknown key 'device_config.B_lnk'"),
])
def test_a_bad_cluster_file_fails_before_anything_is_built(tmp_path, text, fragment):
    (tmp_path / "cluster.json").write_text(text)
    result = run_script("dnnpipe", "demo", "--model", "tiny", "--work-dir", str(tmp_path / "work"), "--cluster",
                        str(tmp_path / "cluster.json"))
    assert_clean_error(result, fragment)
    assert "== model ==" not in result.stdout and not (tmp_path / "work").exists()


def test_a_step_without_what_it_needs_fails_before_the_first_step(tmp_path):
    result = run_script("dnnpipe", "demo", "--model", "tiny", "--work-dir", str(tmp_path / "work"), "--steps",
                        "model", "run")
    assert_clean_error(result, "the run step needs", "config.json, which the profile step makes")
    assert "== model ==" not in result.stdout and not (tmp_path / "work").exists()


def test_a_running_fleet_is_reused_only_for_the_same_speeds_memories_and_links(tmp_path):
    """ensure_fleet kept a fleet whose C matched although M or B had changed: stale memory and link limits."""
    from dnnpipe.demo.fleet import matches
    from dnnpipe.testbed import fleet

    cluster = {"C": [1.0, 0.5], "M": [100.0, 50.0], "B": [100.0, 10.0]}
    shape = fleet.describe(cluster, tmp_path, "198.19.1", 0.5, "root", "python3")
    assert matches(shape, cluster, None) and matches(shape, cluster, 0.5)
    assert not matches(shape, cluster, 0.25)
    assert not matches(shape, {**cluster, "M": [100.0, 60.0]}, None)
    assert not matches(shape, {**cluster, "B": [100.0, 20.0]}, None)
    assert not matches(shape, {"C": cluster["C"], "M": cluster["M"]}, None)
    assert not matches(shape, cluster, None, runtime_mb=fleet.RUNTIME_MB + 64)
    assert not matches(shape, {k: v[:1] for k, v in cluster.items()}, None)


def emulated(*periods_ms: float):
    from dnnpipe.testbed.pacing import Emulation, StagePace

    return Emulation(1.0, tuple(StagePace(k + 1, k + 1, (k + 1, k + 1), ms, 0.0) for k, ms in enumerate(periods_ms)),
                     None)


def test_throughput_runs_are_unpaced_and_latency_is_measured_below_saturation():
    """A source paced at the predicted rate can never read above it: the pipeline and the fastest device alone
    must be fed as fast as they take inputs, and only the latency run paced (at 80% of the prediction)."""
    from dnnpipe.demo.runs import demo_runs
    from dnnpipe.demo.work import Work

    pipeline, single = emulated(10.0, 8.0), emulated(16.0)
    runs = {r.name: r for r in demo_runs(pipeline, single, num_inputs=50, tls=False)}
    assert list(runs) == ["pipeline", "single", "latency"]  # three runs: the demo's time matters
    assert runs["pipeline"].run.fps is None and runs["single"].run.fps is None
    assert runs["latency"].run.fps == pytest.approx(0.8 * 100.0) and runs["latency"].load == 0.8
    assert runs["pipeline"].load is None and runs["single"].load is None
    assert (runs["pipeline"].emulated, runs["single"].emulated, runs["latency"].emulated) == (pipeline, single,
                                                                                              pipeline)
    assert [r.checked for r in runs.values()] == [True, False, False]  # the unpaced pipeline's results are checked
    work = Work(Path("w"), "m")  # every run writes its results, as deployed: like is compared with like
    assert [r.output(work) for r in runs.values()] == [work.results, work.logs / "single" / "results.h5",
                                                       work.logs / "latency" / "results.h5"]
    assert [r.single for r in runs.values()] == [False, True, False]
    for r in runs.values():
        assert (r.run.num_inputs, r.run.tls, r.run.num_threads, r.run.queue_size) == (50, False, 1, 1)
    assert "unpaced" in runs["pipeline"].source() and "80% of the predicted 100.0" in runs["latency"].source()
    half = {r.name: r.run.fps for r in demo_runs(pipeline, single, 50, True, load=0.5)}
    assert half == {"pipeline": None, "single": None, "latency": pytest.approx(50.0)}
