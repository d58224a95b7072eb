#!/usr/bin/env python3
"""Ship each stage's sub-model to its device over SSH, verified by sha256 (the paper's step 2).

    python deployer.py --device-registry ./configurations/device_registry.json \
        --model-path ./partitioned_submodels/ --model-name model
"""

import sys

from dnnpipe.deploy.command import main

if __name__ == "__main__":
    sys.exit(main())
