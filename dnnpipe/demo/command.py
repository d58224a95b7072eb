"""`python -m dnnpipe demo`: arguments in, the demo's steps run and reported."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..console import positive_float, positive_int
from ..examples import EXAMPLES
from ..testbed.netns import MODES
from .run import COMPUTE, STEPS, Options, Work, run_demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", choices=sorted(EXAMPLES), default="efficientnetv2b0",
                        help="example model (default: the paper's EfficientNetV2B0, untrained)")
    parser.add_argument("--input-size", type=positive_int, help="image size (default: the model's usual)")
    parser.add_argument("--work-dir", type=Path, default=Path("dnnpipe-work"),
                        help="where every artefact goes (default dnnpipe-work)")
    parser.add_argument("--cluster", type=Path,
                        help='JSON {"C": [...], "M": [...]} replacing the paper-like 4-device cluster')
    parser.add_argument("--num-inputs", type=positive_int, default=200,
                        help="inferences per measured run (default 200)")
    parser.add_argument("--repeats", type=positive_int, default=20, help="profiling repeats per unit (default 20)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    parser.add_argument("--scale", type=positive_float,
                        help="emulate every speed and bandwidth x SCALE (default: fit the usable cores)")
    parser.add_argument("--testbed", choices=MODES, default="auto",
                        help="each device in its own network namespace with a shaped link (netns; needs root and "
                             "iproute2), loopback, or netns when possible (auto, the default)")
    parser.add_argument("--compute", choices=COMPUTE, default="pace",
                        help="pace: each stage computes on this host, then waits out its device's planned time; "
                             "cpu-quota: the virtual fleet (root): each device a board with a CPU quota, a memory "
                             "limit and its own sshd, profiled on itself, stages started over ssh, no pacing "
                             "(default pace)")
    parser.add_argument("--no-tls", action="store_true",
                        help="stage links without TLS (default: inside mutual TLS, as deployed), e.g. to see what "
                             "TLS costs a slow board; the report and measured.json say which ran")
    return parser


def demo_command(args: argparse.Namespace) -> int:
    options = Options(model=args.model, input_size=args.input_size, cluster=args.cluster,
                      num_inputs=args.num_inputs, repeats=args.repeats,
                      steps=tuple(s for s in STEPS if s in args.steps), testbed=args.testbed, scale=args.scale,
                      compute=args.compute, tls=not args.no_tls)
    run_demo(Work(args.work_dir, args.model), options)
    return 0
