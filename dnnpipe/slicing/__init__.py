"""Cutting sub-models straight out of one TFLite flatbuffer: no TensorFlow, any plan in milliseconds.

Imports nothing from TensorFlow, directly or indirectly, so a controller or a board can re-cut a plan.
"""
