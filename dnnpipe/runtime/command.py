"""runtime_engine.py and `python -m dnnpipe stage`: arguments in, one running stage out.

runtime_engine.py imports only this module on a board, so it stays within the device side; `run-local`, which
runs every stage on this host, is the testbed's command (dnnpipe.testbed.command).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..console import positive_float, positive_int, script_main
from .dataio import INPUTS_HELP, RESULTS_HELP
from ..errors import DnnpipeError, printable
from .agent import Agent, AgentOptions
from .heap import keep_freed_memory
from .priority import run_as_batch_work
from .stage import RunOptions, Stage, StageOptions


def add_stage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--stage", type=positive_int, required=True, help="this process's stage, 1-based")
    parser.add_argument("--model-path", type=Path, required=True, help="folder holding NAME/manifest.json")
    parser.add_argument("--model-name", required=True, help="model name (sub-folder of --model-path)")
    parser.add_argument("--bind-addr", default="0.0.0.0",
                        help="address to receive the previous stage on (default 0.0.0.0)")
    parser.add_argument("--bind-port", type=port, help="port to receive on (every stage but the first)")
    parser.add_argument("--next-host", help="the next stage's host (every stage but the last)")
    parser.add_argument("--next-port", type=port, help="the next stage's port (every stage but the last)")
    parser.add_argument("--data-path", type=Path, help=f"first stage: {INPUTS_HELP}")
    parser.add_argument("--output-path", type=Path, help=f"last stage: {RESULTS_HELP}")
    add_run_arguments(parser)
    parser.add_argument("--pace-ms", type=positive_float, metavar="MS",
                        help="emulate a device whose stage takes MS: each frame's stage time is max(host, MS)")
    parser.add_argument("--control-host", help="a controller (serve) to send heartbeats to and take commands from")
    parser.add_argument("--control-port", type=port, help="the controller's control port")
    return parser


def port(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every stage of a run shares (run-local passes them on to each stage)."""
    parser.add_argument("--num-inputs", type=positive_int,
                        help="inferences to run (cycles the data; default: every row)")
    parser.add_argument("--fps", type=positive_float, help="pace inputs at this rate (default: as fast as taken)")
    parser.add_argument("--log-dir", type=Path, help="per-frame CSV and summary JSON per stage")
    parser.add_argument("--num-threads", type=positive_int, help="interpreter threads (default: the interpreter's)")
    parser.add_argument("--delegate", help="delegate library, e.g. libedgetpu.so.1")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="longest wait for a frame, s (default 60)")
    parser.add_argument("--connect-timeout", type=positive_float, default=60.0,
                        help="longest wait for the neighbouring stages to come up, s (default 60)")
    parser.add_argument("--queue-size", type=positive_int, default=4,
                        help="frames buffered between threads (default 4)")
    parser.add_argument("--key-file", type=Path,
                        help="the pipeline key (default: pipeline.key beside manifest.json)")
    parser.add_argument("--no-tls", action="store_true",
                        help="links between stages without TLS: the key handshake still proves each peer, but "
                             "nothing protects the frames after it (every stage must agree; default: mutual TLS "
                             "pinning pipeline.crt beside manifest.json)")
    parser.add_argument("--insecure", action="store_true",
                        help="links between stages with neither the key handshake nor TLS (every stage must agree)")
    parser.add_argument("--tls", action="store_true",
                        help="accepted for old scripts: TLS is the default now (see --no-tls)")


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(num_inputs=args.num_inputs, fps=args.fps, num_threads=args.num_threads,
                      delegate=args.delegate, timeout=args.timeout, connect_timeout=args.connect_timeout,
                      queue_size=args.queue_size, key_file=args.key_file, insecure=args.insecure,
                      tls=use_tls(args))


def use_tls(args: argparse.Namespace, name: str = "") -> bool:
    """TLS unless --no-tls or --insecure; an old script's --tls beside either is a contradiction. A command
    without --insecure (the deployer's) uses it too."""
    prefix = f"{name} " if name else ""
    if args.tls and args.no_tls:
        raise DnnpipeError(f"{prefix}--tls and --no-tls contradict each other (TLS is the default now: drop --tls)")
    if args.tls and getattr(args, "insecure", False):
        raise DnnpipeError(f"{prefix}--tls and --insecure do not go together (inside TLS, the pipeline key still binds "
                           "each link to this manifest and these stages)")
    return not (args.no_tls or getattr(args, "insecure", False))


def stage_parser() -> argparse.ArgumentParser:
    return add_stage_arguments(argparse.ArgumentParser(
        prog="runtime_engine.py", description="Run one stage of a pipeline; tensors flow between stages over TCP."))


def stage_command(args: argparse.Namespace) -> int:
    run_as_batch_work()  # before the stage starts a thread (runtime.priority)
    options = StageOptions(
        stage=args.stage, folder=args.model_path / args.model_name, bind_addr=args.bind_addr,
        bind_port=args.bind_port, next_host=args.next_host, next_port=args.next_port, data_path=args.data_path,
        output_path=args.output_path, num_inputs=args.num_inputs, fps=args.fps, log_dir=args.log_dir,
        num_threads=args.num_threads, delegate=args.delegate, timeout=args.timeout,
        connect_timeout=args.connect_timeout, queue_size=args.queue_size, pace_ms=args.pace_ms,
        control_host=args.control_host, control_port=args.control_port,
        key_file=args.key_file, insecure=args.insecure, tls=use_tls(args, f"[stage {args.stage}]"))
    print(Stage(options, say=lambda text: print(printable(text), flush=True)).run().describe(), flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return script_main(stage_parser(), stage_command, argv)


def add_agent_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", type=positive_int, required=True, help="this device's id (the registry's)")
    parser.add_argument("--model-path", type=Path, required=True, help="folder holding NAME/manifest.json")
    parser.add_argument("--model-name", required=True, help="model name (sub-folder of --model-path)")
    parser.add_argument("--bind-addr", default="0.0.0.0", help="address to take data links on (default 0.0.0.0)")
    parser.add_argument("--bind-port", type=port, required=True, help="port to take data links on (runtime_port)")
    parser.add_argument("--control-host", required=True, help="the controller (serve) to take roles from")
    parser.add_argument("--control-port", type=port, required=True, help="the controller's control port")
    parser.add_argument("--connect-timeout", type=positive_float, default=30.0,
                        help="longest wait for the controller or a neighbour, s (default 30)")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="longest wait for a frame inside a role, s (default 60)")
    parser.add_argument("--queue-size", type=positive_int, default=4, help="frames buffered between threads")
    parser.add_argument("--num-threads", type=positive_int, help="interpreter threads (default: the interpreter's)")
    parser.add_argument("--delegate", help="delegate library, e.g. libedgetpu.so.1")
    parser.add_argument("--key-file", type=Path, help="the pipeline key (default: pipeline.key beside manifest.json)")
    parser.add_argument("--insecure", action="store_true", help="links without the pipeline key handshake")
    parser.add_argument("--tls", action="store_true",
                        help="every link inside mutual TLS, pinning pipeline.crt beside manifest.json")
    return parser


def agent_command(args: argparse.Namespace) -> int:
    options = AgentOptions(device=args.device, folder=args.model_path / args.model_name,
                           control_host=args.control_host, control_port=args.control_port, bind_port=args.bind_port,
                           bind_addr=args.bind_addr, connect_timeout=args.connect_timeout, timeout=args.timeout,
                           queue_size=args.queue_size, num_threads=args.num_threads, delegate=args.delegate,
                           key_file=args.key_file, insecure=args.insecure, tls=args.tls)
    run_as_batch_work()  # before the agent starts a thread (runtime.priority)
    keep_freed_memory()  # it loads sub-models while it runs a role (runtime.heap)
    Agent(options, say=lambda text: print(text, flush=True)).run()
    print(f"[agent {args.device}] stopped by the controller", flush=True)
    return 0


def agent_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dnnpipe.runtime",
                                     description="A device agent: runs the stage roles a controller (serve) gives it.")
    return script_main(add_agent_arguments(parser), agent_command, argv)
