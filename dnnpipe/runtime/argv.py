"""The one builder of a runtime command line (a stage's or an agent's): flags from values, never shell text.

deploy/launch.py (launch_plan.json), testbed/local.py (run-local) and serve (agents) all build theirs here, so
a flag is spelt one way everywhere: None is left out, True is the bare flag, False is left out, anything else is
`--flag value`.
"""

from __future__ import annotations

from typing import Sequence, Union

Value = Union[None, bool, int, float, str, object]


def runtime_argv(entry: Sequence[str], flags: Sequence[tuple[str, Value]]) -> list[str]:
    """`entry` (e.g. [python, "runtime_engine.py"]) followed by the flags, in order."""
    argv = list(entry)
    for flag, value in flags:
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, float):
            argv += [flag, repr(value)]  # exact: a planned time is passed on as computed
        else:
            argv += [flag, str(value)]
    return argv


def agent_argv(interpreter: str, device: int, models_dir: str, model_name: str, bind_addr: str, bind_port: int,
               control_host: str, control_port: int, connect_timeout: float, insecure: bool,
               tls: bool) -> list[str]:
    """A device agent, run in its device folder (where the deployer put the runtime and the model)."""
    return runtime_argv([interpreter, "-m", "dnnpipe.runtime"], [
        ("--device", device), ("--model-path", models_dir), ("--model-name", model_name), ("--bind-addr", bind_addr),
        ("--bind-port", bind_port), ("--control-host", control_host), ("--control-port", control_port),
        ("--connect-timeout", connect_timeout), ("--insecure", insecure), ("--tls", tls)])
