"""`python -m dnnpipe service` as users run it: a real process, SIGTERM under load drains and exits 0."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from helpers import ROOT, assert_clean_error, run_script
from test_service import image_input_named, tiny  # noqa: F401 (the module's fixture)


def read_line(stream, timeout: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    assert selector.select(timeout), "no line from the service"
    return stream.readline()


def test_sigterm_under_load_answers_in_flight_requests_and_exits_0(tiny):  # noqa: F811
    folder, images, output, expected = tiny
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "dnnpipe", "service", "--model-path", str(folder.parent),
                                "--model-name", folder.name, "--http", "127.0.0.1:0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = read_line(process.stdout, 60)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line)[1])
        stop, outcomes = threading.Event(), []

        def load(worker):
            c = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=30)
            while not stop.is_set():
                row = worker % len(images)
                try:
                    result = c.infer(folder.name, [image_input_named(folder, images[row:row + 1])])
                    ok = np.allclose(result.as_numpy(output)[0], expected[row], rtol=1e-4, atol=1e-4)
                    outcomes.append(("ok" if ok else "wrong", time.monotonic()))
                except InferenceServerException as e:
                    if "Incomplete response" in str(e):  # sent on a kept-alive connection as the service closed it
                        outcomes.append(("closed", time.monotonic()))
                        return
                    outcomes.append(("503" if "shutting down" in str(e) else f"error {e}", time.monotonic()))
                except Exception:  # refused or reset once the service closed its socket
                    outcomes.append(("closed", time.monotonic()))
                    return

        threads = [threading.Thread(target=load, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(kind == "ok" for kind, _ in list(outcomes)) <= 8 and time.monotonic() < deadline:
            time.sleep(0.05)  # answers come while it serves: then SIGTERM
        term = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(15)
        stop.set()
        for t in threads:
            t.join(30)
        stderr = process.stderr.read()
        stdout = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "drained: every request answered" in stdout
    kinds = {kind for kind, _ in outcomes}
    assert kinds <= {"ok", "503", "closed"}, kinds
    assert sum(kind == "ok" for kind, ended in outcomes if ended < term) > 8
    # refusals only once it drained: no refusal ended before SIGTERM was sent (an order, not a duration: a request
    # sent well before it may still be refused on a loaded machine, if it was not yet accepted)
    assert all(ended > term for kind, ended in outcomes if kind != "ok")


def test_a_public_address_without_a_token_is_refused(tiny):  # noqa: F811
    folder = tiny[0]
    result = run_script("dnnpipe", "service", "--model-path", str(folder.parent), "--model-name", folder.name,
                        "--http", "0.0.0.0:0", timeout=120)
    assert_clean_error(result, "not a loopback address", "--http-token-file")
    result = run_script("dnnpipe", "service", "--model-path", str(folder.parent), "--model-name", "missing",
                        "--http", "127.0.0.1:0", timeout=120)
    assert_clean_error(result, "manifest not found")
