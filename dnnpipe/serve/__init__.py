"""serve: the adaptive controller that keeps a pipeline running while devices leave, freeze, slow down or join."""
