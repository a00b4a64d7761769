# cython: language_level=3
# The same kernels compiled with -mavx2 -mfma: imported only after
# cpu_has_avx2_fma() of the baseline module said this CPU runs them.
include "common.pxi"
include "_registry.pxi"
include "rules.pxi"
include "engine.pxi"
include "roof.pxi"
include "lbfgs.pxi"
include "factored.pxi"
