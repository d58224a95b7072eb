#!/usr/bin/env python3
"""Run one stage of a pipeline: receive tensors, run the stage's sub-model, send them on (the paper's step 3).

    python runtime_engine.py --stage 2 --model-path partitioned_submodels --bind-addr 0.0.0.0 --bind-port 50000 \
        --next-host <stage-3-host> --next-port 50001 --data-path dataset.h5 --model-name model
"""

import sys

from dnnpipe.runtime.command import main

if __name__ == "__main__":
    sys.exit(main())
