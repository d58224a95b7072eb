"""Cutting sub-models straight out of one TFLite flatbuffer: no TensorFlow, any plan in milliseconds.

Imports nothing from TensorFlow, directly or indirectly, so a controller or a board can re-cut a plan.
"""

from .chain import Verification, random_inputs, run_chain
from .cuts import mapped_cut_table, match_tensors, operator_cut_table, signature_keys
from .flatbuffer import OpGraph, cut_submodel, op_graph, read_model
from .plan import CutError, check_cuts, check_stages, inner_cuts, with_cuts
from .slicer import WHOLE_FILE, check_against_whole, reslice, slice_plan, store_whole_model
from .tflite_model import find_tflite, partition_tflite, profile_tflite, tflite_config, tflite_units

__all__ = ["CutError", "OpGraph", "Verification", "WHOLE_FILE", "check_against_whole", "check_cuts", "check_stages",
           "cut_submodel", "find_tflite", "inner_cuts", "mapped_cut_table", "match_tensors", "op_graph",
           "operator_cut_table", "partition_tflite", "profile_tflite", "random_inputs", "read_model", "reslice",
           "run_chain", "signature_keys", "slice_plan", "store_whole_model", "tflite_config", "tflite_units",
           "with_cuts"]
