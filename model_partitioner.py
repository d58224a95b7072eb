#!/usr/bin/env python3
"""Plan the optimal pipeline for a Keras model and cut it into TFLite sub-models (the paper's step 1).

    python model_partitioner.py --model-path ./original_models --config ./configurations \
        --output-dir ./partitioned_submodels --model-name model
"""

import sys

from dnnpipe.partition.command import main

if __name__ == "__main__":
    sys.exit(main())
