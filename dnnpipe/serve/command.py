"""`python -m dnnpipe serve`: arguments in, the adaptive controller's events and summary out."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..console import positive_float, positive_int
from ..runtime.dataio import INPUTS_HELP, RESULTS_HELP
from ..errors import DnnpipeError, printable
from ..manifest import read_manifest
from ..service.command import add_http_arguments, http_options, live
from .controller import serve
from .options import ServeOptions


def emulate_change(text: str) -> tuple[float, int, float]:
    """argparse type: T:DEVICE=C, "after T seconds device DEVICE runs at speed C"."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*:\s*([0-9]+)\s*=\s*([0-9.eE+-]+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected T:DEVICE=C, e.g. 2.5:3=0.2, got {text!r}")
    try:
        at, device, speed = float(match[1]), int(match[2]), positive_float(match[3])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T:DEVICE=C, e.g. 2.5:3=0.2, got {text!r}") from None
    if device < 1:
        raise argparse.ArgumentTypeError(f"device ids start at 1, got {device}")
    return at, device, speed


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device-registry", type=Path, required=True,
                        help="device_registry.json (re-read on SIGHUP or when it changes)")
    parser.add_argument("--model-path", type=Path, required=True, help="folder holding NAME/manifest.json")
    parser.add_argument("--model-name", required=True, help="model name (sub-folder of --model-path)")
    parser.add_argument("--config", type=Path, required=True, help="folder with NAME/config.json, or the file")
    parser.add_argument("--data-path", type=Path, help=f"file mode: {INPUTS_HELP}")
    parser.add_argument("--output-path", type=Path, help=f"file mode: {RESULTS_HELP}")
    parser.add_argument("--num-inputs", type=positive_int, help="inputs to serve (cycles DATA; default: its rows)")
    parser.add_argument("--fps", type=positive_float, help="pace inputs at this rate (default: as fast as taken)")
    parser.add_argument("--resume", action="store_true", help="continue from the results already in OUT")
    parser.add_argument("--window", type=positive_int,
                        help="inputs in flight at most (default 8; with --http 32: requests arrive from many clients, "
                             "and 16 left the pipeline short of its predicted throughput in benchmarks/serving.py)")
    parser.add_argument("--progress-timeout", type=positive_float, default=0.5,
                        help="an agent without a heartbeat (sent every 0.1 s) this long is frozen or cut off, s "
                             "(default 0.5)")
    parser.add_argument("--loading-timeout", type=positive_float, default=3.0,
                        help="the same while the agent receives or loads a sub-model pushed to it, when longer: a "
                             "small board busy loading may not beat, s (default %(default)g)")
    parser.add_argument("--connect-timeout", type=positive_float, default=30.0,
                        help="how long an agent may take to come up, and how long results may stop with inputs in "
                             "flight before the plan is restarted, s (default 30)")
    parser.add_argument("--threshold", type=positive_float, default=0.10,
                        help="re-plan for measured speeds when the new bottleneck is this much better (default 0.10)")
    parser.add_argument("--emulate-speed", action="store_true",
                        help="pace each stage at its units' profiled time at its device's C from the config "
                             "(the runtime's --pace-ms: one host as a cluster)")
    parser.add_argument("--emulation-scale", type=positive_float, default=1.0,
                        help="multiply every emulated speed by this (default 1)")
    parser.add_argument("--emulate-change", type=emulate_change, action="append", default=[], metavar="T:DEVICE=C",
                        help="T seconds after the first result, DEVICE runs at speed C: its stage is told over "
                             "the control channel (tests, benchmarks)")
    parser.add_argument("--controller-host", default="127.0.0.1",
                        help="this machine's address as the devices reach it (default 127.0.0.1)")
    parser.add_argument("--work-dir", type=Path, default=Path("serve_work"),
                        help="serve's own files (WORK/NAME/serve_plan.json: the running plan); the partition in "
                             "--model-path and --config is only read (default: serve_work)")
    parser.add_argument("--no-tls", action="store_true",
                        help="plain TCP on serve's and the agents' links (default: mutual TLS with the pipeline "
                             "certificate, pipeline.crt beside the manifest or made in --work-dir; the pipeline key "
                             "handshake runs inside it either way)")
    parser.add_argument("--insecure", action="store_true",
                        help="no pipeline key handshake on any link (data and control); default: authenticated")
    add_http_arguments(parser, default=None)  # --http/--grpc HOST:PORT: the service mode, requests, not files
    return parser


def serve_command(args: argparse.Namespace) -> int:
    files = args.data_path is not None and args.output_path is not None
    service = live(args)
    if service == files or (service and (args.data_path or args.output_path)):
        raise DnnpipeError("serve takes either --data-path and --output-path (the file mode) or --http/--grpc "
                           "HOST:PORT (the inference service), not both and not neither")
    if service and (args.resume or args.num_inputs):
        raise DnnpipeError("--resume and --num-inputs are for the file mode, not --http/--grpc")
    options = ServeOptions(
        registry=args.device_registry, model_path=args.model_path, model_name=args.model_name, config=args.config,
        data_path=args.data_path, output_path=args.output_path, num_inputs=args.num_inputs, fps=args.fps,
        resume=args.resume, window=args.window or (32 if service else 8),
        progress_timeout=args.progress_timeout, loading_timeout=args.loading_timeout,
        connect_timeout=args.connect_timeout, threshold=args.threshold, emulate_speed=args.emulate_speed,
        emulation_scale=args.emulation_scale, controller_host=args.controller_host,
        emulate_changes=tuple(args.emulate_change), insecure=args.insecure,
        work_dir=args.work_dir, tls=not args.no_tls)
    echo = lambda text: print(printable(text), flush=True)  # noqa: E731 - may quote a stage
    if service:
        from ..service.service import run_service  # the HTTP server and prometheus_client only in this mode

        manifest = read_manifest(options.folder)
        return run_service(http_options(args, args.model_name),
                           lambda feed, events: serve(options, echo, feed, events),
                           manifest.inputs, manifest.outputs, echo)
    summary = serve(options, echo=echo)
    print(summary.describe(), flush=True)
    return 0
