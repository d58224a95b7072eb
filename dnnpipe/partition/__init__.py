"""Cutting a Keras model into TFLite sub-models along a plan: graph analysis, conversion, verification."""
