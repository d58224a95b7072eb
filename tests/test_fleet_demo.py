"""`demo --compute cpu-quota`: the whole job on the virtual fleet, measured against its per-device prediction."""

import json

import pytest

from dnnpipe.testbed import fleet
from helpers import run_script
from test_fleet import leftovers, needs_fleet


@pytest.mark.slow
@needs_fleet
def test_demo_on_the_fleet_profiles_per_device_runs_unpaced_and_reports_throttling(tmp_path):
    work = tmp_path / "work"
    done = run_script("dnnpipe", "demo", "--model", "tiny", "--work-dir", str(work), "--compute", "cpu-quota",
                      "--num-inputs", "60", "--repeats", "5", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    measured = json.loads((work / "measured.json").read_text())
    assert (measured["compute"], measured["profile"], measured["testbed"]) == ("cpu-quota", "per-device", "fleet")
    for key in ("pipeline_throughput", "predicted_pipeline_throughput", "single_throughput",
                "predicted_single_throughput"):
        assert measured[key] > 0
    assert [measured["runs"][r]["source_fps"] for r in ("pipeline", "single")] == [None, None]  # sustained
    assert measured["latency_rate"] == pytest.approx(0.8 * measured["predicted_pipeline_throughput"])
    assert set(measured["throttling"]) == {"pipeline", "single", "latency"}
    config = json.loads((work / "configurations" / "tiny" / "config.json").read_text())
    assert len(config["model_config"]["E_device"]) == 4  # the paper-like cluster, each board profiled
    # each board's measured link CPU is in the config, and the plan counted it
    assert all(len(v) == 4 for v in config["device_config"]["link_cpu"].values())
    written = json.loads((work / "configurations" / "tiny" / "pipeline_plan.json").read_text())
    assert len(written["link_cpu_ms"]) == len(written["pipeline_plan"]) and all(ms > 0 for ms in written["link_cpu_ms"])
    devices = {t["device"] for t in measured["throttling"]["pipeline"]}
    assert devices == {s[2] for s in json.loads((work / "configurations" / "tiny" / "pipeline_plan.json")
                                                .read_text())["pipeline_plan"]}
    assert all(s["pacing_p50_ms"] is None or s["pacing_p50_ms"] < 1 for s in measured["stages"])  # not paced
    # what each run's stages spent against the plan, and each board's quota used, for the report's verdict
    spent = measured["spent"]
    assert [s["device"] for s in spent["pipeline"]] == [s[2] for s in written["pipeline_plan"]]
    assert len(spent["single"]) == 1
    assert all(s["cores_used"] > 0 and s["cpu_ms_per_frame"] >= s["inference_cpu_ms"] > 0
               for s in spent["pipeline"] + spent["single"])
    report = (work / "report.md").read_text()
    assert "- the pipeline's bottleneck, stage " in report and "- the fastest board alone (board " in report
    assert "compute: cpu-quota (this run)" in report and "throttled" in report
    assert "What this host could not emulate" in report
    assert "source unpaced" in report and "paced at 80% of the predicted" in report
    assert leftovers(fleet.fleet_id(work / "fleet")) == []  # the run step took the fleet down
