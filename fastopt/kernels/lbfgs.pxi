# L-BFGS vector work (the algorithm: fastopt/lbfgs.py): the passes of one
# iteration, fused so that each reads and writes every vector as few times as
# possible. Included after rules.pxi (it uses _max and PARALLEL_MIN from there)
# by _baseline.pyx and _avx2.pyx.
#
# Deterministic reductions. A vector is cut into blocks of LBFGS_BLOCK elements
# at fixed offsets. Inside a block sixteen running sums (lanes) take every
# sixteenth element (lane = (i - lo) % 16; the tail after the last whole group
# goes to lane 0) and are combined as a fixed tree (lane j += lane j + 8, then
# j + 4, j + 2, j + 1); the block sums are then added in block order on the
# calling thread. Threads only decide who computes which block, never how a
# block is summed, so a result is the same bit for bit for any thread count,
# and fastopt.backends._numba_lbfgs repeats the same order exactly. Sums are
# accumulated in float64 for both dtypes: a product of two float32 values is
# exact in float64.
#
# The block loops are C (below), on vectors of four elements: the sixteen lanes
# are four vectors of four doubles, and float32 data is widened four elements
# at a time (one conversion instruction per four elements, not one per element:
# the compiler scalarised the widening when the lanes were a Cython array, and
# the passes ran at a third of the memory's speed). Written with GCC/Clang vector
# extensions; the _baseline build runs them as SSE2 pairs, other compilers as
# plain loops (FASTOPT_LBFGS_PORTABLE forces those for testing), and every
# variant rounds identically: the same IEEE operations in the same order, no
# FMA contraction.

DEF LBFGS_BLOCK = 4096

cdef extern from *:
    """
    #include <string.h>
    #include <math.h>

    #if (defined(__GNUC__) || defined(__clang__)) && !defined(FASTOPT_LBFGS_PORTABLE)
    #define LB_INLINE static inline __attribute__((always_inline))
    #define LB_NOSIGN 0x7fffffffffffffffLL
    typedef float lb_vf __attribute__((vector_size(16)));
    #define LB_OPS(S, V, T) \\
        LB_INLINE V lb_ld_##S(const T* p) { V v; memcpy(&v, p, sizeof v); return v; } \\
        LB_INLINE void lb_st_##S(T* p, V v) { memcpy(p, &v, sizeof v); } \\
        LB_INLINE V lb_add_##S(V a, V b) { return a + b; } \\
        LB_INLINE V lb_sub_##S(V a, V b) { return a - b; } \\
        LB_INLINE V lb_mul_##S(V a, V b) { return a * b; } \\
        LB_INLINE V lb_neg_##S(V a) { return -a; }
    LB_OPS(f, lb_vf, float)
    LB_INLINE lb_vf lb_splat_f(float c) { lb_vf v = {c, c, c, c}; return v; }
    #if defined(__AVX__)
    #include <immintrin.h>
    typedef double lb_vd __attribute__((vector_size(32)));
    typedef long long lb_vi __attribute__((vector_size(32)));
    LB_OPS(d, lb_vd, double)
    LB_INLINE lb_vd lb_splat_d(double c) { lb_vd v = {c, c, c, c}; return v; }
    /* GCC 12 splits __builtin_convertvector into halves through memory here */
    LB_INLINE lb_vd lb_wide_f(lb_vf v) { return (lb_vd)_mm256_cvtps_pd((__m128)v); }
    LB_INLINE lb_vd lb_abs_d(lb_vd a) {
        const lb_vi m = {LB_NOSIGN, LB_NOSIGN, LB_NOSIGN, LB_NOSIGN};
        return (lb_vd)((lb_vi)a & m); }
    LB_INLINE lb_vd lb_max_d(lb_vd m, lb_vd v) {
        /* rules.pxi's _max per lane: m if m > v or m is NaN, else v */
        lb_vi take = (m > v) | (m != m);
        return (lb_vd)((take & (lb_vi)m) | (~take & (lb_vi)v)); }
    LB_INLINE double lb_lane0(lb_vd a) { return a[0]; }
    LB_INLINE lb_vd lb_set_lane0(lb_vd a, double x) { a[0] = x; return a; }
    #else
    /* Without AVX four doubles are two 16-byte halves (a 32-byte vector passed
     * by value would change the ABI, and GCC says so even for inline functions) */
    typedef double lb_d2 __attribute__((vector_size(16)));
    typedef long long lb_i2 __attribute__((vector_size(16)));
    typedef float lb_f2 __attribute__((vector_size(8)));
    typedef struct { lb_d2 lo, hi; } lb_vd;
    #define LB_HALVES(name, op) \\
        LB_INLINE lb_vd name(lb_vd a, lb_vd b) { \\
            a.lo = a.lo op b.lo; a.hi = a.hi op b.hi; return a; }
    LB_HALVES(lb_add_d, +)
    LB_HALVES(lb_sub_d, -)
    LB_HALVES(lb_mul_d, *)
    LB_INLINE lb_vd lb_ld_d(const double* p) { lb_vd v; memcpy(&v, p, sizeof v); return v; }
    LB_INLINE void lb_st_d(double* p, lb_vd v) { memcpy(p, &v, sizeof v); }
    LB_INLINE lb_vd lb_splat_d(double c) { lb_vd v; v.lo = (lb_d2){c, c}; v.hi = v.lo; return v; }
    LB_INLINE lb_vd lb_neg_d(lb_vd a) { a.lo = -a.lo; a.hi = -a.hi; return a; }
    #if defined(__SSE2__)
    #include <emmintrin.h>
    LB_INLINE lb_vd lb_wide_f(lb_vf v) {
        lb_vd r;
        r.lo = (lb_d2)_mm_cvtps_pd((__m128)v);
        r.hi = (lb_d2)_mm_cvtps_pd(_mm_movehl_ps((__m128)v, (__m128)v));
        return r; }
    #else
    LB_INLINE lb_vd lb_wide_f(lb_vf v) {
        lb_f2 lo = {v[0], v[1]}, hi = {v[2], v[3]};
        lb_vd r;
        r.lo = __builtin_convertvector(lo, lb_d2);
        r.hi = __builtin_convertvector(hi, lb_d2);
        return r; }
    #endif
    LB_INLINE lb_d2 lb_abs2(lb_d2 a) {
        const lb_i2 m = {LB_NOSIGN, LB_NOSIGN};
        return (lb_d2)((lb_i2)a & m); }
    LB_INLINE lb_d2 lb_max2(lb_d2 m, lb_d2 v) {
        lb_i2 take = (m > v) | (m != m);
        return (lb_d2)((take & (lb_i2)m) | (~take & (lb_i2)v)); }
    LB_INLINE lb_vd lb_abs_d(lb_vd a) { a.lo = lb_abs2(a.lo); a.hi = lb_abs2(a.hi); return a; }
    LB_INLINE lb_vd lb_max_d(lb_vd m, lb_vd v) {
        m.lo = lb_max2(m.lo, v.lo); m.hi = lb_max2(m.hi, v.hi); return m; }
    LB_INLINE double lb_lane0(lb_vd a) { return a.lo[0]; }
    LB_INLINE lb_vd lb_set_lane0(lb_vd a, double x) { a.lo[0] = x; return a; }
    #endif
    #else
    #define LB_INLINE static CYTHON_INLINE
    typedef struct { float e[4]; } lb_vf;
    typedef struct { double e[4]; } lb_vd;
    #define LB_EACH(expr) { int j_; for (j_ = 0; j_ < 4; j_++) { expr; } }
    #define LB_OPS(S, V, T) \\
        LB_INLINE V lb_ld_##S(const T* p) { V v; memcpy(v.e, p, sizeof v.e); return v; } \\
        LB_INLINE void lb_st_##S(T* p, V v) { memcpy(p, v.e, sizeof v.e); } \\
        LB_INLINE V lb_splat_##S(T c) { V v; LB_EACH(v.e[j_] = c) return v; } \\
        LB_INLINE V lb_add_##S(V a, V b) { LB_EACH(a.e[j_] = a.e[j_] + b.e[j_]) return a; } \\
        LB_INLINE V lb_sub_##S(V a, V b) { LB_EACH(a.e[j_] = a.e[j_] - b.e[j_]) return a; } \\
        LB_INLINE V lb_mul_##S(V a, V b) { LB_EACH(a.e[j_] = a.e[j_] * b.e[j_]) return a; } \\
        LB_INLINE V lb_neg_##S(V a) { LB_EACH(a.e[j_] = -a.e[j_]) return a; }
    LB_OPS(f, lb_vf, float)
    LB_OPS(d, lb_vd, double)
    LB_INLINE lb_vd lb_wide_f(lb_vf v) { lb_vd r; LB_EACH(r.e[j_] = (double)v.e[j_]) return r; }
    LB_INLINE lb_vd lb_abs_d(lb_vd a) { LB_EACH(a.e[j_] = fabs(a.e[j_])) return a; }
    LB_INLINE lb_vd lb_max_d(lb_vd m, lb_vd v) {
        LB_EACH(if (!(m.e[j_] > v.e[j_] || m.e[j_] != m.e[j_])) m.e[j_] = v.e[j_]) return m; }
    LB_INLINE double lb_lane0(lb_vd a) { return a.e[0]; }
    LB_INLINE lb_vd lb_set_lane0(lb_vd a, double x) { a.e[0] = x; return a; }
    #endif
    LB_INLINE lb_vd lb_wide_d(lb_vd v) { return v; }

    static inline double lb_max1(double m, double v) { return (m > v || m != m) ? m : v; }

    /* The sixteen lanes of a block: lane 4k + j is acc[k][j]. */
    LB_INLINE void lb_lanes_zero(lb_vd* acc) {
        int k; for (k = 0; k < 4; k++) acc[k] = lb_splat_d(0.0); }
    LB_INLINE double lb_lanes_sum(const lb_vd* acc) {
        /* the fixed tree: lane j += lane j + 8, then j + 4, j + 2, j + 1 */
        double t[4];
        lb_vd a = lb_add_d(lb_add_d(acc[0], acc[2]), lb_add_d(acc[1], acc[3]));
        memcpy(t, &a, sizeof t);
        return (t[0] + t[2]) + (t[1] + t[3]); }
    LB_INLINE double lb_lanes_max(const lb_vd* acc) {
        double t[16]; int j; double m;
        memcpy(t, acc, sizeof t);
        m = t[0];
        for (j = 1; j < 16; j++) m = lb_max1(m, t[j]);
        return m; }

    enum { LB_NEG, LB_AXPY, LB_AXPY_SCALE, LB_SCALE };

    /* The block kernels for one element type T (suffix S: f float, d double):
     *   update_dot  x <- op(x, a) (-a, x + c1 a, c2 (x + c1 a), c2 x); out[0] = b.x
     *   copy        dst <- src; out = [sum |src|, src.b (0 without b), max |src|]
     *   curvature   y <- g - gp, s <- t d; out = [y.s, y.y]
     *   move        p <- x0 + t d (x0 = p without x0); out[2] = max |t d|
     * Within a group of sixteen, every load comes before every store: the
     * compiler cannot know the vectors never overlap. */
    #define LB_KERNELS(S, T) \\
    LB_INLINE T lb_val1_##S(int op, T x, T a, T c1, T c2) { \\
        return op == LB_NEG ? -a : op == LB_AXPY ? x + c1 * a \\
             : op == LB_AXPY_SCALE ? c2 * (x + c1 * a) : c2 * x; } \\
    LB_INLINE void lb_update_dot_op_##S(int op, T* x, const T* a, const T* b, T c1, T c2, \\
                                        Py_ssize_t lo, Py_ssize_t hi, double* out) { \\
        lb_vd acc[4]; double s0; T v1; int k; Py_ssize_t i = lo; \\
        lb_v##S vc1 = lb_splat_##S(c1), vc2 = lb_splat_##S(c2), v[4]; \\
        lb_lanes_zero(acc); \\
        for (; i + 16 <= hi; i += 16) { \\
            for (k = 0; k < 4; k++) { \\
                const T* ak = a + i + 4 * k; const T* xk = x + i + 4 * k; \\
                if (op == LB_NEG) v[k] = lb_neg_##S(lb_ld_##S(ak)); \\
                else if (op == LB_AXPY) \\
                    v[k] = lb_add_##S(lb_ld_##S(xk), lb_mul_##S(vc1, lb_ld_##S(ak))); \\
                else if (op == LB_AXPY_SCALE) v[k] = lb_mul_##S(vc2, \\
                    lb_add_##S(lb_ld_##S(xk), lb_mul_##S(vc1, lb_ld_##S(ak)))); \\
                else v[k] = lb_mul_##S(vc2, lb_ld_##S(xk)); \\
            } \\
            for (k = 0; k < 4; k++) lb_st_##S(x + i + 4 * k, v[k]); \\
            for (k = 0; k < 4; k++) acc[k] = lb_add_d(acc[k], \\
                lb_mul_d(lb_wide_##S(lb_ld_##S(b + i + 4 * k)), lb_wide_##S(v[k]))); \\
        } \\
        s0 = lb_lane0(acc[0]); \\
        for (; i < hi; i++) { \\
            v1 = lb_val1_##S(op, x[i], a[i], c1, c2); \\
            x[i] = v1; \\
            s0 = s0 + (double)b[i] * (double)v1; \\
        } \\
        acc[0] = lb_set_lane0(acc[0], s0); \\
        out[0] = lb_lanes_sum(acc); } \\
    static void lb_update_dot_##S(int op, T* x, const T* a, const T* b, T c1, T c2, \\
                                  Py_ssize_t lo, Py_ssize_t hi, double* out) { \\
        /* one loop per op: the op is a constant in each */ \\
        switch (op) { \\
        case LB_NEG: lb_update_dot_op_##S(LB_NEG, x, a, b, c1, c2, lo, hi, out); break; \\
        case LB_AXPY: lb_update_dot_op_##S(LB_AXPY, x, a, b, c1, c2, lo, hi, out); break; \\
        case LB_AXPY_SCALE: \\
            lb_update_dot_op_##S(LB_AXPY_SCALE, x, a, b, c1, c2, lo, hi, out); break; \\
        default: lb_update_dot_op_##S(LB_SCALE, x, a, b, c1, c2, lo, hi, out); } } \\
    LB_INLINE void lb_copy_b_##S(int has_b, T* dst, const T* src, const T* b, \\
                                 Py_ssize_t lo, Py_ssize_t hi, double* out) { \\
        lb_vd asum[4], dot[4], mx[4], w; double a0, d0, m0, v1; int k; Py_ssize_t i = lo; \\
        lb_v##S v[4]; \\
        lb_lanes_zero(asum); lb_lanes_zero(dot); lb_lanes_zero(mx); \\
        for (; i + 16 <= hi; i += 16) { \\
            for (k = 0; k < 4; k++) { \\
                v[k] = lb_ld_##S(src + i + 4 * k); \\
                w = lb_abs_d(lb_wide_##S(v[k])); \\
                asum[k] = lb_add_d(asum[k], w); \\
                mx[k] = lb_max_d(mx[k], w); \\
                if (has_b) { \\
                    lb_vd wb = lb_wide_##S(lb_ld_##S(b + i + 4 * k)); \\
                    dot[k] = lb_add_d(dot[k], lb_mul_d(lb_wide_##S(v[k]), wb)); \\
                } \\
            } \\
            for (k = 0; k < 4; k++) lb_st_##S(dst + i + 4 * k, v[k]); \\
        } \\
        a0 = lb_lane0(asum[0]); d0 = lb_lane0(dot[0]); m0 = lb_lane0(mx[0]); \\
        for (; i < hi; i++) { \\
            v1 = (double)src[i]; \\
            dst[i] = src[i]; \\
            a0 = a0 + fabs(v1); \\
            m0 = lb_max1(m0, fabs(v1)); \\
            if (has_b) d0 = d0 + v1 * (double)b[i]; \\
        } \\
        asum[0] = lb_set_lane0(asum[0], a0); dot[0] = lb_set_lane0(dot[0], d0); \\
        mx[0] = lb_set_lane0(mx[0], m0); \\
        out[0] = lb_lanes_sum(asum); out[1] = lb_lanes_sum(dot); out[2] = lb_lanes_max(mx); } \\
    static void lb_copy_##S(T* dst, const T* src, const T* b, Py_ssize_t lo, Py_ssize_t hi, \\
                            double* out) { \\
        if (b != NULL) lb_copy_b_##S(1, dst, src, b, lo, hi, out); \\
        else lb_copy_b_##S(0, dst, src, b, lo, hi, out); } \\
    static void lb_curvature_##S(const T* g, const T* gp, const T* d, T t, T* y, T* s, \\
                                 Py_ssize_t lo, Py_ssize_t hi, double* out) { \\
        lb_vd ys[4], yy[4]; double ys0, yy0; T yv, sv; int k; Py_ssize_t i = lo; \\
        lb_v##S vt = lb_splat_##S(t), yk[4], sk[4]; \\
        lb_lanes_zero(ys); lb_lanes_zero(yy); \\
        for (; i + 16 <= hi; i += 16) { \\
            for (k = 0; k < 4; k++) { \\
                yk[k] = lb_sub_##S(lb_ld_##S(g + i + 4 * k), lb_ld_##S(gp + i + 4 * k)); \\
                sk[k] = lb_mul_##S(vt, lb_ld_##S(d + i + 4 * k)); \\
            } \\
            for (k = 0; k < 4; k++) { \\
                lb_st_##S(y + i + 4 * k, yk[k]); lb_st_##S(s + i + 4 * k, sk[k]); \\
                ys[k] = lb_add_d(ys[k], lb_mul_d(lb_wide_##S(yk[k]), lb_wide_##S(sk[k]))); \\
                yy[k] = lb_add_d(yy[k], lb_mul_d(lb_wide_##S(yk[k]), lb_wide_##S(yk[k]))); \\
            } \\
        } \\
        ys0 = lb_lane0(ys[0]); yy0 = lb_lane0(yy[0]); \\
        for (; i < hi; i++) { \\
            yv = g[i] - gp[i]; sv = t * d[i]; \\
            y[i] = yv; s[i] = sv; \\
            ys0 = ys0 + (double)yv * (double)sv; \\
            yy0 = yy0 + (double)yv * (double)yv; \\
        } \\
        ys[0] = lb_set_lane0(ys[0], ys0); yy[0] = lb_set_lane0(yy[0], yy0); \\
        out[0] = lb_lanes_sum(ys); out[1] = lb_lanes_sum(yy); } \\
    static void lb_move_##S(T* p, const T* x0, const T* d, T t, Py_ssize_t lo, Py_ssize_t hi, \\
                            double* out) { \\
        lb_vd mx[4]; double m0; T sd; int k; Py_ssize_t i = lo; \\
        lb_v##S vt = lb_splat_##S(t), sk[4], pk[4]; \\
        if (x0 == NULL) x0 = p; \\
        lb_lanes_zero(mx); \\
        for (; i + 16 <= hi; i += 16) { \\
            for (k = 0; k < 4; k++) { \\
                sk[k] = lb_mul_##S(vt, lb_ld_##S(d + i + 4 * k)); \\
                pk[k] = lb_add_##S(lb_ld_##S(x0 + i + 4 * k), sk[k]); \\
            } \\
            for (k = 0; k < 4; k++) { \\
                lb_st_##S(p + i + 4 * k, pk[k]); \\
                mx[k] = lb_max_d(mx[k], lb_abs_d(lb_wide_##S(sk[k]))); \\
            } \\
        } \\
        m0 = lb_lane0(mx[0]); \\
        for (; i < hi; i++) { \\
            sd = t * d[i]; \\
            p[i] = x0[i] + sd; \\
            m0 = lb_max1(m0, fabs((double)sd)); \\
        } \\
        mx[0] = lb_set_lane0(mx[0], m0); \\
        out[2] = lb_lanes_max(mx); }
    LB_KERNELS(f, float)
    LB_KERNELS(d, double)
    """
    enum: LB_NEG, LB_AXPY, LB_AXPY_SCALE, LB_SCALE
    void lb_update_dot_f(int op, float* x, const float* a, const float* b, float c1,
                         float c2, Py_ssize_t lo, Py_ssize_t hi, double* out) noexcept nogil
    void lb_update_dot_d(int op, double* x, const double* a, const double* b, double c1,
                         double c2, Py_ssize_t lo, Py_ssize_t hi, double* out) noexcept nogil
    void lb_copy_f(float* dst, const float* src, const float* b, Py_ssize_t lo,
                   Py_ssize_t hi, double* out) noexcept nogil
    void lb_copy_d(double* dst, const double* src, const double* b, Py_ssize_t lo,
                   Py_ssize_t hi, double* out) noexcept nogil
    void lb_curvature_f(const float* g, const float* gp, const float* d, float t, float* y,
                        float* s, Py_ssize_t lo, Py_ssize_t hi, double* out) noexcept nogil
    void lb_curvature_d(const double* g, const double* gp, const double* d, double t,
                        double* y, double* s, Py_ssize_t lo, Py_ssize_t hi,
                        double* out) noexcept nogil
    void lb_move_f(float* p, const float* x0, const float* d, float t, Py_ssize_t lo,
                   Py_ssize_t hi, double* out) noexcept nogil
    void lb_move_d(double* p, const double* x0, const double* d, double t, Py_ssize_t lo,
                   Py_ssize_t hi, double* out) noexcept nogil


cdef enum LbfgsPass:
    P_UPDATE_DOT, P_COPY, P_CURVATURE, P_MOVE


cdef inline void _lb_block(LbfgsPass kind, int op, floating* x, floating* x2,
                           const floating* a, const floating* b, const floating* c,
                           floating c1, floating c2, Py_ssize_t lo, Py_ssize_t hi,
                           double* out) noexcept nogil:
    if floating is float:
        if kind == P_UPDATE_DOT:
            lb_update_dot_f(op, x, a, b, c1, c2, lo, hi, out)
        elif kind == P_COPY:
            lb_copy_f(x, a, b, lo, hi, out)
        elif kind == P_CURVATURE:
            lb_curvature_f(a, b, c, c1, x, x2, lo, hi, out)
        else:
            lb_move_f(x, b, a, c1, lo, hi, out)
    else:
        if kind == P_UPDATE_DOT:
            lb_update_dot_d(op, x, a, b, c1, c2, lo, hi, out)
        elif kind == P_COPY:
            lb_copy_d(x, a, b, lo, hi, out)
        elif kind == P_CURVATURE:
            lb_curvature_d(a, b, c, c1, x, x2, lo, hi, out)
        else:
            lb_move_d(x, b, a, c1, lo, hi, out)


cdef void _lb_pass(LbfgsPass kind, int op, floating* x, floating* x2,
                   const floating* a, const floating* b, const floating* c, double c1,
                   double c2, Py_ssize_t n, int nthreads, double* part,
                   double* res) noexcept nogil:
    # One pass over n elements; res = [sum of out[0], sum of out[1], max of out[2]]
    # over the blocks, in block order.
    cdef Py_ssize_t nblk = (n + LBFGS_BLOCK - 1) // LBFGS_BLOCK, k, lo, hi
    cdef floating fc1 = <floating>c1, fc2 = <floating>c2
    cdef double r0 = 0, r1 = 0, r2 = 0
    if nthreads <= 1 or n < PARALLEL_MIN or not FASTOPT_HAVE_OPENMP:
        for k in range(nblk):
            lo = k * LBFGS_BLOCK
            hi = lo + LBFGS_BLOCK
            if hi > n:
                hi = n
            _lb_block(kind, op, x, x2, a, b, c, fc1, fc2, lo, hi, &part[3 * k])
    else:
        for k in prange(nblk, schedule="static", num_threads=nthreads):
            lo = k * LBFGS_BLOCK
            hi = lo + LBFGS_BLOCK
            if hi > n:
                hi = n
            _lb_block(kind, op, x, x2, a, b, c, fc1, fc2, lo, hi, &part[3 * k])
    for k in range(nblk):
        r0 = r0 + part[3 * k]
        r1 = r1 + part[3 * k + 1]
        r2 = _max(r2, part[3 * k + 2])
    res[0] = r0
    res[1] = r1
    res[2] = r2


# --------------------------------------------------------------------------
# Entry points, called by fastopt.lbfgs.LBFGSCore on its own buffers (allocated
# once, checked there): every array is C-contiguous, of one dtype and length n.
# ``part`` is float64 scratch of at least 3 * lbfgs_blocks(n) elements.
# --------------------------------------------------------------------------

def lbfgs_blocks(Py_ssize_t n):
    """The number of reduction blocks of an n-element vector."""
    return (n + LBFGS_BLOCK - 1) // LBFGS_BLOCK


cdef inline void _lb_check_part(double[::1] part, Py_ssize_t n) except *:
    if part.shape[0] < 3 * ((n + LBFGS_BLOCK - 1) // LBFGS_BLOCK):
        raise ValueError(f"part has {part.shape[0]} elements; an {n}-element vector "
                         f"needs {3 * ((n + LBFGS_BLOCK - 1) // LBFGS_BLOCK)}")


def lbfgs_copy(floating[::1] dst, const floating[::1] src, const floating[::1] other,
               double[::1] part, int nthreads):
    """dst <- src; returns (sum |src|, src . other (0 if other is None), max |src|).
    The max is NaN if src holds a NaN."""
    cdef Py_ssize_t n = dst.shape[0]
    cdef double res[3]
    cdef const floating* b = NULL
    if src.shape[0] != n or (other is not None and other.shape[0] != n):
        raise ValueError("lbfgs_copy: lengths differ")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0, 0.0, 0.0
    if other is not None:
        b = &other[0]
    with nogil:
        _lb_pass(P_COPY, LB_NEG, &dst[0], NULL, &src[0], b, NULL, 0, 0, n, nthreads,
                 &part[0], res)
    return res[0], res[1], res[2]


def lbfgs_curvature(const floating[::1] g, const floating[::1] g_prev,
                    const floating[::1] d, double t, floating[::1] y, floating[::1] s,
                    double[::1] part, int nthreads):
    """y <- g - g_prev, s <- t*d (t rounded to the dtype); returns (y.s, y.y)."""
    cdef Py_ssize_t n = g.shape[0]
    cdef double res[3]
    if g_prev.shape[0] != n or d.shape[0] != n or y.shape[0] != n or s.shape[0] != n:
        raise ValueError("lbfgs_curvature: lengths differ")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0, 0.0
    with nogil:
        _lb_pass(P_CURVATURE, LB_NEG, &y[0], &s[0], &g[0], &g_prev[0], &d[0], t, 0, n,
                 nthreads, &part[0], res)
    return res[0], res[1]


def lbfgs_move(floating[::1] p, const floating[::1] x0, const floating[::1] d, double t,
               double[::1] part, int nthreads):
    """p <- p + t*d (x0 None) or p <- x0 + t*d; returns max |t*d| (NaN if any
    t*d is NaN). t is rounded to the dtype first."""
    cdef Py_ssize_t n = p.shape[0]
    cdef double res[3]
    cdef const floating* b = NULL
    if d.shape[0] != n or (x0 is not None and x0.shape[0] != n):
        raise ValueError("lbfgs_move: lengths differ")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0
    if x0 is not None:
        b = &x0[0]
    with nogil:
        _lb_pass(P_MOVE, LB_NEG, &p[0], NULL, &d[0], b, NULL, t, 0, n, nthreads, &part[0],
                 res)
    return res[2]


cdef double _lb_two_loop(const floating* g, floating* d, floating* S, floating* Y,
                         const double* ro, double* alpha, Py_ssize_t start,
                         Py_ssize_t count, Py_ssize_t rows, double H_diag, Py_ssize_t n,
                         int nthreads, double* part, double* res) noexcept nogil:
    cdef Py_ssize_t j, k, nxt
    cdef double dot, beta
    # q = -g, with s_newest . q
    k = (start + count - 1) % rows
    _lb_pass(P_UPDATE_DOT, LB_NEG, d, NULL, g, S + k * n, NULL, 0, 0, n,
             nthreads, part, res)
    dot = res[0]
    j = count - 1
    while j >= 0:
        k = (start + j) % rows
        alpha[k] = ro[k] * dot
        if j > 0:
            # q <- q - a_j y_j, with s_{j-1} . q
            nxt = (start + j - 1) % rows
            _lb_pass(P_UPDATE_DOT, LB_AXPY, d, NULL, Y + k * n, S + nxt * n, NULL,
                     -alpha[k], 0, n, nthreads, part, res)
        else:
            # r <- H_diag (q - a_0 y_0), with y_0 . r
            _lb_pass(P_UPDATE_DOT, LB_AXPY_SCALE, d, NULL, Y + k * n, Y + k * n,
                     NULL, -alpha[k], H_diag, n, nthreads, part, res)
        dot = res[0]
        j = j - 1
    for j in range(count):
        k = (start + j) % rows
        beta = ro[k] * dot
        # r <- r + (a_j - b_j) s_j, with y_{j+1} . r (g . d after the newest)
        if j + 1 < count:
            nxt = (start + j + 1) % rows
            _lb_pass(P_UPDATE_DOT, LB_AXPY, d, NULL, S + k * n, Y + nxt * n, NULL,
                     alpha[k] - beta, 0, n, nthreads, part, res)
        else:
            _lb_pass(P_UPDATE_DOT, LB_AXPY, d, NULL, S + k * n, g, NULL,
                     alpha[k] - beta, 0, n, nthreads, part, res)
        dot = res[0]
    return dot


def lbfgs_direction(const floating[::1] g, floating[::1] d, floating[:, ::1] S,
                    floating[:, ::1] Y, const double[::1] ro, double[::1] alpha,
                    Py_ssize_t start, Py_ssize_t count, double H_diag, bint first,
                    double[::1] part, int nthreads):
    """The search direction into d, and returns g.d.

    first: d <- -g. Otherwise the two-loop recursion over the ``count`` pairs
    (rows (start + j) % rows of S and Y, oldest first, ro[j] = 1/(y.s) in the
    same row numbering): q <- -g; newest to oldest a_j = ro_j s_j.q,
    q <- q - a_j y_j; r <- H_diag q; oldest to newest b_j = ro_j y_j.r,
    r <- r + (a_j - b_j) s_j; d <- r. Every dot is fused into the pass that
    writes the vector it reads, so the recursion makes 2*count + 1 passes over
    n (2 when count is 0), each reading two vectors and updating d.
    """
    cdef Py_ssize_t n = g.shape[0], rows = S.shape[0]
    cdef double res[3]
    cdef double dot
    if d.shape[0] != n or S.shape[1] != n or Y.shape[1] != n or Y.shape[0] != rows:
        raise ValueError("lbfgs_direction: shapes differ")
    if not 0 <= count <= rows or not 0 <= start < max(rows, 1) or ro.shape[0] < rows \
            or alpha.shape[0] < rows:
        raise ValueError("lbfgs_direction: bad history bounds")
    _lb_check_part(part, n)
    if n == 0:
        return 0.0
    with nogil:
        if first or count == 0:
            # d = -g; after the first iteration, with no pair kept, d = H_diag * -g
            _lb_pass(P_UPDATE_DOT, LB_NEG, &d[0], NULL, &g[0], &g[0], NULL, 0, 0, n,
                     nthreads, &part[0], res)
            if not first:
                _lb_pass(P_UPDATE_DOT, LB_SCALE, &d[0], NULL, &g[0], &g[0], NULL, 0,
                         H_diag, n, nthreads, &part[0], res)
            dot = res[0]
            count = 0
        else:
            dot = _lb_two_loop(&g[0], &d[0], &S[0, 0], &Y[0, 0], &ro[0], &alpha[0],
                               start, count, rows, H_diag, n, nthreads, &part[0], res)
    return dot

