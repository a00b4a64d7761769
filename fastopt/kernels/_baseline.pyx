# cython: language_level=3
# The kernels compiled for the baseline instruction set of the target (SSE2 on
# x86-64): imported on every CPU, used where AVX2/FMA are missing.
include "common.pxi"
include "_registry.pxi"
include "rules.pxi"
include "engine.pxi"
include "roof.pxi"
include "lbfgs.pxi"
include "factored.pxi"
