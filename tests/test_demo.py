"""The one-command demo end to end on the tiny model: every artefact, plots, and measured vs predicted."""

import json

from helpers import run_script

# Emulation on a shared 2-core host runs each stage about 15-40% over its profiled time (stages share
# cores and caches): measured/predicted was 0.65-0.73 over five runs here, and dipped to just under 0.5
# once while other work shared the machine. Under 0.4 would mean the plan or the runtime is wrong.
THROUGHPUT_TOLERANCE = (0.4, 1.15)


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
    predicted = 1000 / plan["bottleneck_ms"] * measured["emulation_scale"]
    low, high = THROUGHPUT_TOLERANCE
    assert low * predicted <= measured["pipeline_throughput"] <= high * predicted, (measured, predicted)
    assert (work / "results.h5").exists()
    devices = sorted(p.name for p in (work / "devices").iterdir())
    assert devices == sorted(f"device_{d}" for _, _, d in plan["pipeline_plan"])  # every stage deployed
    for _, _, d in plan["pipeline_plan"]:
        assert (work / "devices" / f"device_{d}" / "partitioned_submodels" / "tiny" / "manifest.json").exists()

    again = run_script("dnnpipe", "demo", "--model", "tiny", "--work-dir", str(work), "--steps", "report")
    assert again.returncode == 0 and "== profile ==" not in again.stdout
