/* Runtime facts the compiled kernels need, kept out of the Cython sources:
 * which SIMD extensions the running CPU has, whether OpenMP is present, and the
 * floating-point control state (flush-to-zero) around a kernel call. */
#ifndef FASTOPT_RUNTIME_H
#define FASTOPT_RUNTIME_H

#ifdef _OPENMP
#include <omp.h>
#define FASTOPT_HAVE_OPENMP 1
static inline int fastopt_max_threads(void) { return omp_get_max_threads(); }
#else
#define FASTOPT_HAVE_OPENMP 0
static inline int fastopt_max_threads(void) { return 1; }
#endif

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#define FASTOPT_X86 1
#include <immintrin.h>
#else
#define FASTOPT_X86 0
#endif

/* 1 when the CPU executing this process has AVX2 and FMA (and the OS saves
 * the YMM registers, which __builtin_cpu_supports checks through cpuid). */
static inline int fastopt_cpu_has_avx2_fma(void) {
#if FASTOPT_X86 && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* The ISA this translation unit was compiled for. */
#if defined(__AVX2__) && defined(__FMA__)
#define FASTOPT_ISA "avx2-fma"
#elif FASTOPT_X86
#define FASTOPT_ISA "sse2"
#else
#define FASTOPT_ISA "generic"
#endif

/* Flush-to-zero and denormals-are-zero around a kernel. Subnormal operands
 * cost this CPU family a microcode assist per operation (measured 2.1-2.7x on
 * a whole step); with FTZ|DAZ the step runs at full speed. enter() returns the
 * caller's MXCSR, leave() restores it: each thread's floating-point state is
 * exactly as it was outside the kernel. No-ops off x86. */
static inline unsigned int fastopt_fpu_enter(int flush) {
#if FASTOPT_X86
    unsigned int saved = _mm_getcsr();
    if (flush) _mm_setcsr(saved | 0x8040u);   /* FTZ (bit 15) | DAZ (bit 6) */
    return saved;
#else
    (void)flush;
    return 0;
#endif
}

static inline void fastopt_fpu_leave(int flush, unsigned int saved) {
#if FASTOPT_X86
    if (flush) _mm_setcsr(saved);
#else
    (void)flush; (void)saved;
#endif
}

#endif /* FASTOPT_RUNTIME_H */
