/* Low-precision storage for the segment engine's staged path (engine.pxi):
 * converting a block of up to 256 elements between its stored type and the float32
 * the rules compute in. Every function is a plain loop over a block the caller owns;
 * the semantics are docs/rules.md "Storage types" (the Numba backends implement the
 * same bits).
 *
 *   bf16  stored as uint16 bits: widening is a shift; narrowing rounds to nearest
 *         even as torch's c10::BFloat16 does (NaN -> 0x7FC0), or stochastically
 *         with 16 counter-based random bits per element.
 *   f16   IEEE binary16 through the compiler's _Float16 (F16C instructions in the
 *         AVX2 build, exact software conversion in the baseline build: same bits).
 *   q8    uint8 codes into a sorted 256-entry map, one float32 absmax per block:
 *         value = map[code] * absmax; a new block's codes are the nearest entries to
 *         x * (1/absmax) clamped to [-1, 1] (NaN to 1; ties to the lower code), found
 *         through a 65,536-entry table on the upper 16 bits and one comparison.
 */
#ifndef FASTOPT_LOWP_H
#define FASTOPT_LOWP_H

#include <stdint.h>
#include <string.h>
#include <stddef.h>
#if defined(__SSE__) || defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__F16C__)
#define FO_AVX2 1   /* the AVX2 build: 8 lanes at a time, the same bits as the scalar loops */
#else
#define FO_AVX2 0
#endif

#define FO_BLK 256

static inline uint32_t fo_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float fo_float(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* Ask for [p, p + bytes) ahead of use, a cache line at a time: the staged path
 * works in bursts (widen, compute, narrow), so the hardware prefetcher alone keeps
 * too few misses in flight for one thread to reach the memory's bandwidth. */
static inline void fo_prefetch(const void* p, ptrdiff_t bytes, int write) {
    const char* c = (const char*)p;
    for (ptrdiff_t k = 0; k < bytes; k += 64) {
        if (write)
            __builtin_prefetch(c + k, 1, 3);
        else
            __builtin_prefetch(c + k, 0, 3);
    }
}

/* Chris Wellons' lowbias32 integer hash: the stochastic-rounding generator. */
static inline uint32_t fo_mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}

/* ---- bf16 ---------------------------------------------------------------- */

static inline void fo_load_bf16(const uint16_t* src, float* dst, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if FO_AVX2
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
#endif
    for (; i < n; i++) dst[i] = fo_float((uint32_t)src[i] << 16);
}

#if FO_AVX2
/* 8 uint32 lanes (each < 65536) -> 8 uint16 stored */
static inline void fo_pack16(__m256i v, uint16_t* dst) {
    __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    _mm_storeu_si128((__m128i*)dst, _mm_packus_epi32(lo, hi));
}

/* lanes whose float is NaN: all ones */
static inline __m256i fo_isnan8(__m256i u) {
    return _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                              _mm256_set1_epi32(0x7F800000));
}
#endif

static inline uint16_t fo_bf16_rne(float x) {
    uint32_t u = fo_bits(x);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(x != x ? 0x7FC0u : r);
}

static inline void fo_store_bf16(const float* src, uint16_t* dst, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if FO_AVX2
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    const __m256i qnan = _mm256_set1_epi32(0x7FC0);
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + i));
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias,
                        _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
        r = _mm256_srli_epi32(r, 16);
        fo_pack16(_mm256_blendv_epi8(r, qnan, fo_isnan8(u)), dst + i);
    }
#endif
    for (; i < n; i++) dst[i] = fo_bf16_rne(src[i]);
}

/* ks: the segment's key (fo_mix32(key ^ fo_mix32(segment + 0x9E3779B9))); i0: the
 * block's first element index within its segment. */
#if FO_AVX2
static inline __m256i fo_mix32x8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7FEB352Du));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68Bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
#endif

static inline void fo_store_bf16_sr(const float* src, uint16_t* dst, ptrdiff_t n,
                                    uint32_t ks, uint32_t i0) {
    ptrdiff_t i = 0;
#if FO_AVX2
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mul = _mm256_set1_epi32((int)0x85EBCA6Bu), low = _mm256_set1_epi32(0xFFFF);
    const __m256i key = _mm256_set1_epi32((int)ks), qnan = _mm256_set1_epi32(0x7FC0);
    for (; i + 8 <= n; i += 8) {
        __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(i0 + (uint32_t)i)), lanes);
        __m256i r = _mm256_and_si256(fo_mix32x8(_mm256_xor_si256(key,
                        _mm256_mullo_epi32(idx, mul))), low);
        __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + i));
        __m256i v = _mm256_srli_epi32(_mm256_add_epi32(u, r), 16);
        fo_pack16(_mm256_blendv_epi8(v, qnan, fo_isnan8(u)), dst + i);
    }
#endif
    for (; i < n; i++) {
        uint32_t r = fo_mix32(ks ^ ((i0 + (uint32_t)i) * 0x85EBCA6Bu)) & 0xFFFFu;
        uint32_t u = fo_bits(src[i]);
        dst[i] = (uint16_t)(src[i] != src[i] ? 0x7FC0u : (u + r) >> 16);
    }
}

/* ---- f16 ----------------------------------------------------------------- */

static inline void fo_load_f16(const void* src_, float* dst, ptrdiff_t n) {
    const _Float16* src = (const _Float16*)src_;
    ptrdiff_t i = 0;
#if FO_AVX2
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
    for (; i < n; i++) dst[i] = (float)src[i];
}

static inline void fo_store_f16(const float* src, void* dst_, ptrdiff_t n) {
    _Float16* dst = (_Float16*)dst_;
    ptrdiff_t i = 0;
#if FO_AVX2
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = (_Float16)src[i];
}

/* ---- q8 ------------------------------------------------------------------ */

static inline void fo_load_q8(const uint8_t* codes, const float* map, float absmax,
                              float* dst, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = map[codes[i]] * absmax;
}

/* y clamped to [-1, 1], NaN to 1: minss/maxss keep the second operand when the
 * first is NaN (written as intrinsics: GCC branches on the plain comparisons). */
static inline float fo_clamp1(float y) {
#if defined(__SSE__) || defined(__x86_64__)
    __m128 v = _mm_min_ss(_mm_set_ss(y), _mm_set_ss(1.0f));
    return _mm_cvtss_f32(_mm_max_ss(v, _mm_set_ss(-1.0f)));
#else
    y = y < 1.0f ? y : 1.0f;
    return y > -1.0f ? y : -1.0f;
#endif
}

/* The block's absmax (NaN if any element is NaN), then the codes. bounds: the 255
 * float32 midpoints of the map plus +inf; table[u]: the number of bounds below the
 * smallest value whose upper 16 bits are u. Exact when no bf16-wide bucket holds two
 * bounds (checked where the table is built). */
static inline float fo_store_q8(const float* src, uint8_t* codes, const float* bounds,
                                const uint8_t* table, ptrdiff_t n) {
    /* |x|'s bits order as |x| does, and a NaN's bits are above every number's */
    uint32_t m = 0, c;
    float am, inv, y;
    for (ptrdiff_t i = 0; i < n; i++) {
        uint32_t a = fo_bits(src[i]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    am = fo_float(m);
    inv = am > 0.0f ? 1.0f / am : 0.0f;
    for (ptrdiff_t i = 0; i < n; i++) {
        y = fo_clamp1(src[i] * inv);
        c = table[fo_bits(y) >> 16];
        codes[i] = (uint8_t)(c + (bounds[c] < y));
    }
    return am;
}

#endif
