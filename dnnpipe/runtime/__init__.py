"""Running a pipeline: one stage per process (stage), their inputs and outputs (dataio), timings (metrics),
and every stage on one machine (local)."""
