"""Measuring a model on this machine: per-unit times and memory (profiler), and the profile command."""
