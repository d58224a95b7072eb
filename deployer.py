#!/usr/bin/env python3
"""Ship each stage's sub-model to its device over SSH, verified by sha256 (the paper's step 2).

    python deployer.py --device-registry ./configurations/device_registry.json \
        --model-path ./partitioned_submodels/ --model-name model
"""

import sys

from dnnpipe.cli import deploy_command, deployer_parser, run_cli

if __name__ == "__main__":
    sys.exit(run_cli(deploy_command, deployer_parser().parse_args(), "deployer.py"))
