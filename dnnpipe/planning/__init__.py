"""Planning from the command line: re-planning a running pipeline (the planner itself is dnnpipe.planner)."""
