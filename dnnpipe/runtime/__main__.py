"""`python -m dnnpipe.runtime`: a device agent (serve starts one per device), loading the device side alone, as
runtime_engine.py does for one stage. It sits above runtime/command.py, so the agent never imports its command."""

import sys

from .command import agent_main

sys.exit(agent_main())
