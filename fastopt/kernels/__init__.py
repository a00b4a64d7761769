"""Compiled kernels (Cython). ``rules.pxi`` holds the per-element math; the
``_baseline`` and ``_avx2`` extension modules are that source built for two
instruction sets. ``fastopt.backends.compiled`` chooses between them."""
