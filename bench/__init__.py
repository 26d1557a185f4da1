"""Benchmark suite (issue 6): `python -m bench [--quick] [--only NAME...]`.

Figure groups, one module each: peak (GEMM ceiling), train (training step vs diffusers), sample (DDIM-50 and
DPM-Solver++-20 vs diffusers), reader (shard reader vs training consumption). diffusers is imported here only.
"""

GROUPS = ("peak", "train", "sample", "reader")
