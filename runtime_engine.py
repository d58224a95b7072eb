#!/usr/bin/env python3
"""Run one stage of a pipeline: receive tensors, run the stage's sub-model, send them on (the paper's step 3).

    python runtime_engine.py --stage 2 --model-path partitioned_submodels --bind-addr 0.0.0.0 --bind-port 50000 \
        --next-host 192.168.100.61 --next-port 50001 --data-path dataset.h5 --model-name model
"""

import sys

from dnnpipe.cli import run_cli, stage_command, stage_parser

if __name__ == "__main__":
    sys.exit(run_cli(stage_command, stage_parser().parse_args(), "runtime_engine.py"))
