"""`python -m dnnpipe replan`: re-planning a running pipeline (the algorithms are dnnpipe.planner)."""
