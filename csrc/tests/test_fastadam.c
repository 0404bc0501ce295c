/*
 * test_fastadam.c - C-only test driver for libfastadam_c, meant to be built
 * together with the library sources under AddressSanitizer and UBSan
 * (tests/test_c_sanitizers.py does that; by hand, from the repository root):
 *
 *   F="-O3 -fno-fast-math -ffp-contract=off -fno-math-errno -fopenmp -g \
 *      -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
 *   gcc $F -Icsrc -DFA_VARIANT=baseline -c csrc/fastadam_kernel.c -o kb.o
 *   gcc $F -Icsrc -DFA_VARIANT=avx2 -mavx2 -mfma -c csrc/fastadam_kernel.c -o k2.o
 *   gcc $F -Icsrc -DFA_VARIANT=avx512 -mavx512f -mavx512vl -mavx512bw -mfma \
 *       -c csrc/fastadam_kernel.c -o k5.o
 *   gcc $F -Icsrc -DFA_HAVE_AVX2 -DFA_HAVE_AVX512 csrc/fastadam.c \
 *       csrc/tests/test_fastadam.c kb.o k2.o k5.o -lm -o test_fastadam
 *   ./test_fastadam
 *
 * For aarch64 (only the baseline variant there, which is NEON), cross-built
 * and run under qemu-user by tests/test_c_aarch64.py:
 *
 *   F="-O3 -fno-fast-math -ffp-contract=off -fno-math-errno -fopenmp"
 *   aarch64-linux-gnu-gcc $F -Icsrc -DFA_VARIANT=baseline csrc/fastadam_kernel.c \
 *       csrc/fastadam.c csrc/tests/test_fastadam.c -lm -o test_fastadam
 *   qemu-aarch64 -L /usr/aarch64-linux-gnu ./test_fastadam
 *
 * Without -fopenmp (library and driver alike) it checks the one-thread build:
 * fa_get_num_threads() must then say 1 whatever was set.
 *
 * Without arguments it runs itself once per ISA variant the CPU supports
 * (FASTADAM_ISA in the child's environment; in this process when only the
 * baseline variant is compiled) and exits 0 only if all passed.
 * Each run calls every entry point -- fa_adam_f32, fa_adam_f64,
 * fa_adam_f32_bf16(_at), fa_unscale_check_f32/f64 -- for every flag
 * combination, every size 0..70 and a few larger odd ones (two of them past
 * the library's parallel threshold of 32768 elements), on 1 and 2 threads,
 * and compares the results bit for bit with the plain scalar C
 * implementation of the math below. The multi-tensor entry points
 * (fa_adam_multi_*) run over lists of uneven, empty, tiny and (in total)
 * large tensors, with per-tensor scalars and rounding keys, and must match
 * one single-array call per tensor bit for bit. Every array is its own malloc of exactly
 * n elements (sometimes starting one element into its block, to move the
 * alignment), so the sanitizer reports any access past either end; an array
 * the call must not touch (max_exp_avg_sq without amsgrad) is a zero-byte
 * block, and the argument-error calls get pointers into an inaccessible
 * mapping, so any access to them is reported too.
 */
#define _GNU_SOURCE /* setenv */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fastadam.h"

static long g_checks;
static long g_failures;

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL [%s] ", fa_isa());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    if (++g_failures > 20) {
        fprintf(stderr, "too many failures\n");
        exit(1);
    }
}

#define CHECK(cond, ...)            \
    do {                            \
        g_checks++;                 \
        if (!(cond))                \
            fail(__VA_ARGS__);      \
    } while (0)

/* ------------------------------------------------------ random data -- */

static uint64_t g_rng = 0x9E3779B97F4A7C15u;

static uint64_t next_u64(void) /* splitmix64 */
{
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static double uniform(void)
{
    return (double)(next_u64() >> 11) * 0x1.0p-52 - 1.0;
}

static uint32_t f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static const double SPECIALS[] = {
    NAN, -NAN, INFINITY, -INFINITY, 0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 3.4e38, -3.4e38,
    4.9e-324, 1e-30,
};
#define N_SPECIALS (sizeof SPECIALS / sizeof SPECIALS[0])

/* A value of the given scale, now and then a special one (NaN, Inf, +-0,
 * subnormals, huge values). */
static double sample(double scale, int positive)
{
    if (next_u64() % 16 == 0)
        return SPECIALS[next_u64() % N_SPECIALS];
    const double x = uniform() * scale;
    return positive ? fabs(x) : x;
}

/* bfloat16 patterns for the states: NaNs (quiet, signalling, negative), Infs,
 * signed zeros, subnormals, the smallest normal, the largest finite. */
static const uint16_t BF16_SPECIALS[] = {0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x0000,
                                         0x8000, 0x0001, 0x8001, 0x0080, 0x7F7F};

static uint16_t sample_bf16(double scale, int positive)
{
    if (next_u64() % 16 == 0)
        return BF16_SPECIALS[next_u64() % (sizeof BF16_SPECIALS / sizeof BF16_SPECIALS[0])];
    return (uint16_t)(f32_bits((float)sample(scale, positive)) >> 16);
}

/* ------------------------------------------------------- allocation -- */

/*
 * An array of exactly n elements of `size` bytes, starting `offset` (0 or 1)
 * elements into its own malloc block, so the first and the last element sit
 * right against the block's ends. Zero elements give a zero-byte block: a
 * valid pointer that may not be dereferenced at all.
 */
typedef struct {
    void *block;
    void *data;
} buf;

static buf buf_new(int64_t n, size_t size, int offset)
{
    buf b;
    b.block = malloc((size_t)(n + offset) * size);
    if (b.block == NULL && n + offset > 0) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    if (b.block == NULL) /* malloc(0) may return NULL; keep a unique valid pointer */
        b.block = malloc(1);
    b.data = (char *)b.block + (size_t)offset * size;
    return b;
}

static void buf_free(buf *b)
{
    free(b->block);
    b->block = b->data = NULL;
}

/* A zero-byte block: any access through it is a sanitizer report. */
static void *untouchable(void)
{
    void *p = malloc(0);
    return p != NULL ? p : malloc(1); /* malloc(1) only if malloc(0) gives NULL */
}

/* -------------------------------------------------- bit comparisons -- */

/* Equal bits, except that any NaN equals any NaN (IEEE leaves payloads and
 * the sign of a computed NaN open, and the compiler may swap the operands of
 * a commutative operation). */
static int same_f32(float a, float b)
{
    return (isnan(a) && isnan(b)) || f32_bits(a) == f32_bits(b);
}

static int same_f64(double a, double b)
{
    uint64_t x, y;
    memcpy(&x, &a, sizeof x);
    memcpy(&y, &b, sizeof y);
    return (isnan(a) && isnan(b)) || x == y;
}

static int bf16_is_nan(uint16_t h)
{
    return (h & 0x7FFF) > 0x7F80;
}

static int same_bf16(uint16_t a, uint16_t b)
{
    return (bf16_is_nan(a) && bf16_is_nan(b)) || a == b;
}

/* ------------------------------------------------------ the reference -- */

/*
 * The update of fastadam.h, one element at a time, as directly as C allows.
 * Each scalar is rounded to T once; every operation is in T, in the header's
 * order (the build has no FMA contraction).
 */
#define DEFINE_REF_ADAM(name, T, SQRT)                                                        \
    static void name(T *param, T *grad, T *exp_avg, T *exp_avg_sq, T *vmax, int64_t n,         \
                     const fa_adam_scalars *sc)                                               \
    {                                                                                         \
        const T step_size = (T)sc->step_size, bc2 = (T)sc->bias_correction2_sqrt;             \
        const T eps = (T)sc->eps, omb1 = (T)sc->one_minus_beta1, beta2 = (T)sc->beta2;        \
        const T omb2 = (T)sc->one_minus_beta2, wd = (T)sc->weight_decay;                      \
        const T decay = (T)sc->decay, scale = (T)sc->grad_scale;                              \
        for (int64_t i = 0; i < n; i++) {                                                     \
            T g = grad[i];                                                                    \
            if (sc->unscale) {                                                                \
                g = g / scale;                                                                \
                grad[i] = g;                                                                  \
            }                                                                                 \
            if (sc->maximize)                                                                 \
                g = -g;                                                                       \
            T p = param[i];                                                                   \
            if (sc->weight_decay != 0.0)                                                      \
                g = g + wd * p;                                                               \
            p = p * decay;                                                                    \
            T m = exp_avg[i];                                                                 \
            m = m + (g - m) * omb1;                                                           \
            T v = exp_avg_sq[i];                                                              \
            v = v * beta2 + omb2 * g * g;                                                     \
            exp_avg[i] = m;                                                                   \
            exp_avg_sq[i] = v;                                                                \
            T second = v;                                                                     \
            if (sc->amsgrad) {                                                                \
                /* np.maximum: NaN wins; otherwise the larger; on a tie the second. */       \
                if (isnan(vmax[i]) || vmax[i] > v)                                            \
                    second = vmax[i];                                                         \
                vmax[i] = second;                                                             \
            }                                                                                 \
            const T denom = SQRT(second) / bc2 + eps;                                         \
            param[i] = p - step_size * m / denom;                                             \
        }                                                                                     \
    }

DEFINE_REF_ADAM(ref_adam_f32, float, sqrtf)
DEFINE_REF_ADAM(ref_adam_f64, double, sqrt)

static uint32_t mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* float32 -> bfloat16 bits: NaN -> quiet NaN; else add `add` and truncate. */
static uint16_t ref_round(float x, int stochastic, uint32_t r16)
{
    const uint32_t u = f32_bits(x);
    if (isnan(x))
        return (uint16_t)((u >> 16) | 0x0040);
    const uint32_t add = stochastic ? r16 : 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)((u + add) >> 16);
}

static float widen(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

static void ref_adam_bf16(float *param, float *grad, uint16_t *exp_avg, uint16_t *exp_avg_sq,
                          uint16_t *vmax, int64_t n, int64_t first_index,
                          const fa_adam_scalars *sc)
{
    const float step_size = (float)sc->step_size, bc2 = (float)sc->bias_correction2_sqrt;
    const float eps = (float)sc->eps, omb1 = (float)sc->one_minus_beta1;
    const float beta2 = (float)sc->beta2, omb2 = (float)sc->one_minus_beta2;
    const float wd = (float)sc->weight_decay, decay = (float)sc->decay;
    const float scale = (float)sc->grad_scale;
    const int stochastic = sc->state_rounding == FA_STATE_BF16_STOCHASTIC;
    for (int64_t k = 0; k < n; k++) {
        const uint64_t i = (uint64_t)first_index + (uint64_t)k; /* the global index */
        const uint32_t r = mix32((uint32_t)i ^ mix32(sc->rounding_key ^ (uint32_t)(i >> 32)));
        float g = grad[k];
        if (sc->unscale) {
            g = g / scale;
            grad[k] = g;
        }
        if (sc->maximize)
            g = -g;
        float p = param[k];
        if (sc->weight_decay != 0.0)
            g = g + wd * p;
        p = p * decay;
        float m = widen(exp_avg[k]);
        m = m + (g - m) * omb1;
        float v = widen(exp_avg_sq[k]);
        v = v * beta2 + omb2 * g * g;
        exp_avg[k] = ref_round(m, stochastic, r & 0xFFFFu);
        exp_avg_sq[k] = ref_round(v, stochastic, r >> 16);
        m = widen(exp_avg[k]);
        v = widen(exp_avg_sq[k]);
        float second = v;
        if (sc->amsgrad) {
            const float old = widen(vmax[k]);
            if (isnan(old) || old > v)
                second = old;
            vmax[k] = (uint16_t)(f32_bits(second) >> 16);
        }
        const float denom = sqrtf(second) / bc2 + eps;
        param[k] = p - step_size * m / denom;
    }
}

/* ------------------------------------------------------------ scalars -- */

enum { F_L2 = 1, F_AMSGRAD = 2, F_UNSCALE = 4, F_MAXIMIZE = 8 };

/* The scalars of fastadam._scalars.compute_scalars for one flag combination
 * (float64 math; AdamW's decay on some combinations). */
static fa_adam_scalars make_scalars(int flags, int variant, int rounding, uint32_t key)
{
    const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, step = 3.0 + variant;
    fa_adam_scalars sc;
    memset(&sc, 0, sizeof sc);
    sc.step_size = lr / (1.0 - pow(beta1, step));
    sc.bias_correction2_sqrt = sqrt(1.0 - pow(beta2, step));
    sc.eps = 1e-8;
    sc.one_minus_beta1 = 1.0 - beta1;
    sc.beta2 = beta2;
    sc.one_minus_beta2 = 1.0 - beta2;
    sc.weight_decay = (flags & F_L2) ? 0.1 : 0.0;
    sc.decay = (variant % 2) ? 1.0 - lr * 0.05 : 1.0;
    sc.grad_scale = (flags & F_UNSCALE) ? 3.0 : 1.0; /* 3: not a power of two */
    sc.unscale = (flags & F_UNSCALE) != 0;
    sc.maximize = (flags & F_MAXIMIZE) != 0;
    sc.amsgrad = (flags & F_AMSGRAD) != 0;
    sc.state_rounding = rounding;
    sc.rounding_key = key;
    return sc;
}

/* ---------------------------------------------------------- the steps -- */

/* One fa_adam_f32 or fa_adam_f64 call on fresh random arrays of n elements,
 * against the reference on copies. */
#define DEFINE_CHECK_STEP(name, T, fn, ref, same, tname)                                         \
    static void name(int64_t n, int flags, int variant)                                        \
    {                                                                                          \
        const fa_adam_scalars sc = make_scalars(flags, variant, FA_STATE_SAME_DTYPE, 0);       \
        const int ams = (flags & F_AMSGRAD) != 0;                                              \
        buf a[5], r[5];                                                                        \
        for (int k = 0; k < 5; k++) {                                                          \
            const int off = (int)(next_u64() % 2);                                             \
            a[k] = buf_new(n, sizeof(T), off);                                                 \
            r[k] = buf_new(n, sizeof(T), 0);                                                   \
            T *x = a[k].data;                                                                  \
            for (int64_t i = 0; i < n; i++)                                                    \
                x[i] = (T)sample(k == 2 ? 0.1 : k >= 3 ? 0.01 : 1.0, k >= 3);                  \
            memcpy(r[k].data, a[k].data, (size_t)n * sizeof(T));                               \
        }                                                                                      \
        void *const none = untouchable(); /* max_exp_avg_sq without amsgrad */                 \
        T *const vmax = ams ? a[4].data : (variant % 2 ? NULL : none);                         \
        const int rc = fn(a[0].data, a[1].data, a[2].data, a[3].data, vmax, n, &sc);           \
        CHECK(rc == FA_OK, "%s n=%" PRId64 " flags=%d: rc %d", tname, n, flags, rc);          \
        ref(r[0].data, r[1].data, r[2].data, r[3].data, ams ? r[4].data : NULL, n, &sc);      \
        for (int k = 0; k < (ams ? 5 : 4); k++) {                                              \
            const T *x = a[k].data, *y = r[k].data;                                            \
            for (int64_t i = 0; i < n; i++)                                                    \
                if (!same(x[i], y[i])) {                                                       \
                    fail("%s n=%" PRId64 " flags=%d variant=%d: array %d element %" PRId64     \
                         " is %a, expected %a",                                                \
                         tname, n, flags, variant, k, i, (double)x[i], (double)y[i]);          \
                    break;                                                                     \
                }                                                                              \
            g_checks++;                                                                        \
        }                                                                                      \
        free(none);                                                                            \
        for (int k = 0; k < 5; k++) {                                                          \
            buf_free(&a[k]);                                                                   \
            buf_free(&r[k]);                                                                   \
        }                                                                                      \
    }

DEFINE_CHECK_STEP(check_f32, float, fa_adam_f32, ref_adam_f32, same_f32, "f32")
DEFINE_CHECK_STEP(check_f64, double, fa_adam_f64, ref_adam_f64, same_f64, "f64")

/* One fa_adam_f32_bf16 (first_index 0) or fa_adam_f32_bf16_at call. */
static void check_bf16(int64_t n, int flags, int rounding, int64_t first_index)
{
    const uint32_t key = (uint32_t)next_u64();
    const fa_adam_scalars sc = make_scalars(flags, (int)(n % 2), rounding, key);
    const int ams = (flags & F_AMSGRAD) != 0;
    buf a[5], r[5];
    for (int k = 0; k < 5; k++) {
        const size_t size = k < 2 ? sizeof(float) : sizeof(uint16_t);
        const int off = (int)(next_u64() % 2);
        a[k] = buf_new(n, size, off);
        r[k] = buf_new(n, size, 0);
        for (int64_t i = 0; i < n; i++) {
            if (k < 2)
                ((float *)a[k].data)[i] = (float)sample(1.0, 0);
            else
                ((uint16_t *)a[k].data)[i] = sample_bf16(k == 2 ? 0.1 : 0.01, k >= 3);
        }
        memcpy(r[k].data, a[k].data, (size_t)n * size);
    }
    void *const none = untouchable();
    uint16_t *const vmax = ams ? a[4].data : (n % 2 ? NULL : none);
    const int rc = first_index == 0
                       ? fa_adam_f32_bf16(a[0].data, a[1].data, a[2].data, a[3].data, vmax, n,
                                          &sc)
                       : fa_adam_f32_bf16_at(a[0].data, a[1].data, a[2].data, a[3].data, vmax,
                                             n, first_index, &sc);
    CHECK(rc == FA_OK, "bf16 n=%" PRId64 " flags=%d: rc %d", n, flags, rc);
    ref_adam_bf16(r[0].data, r[1].data, r[2].data, r[3].data, ams ? r[4].data : NULL, n,
                  first_index, &sc);
    for (int k = 0; k < (ams ? 5 : 4); k++) {
        for (int64_t i = 0; i < n; i++) {
            int ok;
            double got, want;
            if (k < 2) {
                got = ((float *)a[k].data)[i];
                want = ((float *)r[k].data)[i];
                ok = same_f32((float)got, (float)want);
            } else {
                const uint16_t x = ((uint16_t *)a[k].data)[i], y = ((uint16_t *)r[k].data)[i];
                got = x;
                want = y;
                ok = same_bf16(x, y);
            }
            if (!ok) {
                fail("bf16 n=%" PRId64 " flags=%d rounding=%d first=%" PRId64
                     ": array %d element %" PRId64 " is %a, expected %a",
                     n, flags, rounding, first_index, k, i, got, want);
                break;
            }
        }
        g_checks++;
    }
    free(none);
    for (int k = 0; k < 5; k++) {
        buf_free(&a[k]);
        buf_free(&r[k]);
    }
}

/* fa_unscale_check_f32/f64 against a division loop and an isfinite scan. */
#define DEFINE_CHECK_UNSCALE(name, T, fn, same, tname)                                       \
    static void name(int64_t n, double scale, int clean)                                     \
    {                                                                                        \
        buf a = buf_new(n, sizeof(T), (int)(next_u64() % 2));                                \
        buf r = buf_new(n, sizeof(T), 0);                                                    \
        T *x = a.data, *y = r.data;                                                          \
        for (int64_t i = 0; i < n; i++)                                                      \
            x[i] = clean ? (T)uniform() : (T)sample(1.0, 0);                                \
        if (n > 0 && (clean == 2 || clean == 3)) /* one non-finite value somewhere */       \
            x[next_u64() % (uint64_t)n] = clean == 2 ? (T)NAN : (T)-INFINITY;                \
        memcpy(y, x, (size_t)n * sizeof(T));                                                 \
        int found = 7;                                                                       \
        const int rc = fn(x, n, scale, &found);                                              \
        CHECK(rc == FA_OK, "%s n=%" PRId64 ": rc %d", tname, n, rc);                         \
        int want = 0;                                                                        \
        for (int64_t i = 0; i < n; i++) {                                                    \
            y[i] = y[i] / (T)scale;                                                          \
            want |= !isfinite(y[i]);                                                         \
        }                                                                                    \
        CHECK(found == want, "%s n=%" PRId64 " scale=%g: found_inf %d, expected %d", tname,  \
              n, scale, found, want);                                                        \
        for (int64_t i = 0; i < n; i++)                                                      \
            if (!same(x[i], y[i])) {                                                         \
                fail("%s n=%" PRId64 " scale=%g: element %" PRId64 " is %a, expected %a",    \
                     tname, n, scale, i, (double)x[i], (double)y[i]);                        \
                break;                                                                       \
            }                                                                                \
        g_checks++;                                                                          \
        buf_free(&a);                                                                        \
        buf_free(&r);                                                                        \
    }

DEFINE_CHECK_UNSCALE(check_unscale_f32, float, fa_unscale_check_f32, same_f32, "unscale_f32")
DEFINE_CHECK_UNSCALE(check_unscale_f64, double, fa_unscale_check_f64, same_f64, "unscale_f64")

/* -------------------------------------------------- multi-tensor steps -- */

/*
 * One fa_adam_multi_* call over `count` tensors of n[i] elements (each array
 * its own exact-size block, as above), against one single-array call per
 * tensor on copies: the two must agree bit for bit whatever the thread split
 * of the concatenation. n_scalars structs with different steps; with `mixed`
 * their flags (and bf16 rounding modes) differ too, which the ABI allows
 * though fastadam.multi never asks for it. with_index 0: scalar_index NULL
 * (every tensor uses scalars[0]); with_keys: per-tensor rounding_keys.
 */
#define DEFINE_CHECK_MULTI(name, P, S, KIND_BF16, SAMPLE_S, SAME_P, SAME_S, MULTI, SINGLE)        \
    static void name(int64_t count, const int64_t *n, int n_scalars, int mixed, int with_index, \
                     int with_keys)                                                             \
    {                                                                                           \
        fa_adam_scalars sc[8];                                                                  \
        const int base_flags = (int)(next_u64() % 16);                                          \
        const int base_rounding = 1 + (int)(next_u64() % 2);                                    \
        for (int s = 0; s < n_scalars; s++) {                                                   \
            const int flags = mixed ? (int)(next_u64() % 16) : base_flags;                      \
            const int rounding = !(KIND_BF16) ? FA_STATE_SAME_DTYPE                             \
                                 : mixed      ? 1 + (int)(next_u64() % 2)                       \
                                              : base_rounding;                                  \
            sc[s] = make_scalars(flags, s, rounding, (uint32_t)next_u64());                     \
        }                                                                                       \
        const size_t slots = (size_t)count + 1; /* never a zero-size table */                   \
        int32_t *const sidx = with_index ? malloc(slots * sizeof(int32_t)) : NULL;             \
        uint32_t *const keys = with_keys ? malloc(slots * sizeof(uint32_t)) : NULL;             \
        P **const tp[2] = {malloc(slots * sizeof(P *)), malloc(slots * sizeof(P *))};           \
        S **const ts[3] = {malloc(slots * sizeof(S *)), malloc(slots * sizeof(S *)),            \
                           malloc(slots * sizeof(S *))};                                        \
        buf *const a = malloc(slots * 5 * sizeof(buf)), *const r = malloc(slots * 5 * sizeof(buf)); \
        void **const none = malloc(slots * sizeof(void *));                                     \
        int any_ams = 0;                                                                        \
        for (int64_t t = 0; t < count; t++) {                                                   \
            if (sidx != NULL)                                                                  \
                sidx[t] = (int32_t)(next_u64() % (uint64_t)n_scalars);                         \
            if (keys != NULL)                                                                   \
                keys[t] = (uint32_t)next_u64();                                                 \
            const fa_adam_scalars *const st = &sc[sidx != NULL ? sidx[t] : 0];                \
            any_ams |= st->amsgrad != 0;                                                        \
            none[t] = untouchable();                                                            \
            for (int k = 0; k < 5; k++) {                                                       \
                const size_t size = k < 2 ? sizeof(P) : sizeof(S);                              \
                a[5 * t + k] = buf_new(n[t], size, (int)(next_u64() % 2));                      \
                r[5 * t + k] = buf_new(n[t], size, 0);                                          \
                for (int64_t i = 0; i < n[t]; i++) {                                            \
                    if (k < 2)                                                                  \
                        ((P *)a[5 * t + k].data)[i] = (P)sample(1.0, 0);                        \
                    else                                                                        \
                        ((S *)a[5 * t + k].data)[i] = SAMPLE_S(k == 2 ? 0.1 : 0.01, k >= 3);    \
                }                                                                               \
                memcpy(r[5 * t + k].data, a[5 * t + k].data, (size_t)n[t] * size);              \
            }                                                                                   \
            tp[0][t] = a[5 * t].data;                                                           \
            tp[1][t] = a[5 * t + 1].data;                                                       \
            for (int k = 2; k < 5; k++)                                                         \
                ts[k - 2][t] = a[5 * t + k].data;                                               \
            /* vmax of a tensor without amsgrad: NULL or a block it must not touch */           \
            if (!st->amsgrad)                                                                   \
                ts[2][t] = t % 2 ? NULL : none[t];                                              \
        }                                                                                       \
        /* no amsgrad anywhere: the vmax table itself may be NULL */                            \
        S **const vmax_table = any_ams || next_u64() % 2 ? ts[2] : NULL;                        \
        const int rc = MULTI;                                                                   \
        CHECK(rc == FA_OK, "%s count=%" PRId64 ": rc %d", #name, count, rc);                   \
        for (int64_t t = 0; t < count; t++) {                                                   \
            fa_adam_scalars st = sc[sidx != NULL ? sidx[t] : 0];                              \
            if (keys != NULL)                                                                   \
                st.rounding_key = keys[t];                                                      \
            P *const rp = r[5 * t].data, *const rg = r[5 * t + 1].data;                         \
            S *const rm = r[5 * t + 2].data, *const rv = r[5 * t + 3].data;                     \
            S *const rx = st.amsgrad ? r[5 * t + 4].data : NULL;                                \
            const int rc1 = SINGLE;                                                             \
            CHECK(rc1 == FA_OK, "%s single %" PRId64 ": rc %d", #name, t, rc1);                 \
            for (int k = 0; k < (st.amsgrad ? 5 : 4); k++) {                                    \
                for (int64_t i = 0; i < n[t]; i++) {                                            \
                    const int ok =                                                              \
                        k < 2 ? SAME_P(((P *)a[5 * t + k].data)[i], ((P *)r[5 * t + k].data)[i]) \
                              : SAME_S(((S *)a[5 * t + k].data)[i], ((S *)r[5 * t + k].data)[i]); \
                    if (!ok) {                                                                  \
                        fail("%s count=%" PRId64 " tensor %" PRId64 " (n=%" PRId64              \
                             ", scalars %d): array %d element %" PRId64                         \
                             " differs from the single call",                                   \
                             #name, count, t, n[t], sidx != NULL ? sidx[t] : 0, k, i);        \
                        break;                                                                  \
                    }                                                                           \
                }                                                                               \
                g_checks++;                                                                     \
            }                                                                                   \
        }                                                                                       \
        for (int64_t t = 0; t < count; t++) {                                                   \
            for (int k = 0; k < 5; k++) {                                                       \
                buf_free(&a[5 * t + k]);                                                        \
                buf_free(&r[5 * t + k]);                                                        \
            }                                                                                   \
            free(none[t]);                                                                      \
        }                                                                                       \
        free(none);                                                                             \
        free(a);                                                                                \
        free(r);                                                                                \
        for (int k = 0; k < 3; k++)                                                             \
            free(ts[k]);                                                                        \
        free(tp[0]);                                                                            \
        free(tp[1]);                                                                            \
        free(sidx);                                                                            \
        free(keys);                                                                             \
    }

#define SAMPLE_FLOAT(scale, positive) ((float)sample((scale), (positive)))
#define SAMPLE_DOUBLE(scale, positive) (sample((scale), (positive)))

DEFINE_CHECK_MULTI(check_multi_f32, float, float, 0, SAMPLE_FLOAT, same_f32, same_f32,
                   fa_adam_multi_f32(count, tp[0], tp[1], ts[0], ts[1], vmax_table, n, sc,
                                     n_scalars, sidx),
                   fa_adam_f32(rp, rg, rm, rv, rx, n[t], &st))
DEFINE_CHECK_MULTI(check_multi_f64, double, double, 0, SAMPLE_DOUBLE, same_f64, same_f64,
                   fa_adam_multi_f64(count, tp[0], tp[1], ts[0], ts[1], vmax_table, n, sc,
                                     n_scalars, sidx),
                   fa_adam_f64(rp, rg, rm, rv, rx, n[t], &st))
DEFINE_CHECK_MULTI(check_multi_bf16, float, uint16_t, 1, sample_bf16, same_f32, same_bf16,
                   fa_adam_multi_f32_bf16(count, tp[0], tp[1], ts[0], ts[1], vmax_table, n, sc,
                                          n_scalars, sidx, keys),
                   fa_adam_f32_bf16(rp, rg, rm, rv, rx, n[t], &st))

/* Every layout below through all three kinds, with and without scalar_index,
 * several scalars and rounding_keys, and with mixed flags. */
static void check_multi(int64_t count, const int64_t *n)
{
    for (int variant = 0; variant < 4; variant++) {
        const int n_scalars = variant == 0 ? 1 : 1 + (int)(next_u64() % 4);
        const int mixed = variant == 3, with_index = variant != 0, with_keys = variant >= 2;
        check_multi_f32(count, n, n_scalars, mixed, with_index, with_keys);
        check_multi_f64(count, n, n_scalars, mixed, with_index, with_keys);
        check_multi_bf16(count, n, n_scalars, mixed, with_index, with_keys);
    }
}

static void run_multi_suite(void)
{
    /* uneven sizes with empty tensors between, first and last */
    static const int64_t uneven[] = {0, 1, 17, 0, 1000, 33, 0, 5000, 3, 64, 0};
    check_multi(sizeof uneven / sizeof uneven[0], uneven);
    /* no tensors; only empty ones */
    static const int64_t empty[] = {0, 0, 0};
    check_multi(0, empty);
    check_multi(3, empty);
    /* one tensor, below and past the parallel threshold */
    static const int64_t one[][1] = {{0}, {1}, {70}, {4099}, {40001}};
    for (size_t k = 0; k < sizeof one / sizeof one[0]; k++)
        check_multi(1, one[k]);
    /* many tiny tensors */
    int64_t tiny[300];
    for (int k = 0; k < 300; k++)
        tiny[k] = (int64_t)(next_u64() % 8);
    check_multi(300, tiny);
    /* past the threshold in total only, so the split falls inside or between
     * tensors; with {32771, 32769} the even point is element 32770 of the first
     * tensor, whose next cache line lies past its end: the split becomes the
     * second tensor's start */
    static const int64_t parts_a[] = {20000, 7, 15000, 0, 12345, 1};
    static const int64_t parts_b[] = {32771, 32769};
    static const int64_t parts_c[] = {32768, 32768};
    check_multi(sizeof parts_a / sizeof parts_a[0], parts_a);
    check_multi(2, parts_b);
    check_multi(2, parts_c);
    int64_t medium[40];
    for (int k = 0; k < 40; k++)
        medium[k] = 1000 + (int64_t)(next_u64() % 2000);
    check_multi(40, medium);
}

/* ------------------------------------------------------ argument errors -- */

/*
 * Every argument error returns its code before touching memory: the arrays
 * lie in an inaccessible mapping (PROT_NONE), 64 KiB apart so that they never
 * overlap one another, and a single read or write would crash the driver.
 */
static void check_errors(void)
{
    const size_t gap = (size_t)1 << 16;
    char *const region = mmap(NULL, 6 * gap, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    void *z[5];
    for (int k = 0; k < 5; k++)
        z[k] = region + (size_t)(k + 1) * gap;
    fa_adam_scalars sc = make_scalars(F_AMSGRAD | F_L2, 0, FA_STATE_SAME_DTYPE, 0);
    fa_adam_scalars sb = make_scalars(F_AMSGRAD | F_L2, 0, FA_STATE_BF16_STOCHASTIC, 1);
    const int64_t sizes[] = {-1, INT64_MIN, (int64_t)1 << 62, INT64_MAX};

    for (int k = 0; k < 4; k++) { /* each required array NULL */
        void *p[5] = {z[0], z[1], z[2], z[3], z[4]};
        p[k] = NULL;
        CHECK(fa_adam_f32(p[0], p[1], p[2], p[3], p[4], 8, &sc) == FA_ERR_NULL, "f32 null %d", k);
        CHECK(fa_adam_f64(p[0], p[1], p[2], p[3], p[4], 0, &sc) == FA_ERR_NULL, "f64 null %d", k);
        CHECK(fa_adam_f32_bf16(p[0], p[1], p[2], p[3], p[4], 8, &sb) == FA_ERR_NULL,
              "bf16 null %d", k);
    }
    CHECK(fa_adam_f32(z[0], z[1], z[2], z[3], z[4], 8, NULL) == FA_ERR_NULL, "f32 null sc");
    CHECK(fa_adam_f64(z[0], z[1], z[2], z[3], z[4], 8, NULL) == FA_ERR_NULL, "f64 null sc");
    CHECK(fa_adam_f32_bf16(z[0], z[1], z[2], z[3], z[4], 8, NULL) == FA_ERR_NULL, "bf16 sc");
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        const int64_t n = sizes[k];
        CHECK(fa_adam_f32(z[0], z[1], z[2], z[3], z[4], n, &sc) == FA_ERR_SIZE, "f32 n");
        CHECK(fa_adam_f64(z[0], z[1], z[2], z[3], z[4], n, &sc) == FA_ERR_SIZE, "f64 n");
        CHECK(fa_adam_f32_bf16(z[0], z[1], z[2], z[3], z[4], n, &sb) == FA_ERR_SIZE, "bf16 n");
        int found = 7;
        CHECK(fa_unscale_check_f32(z[0], n, 2.0, &found) == FA_ERR_SIZE && found == 7, "us n");
        CHECK(fa_unscale_check_f64(z[0], n, 2.0, &found) == FA_ERR_SIZE && found == 7, "us n");
    }
    CHECK(fa_adam_f32_bf16_at(z[0], z[1], z[2], z[3], z[4], 8, -1, &sb) == FA_ERR_SIZE, "at<0");
    CHECK(fa_adam_f32_bf16_at(z[0], z[1], z[2], z[3], z[4], 8, INT64_MAX - 7, &sb) ==
              FA_ERR_SIZE,
          "at overflow");
    CHECK(fa_adam_f32(z[0], z[1], z[2], z[3], NULL, 8, &sc) == FA_ERR_AMSGRAD, "f32 ams");
    CHECK(fa_adam_f32_bf16(z[0], z[1], z[2], z[3], NULL, 8, &sb) == FA_ERR_AMSGRAD, "bf16 ams");
    /* the rounding mode must suit the function */
    CHECK(fa_adam_f32(z[0], z[1], z[2], z[3], z[4], 8, &sb) == FA_ERR_ROUNDING, "f32 mode");
    CHECK(fa_adam_f64(z[0], z[1], z[2], z[3], z[4], 8, &sb) == FA_ERR_ROUNDING, "f64 mode");
    CHECK(fa_adam_f32_bf16(z[0], z[1], z[2], z[3], z[4], 8, &sc) == FA_ERR_ROUNDING, "bf16 0");
    sb.state_rounding = 3;
    CHECK(fa_adam_f32_bf16(z[0], z[1], z[2], z[3], z[4], 8, &sb) == FA_ERR_ROUNDING, "bf16 3");
    sb.state_rounding = FA_STATE_BF16_NEAREST;
    /* overlapping arrays: the same pointer twice, or one element apart */
    CHECK(fa_adam_f32(z[0], z[0], z[2], z[3], z[4], 8, &sc) == FA_ERR_OVERLAP, "f32 overlap");
    CHECK(fa_adam_f32((float *)z[0] + 1, z[0], z[2], z[3], z[4], 8, &sc) == FA_ERR_OVERLAP,
          "f32 overlap +1");
    CHECK(fa_adam_f32_bf16(z[0], z[1], (uint16_t *)z[3] + 1, z[3], z[4], 8, &sb) ==
              FA_ERR_OVERLAP,
          "bf16 overlap");
    /* unscale-and-check */
    int found = 7;
    CHECK(fa_unscale_check_f32(NULL, 8, 2.0, &found) == FA_ERR_NULL && found == 7, "us null");
    CHECK(fa_unscale_check_f64(NULL, 0, 2.0, &found) == FA_ERR_NULL && found == 7, "us null");
    CHECK(fa_unscale_check_f32(z[0], 8, 2.0, NULL) == FA_ERR_NULL, "us null found");
    CHECK(fa_unscale_check_f64(z[0], 8, 2.0, NULL) == FA_ERR_NULL, "us null found");
    /* n == 0: success, nothing touched */
    CHECK(fa_adam_f32(z[0], z[1], z[2], z[3], z[4], 0, &sc) == FA_OK, "f32 empty");
    CHECK(fa_adam_f64(z[0], z[1], z[2], z[3], NULL, 0, &sc) == FA_ERR_AMSGRAD, "f64 empty ams");
    CHECK(fa_adam_f32_bf16(z[0], z[1], z[2], z[3], z[4], 0, &sb) == FA_OK, "bf16 empty");
    CHECK(fa_unscale_check_f32(z[0], 0, 2.0, &found) == FA_OK && found == 0, "us empty");
    CHECK(fa_set_num_threads(-1) == FA_ERR_THREADS, "threads -1");
    for (int code = -8; code <= 1; code++)
        CHECK(fa_strerror(code) != NULL && fa_strerror(code)[0] != '\0', "strerror %d", code);
    munmap(region, 6 * gap);
}

/*
 * The multi-tensor entry points' argument errors, each before any memory is
 * touched: three tensors whose arrays lie in an inaccessible mapping (the
 * error may concern the last one; a write to the first would crash), and
 * element counts whose bytes would pass the address space or whose sum
 * overflows int64_t (those arrays are addresses only, never dereferenced).
 */
static void check_multi_errors(void)
{
    const size_t gap = (size_t)1 << 16;
    char *const region = mmap(NULL, 16 * gap, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    /* tensor t, array k at region + (3k + t + 1) * gap: 64 KiB apart, disjoint */
    float *pf[5][3];
    double *pd[5][3];
    uint16_t *ph[5][3];
    for (int k = 0; k < 5; k++)
        for (int t = 0; t < 3; t++) {
            char *const at = region + (size_t)(3 * k + t + 1) * gap;
            pf[k][t] = (float *)at;
            pd[k][t] = (double *)at;
            ph[k][t] = (uint16_t *)at;
        }
    int64_t n[3] = {8, 5, 8};
    fa_adam_scalars sc[2] = {make_scalars(F_AMSGRAD | F_L2, 0, FA_STATE_SAME_DTYPE, 0),
                             make_scalars(F_L2, 1, FA_STATE_SAME_DTYPE, 0)};
    fa_adam_scalars sb[2] = {make_scalars(F_AMSGRAD | F_L2, 0, FA_STATE_BF16_STOCHASTIC, 1),
                             make_scalars(F_L2, 1, FA_STATE_BF16_NEAREST, 2)};
    int32_t sidx[3] = {1, 0, 1};
    const uint32_t keys[3] = {1, 2, 3};
#define F32(cnt, nn, s, ns, idx) \
    fa_adam_multi_f32((cnt), pf[0], pf[1], pf[2], pf[3], pf[4], (nn), (s), (ns), (idx))
#define F64(cnt, nn, s, ns, idx) \
    fa_adam_multi_f64((cnt), pd[0], pd[1], pd[2], pd[3], pd[4], (nn), (s), (ns), (idx))
#define B16(cnt, nn, s, ns, idx) \
    fa_adam_multi_f32_bf16((cnt), pf[0], pf[1], ph[2], ph[3], ph[4], (nn), (s), (ns), (idx), keys)

    CHECK(F32(-1, n, sc, 2, sidx) == FA_ERR_SIZE, "multi count -1");
    CHECK(B16(INT64_MIN, n, sb, 2, sidx) == FA_ERR_SIZE, "multi count min");
    /* each pointer table NULL, even for count == 0 */
    for (int k = 0; k < 4; k++) {
        float *const *tf[5] = {pf[0], pf[1], pf[2], pf[3], pf[4]};
        double *const *td[5] = {pd[0], pd[1], pd[2], pd[3], pd[4]};
        uint16_t *const *th[3] = {ph[2], ph[3], ph[4]};
        tf[k] = NULL;
        td[k] = NULL;
        if (k >= 2)
            th[k - 2] = NULL;
        for (int64_t cnt = 0; cnt <= 3; cnt += 3) {
            CHECK(fa_adam_multi_f32(cnt, tf[0], tf[1], tf[2], tf[3], tf[4], n, sc, 2, sidx) ==
                      FA_ERR_NULL,
                  "multi f32 table %d", k);
            CHECK(fa_adam_multi_f64(cnt, td[0], td[1], td[2], td[3], td[4], n, sc, 2, sidx) ==
                      FA_ERR_NULL,
                  "multi f64 table %d", k);
            CHECK(fa_adam_multi_f32_bf16(cnt, tf[0], tf[1], th[0], th[1], th[2], n, sb, 2, sidx,
                                         keys) == FA_ERR_NULL,
                  "multi bf16 table %d", k);
        }
    }
    CHECK(F32(3, NULL, sc, 2, sidx) == FA_ERR_NULL, "multi n NULL");
    CHECK(F64(0, NULL, sc, 2, sidx) == FA_ERR_NULL, "multi n NULL, count 0");
    CHECK(F32(3, n, NULL, 2, sidx) == FA_ERR_NULL, "multi scalars NULL");
    CHECK(F32(0, n, NULL, 0, NULL) == FA_OK, "multi count 0, no scalars");
    CHECK(B16(0, n, NULL, 0, NULL) == FA_OK, "multi bf16 count 0, no scalars");
    /* scalar_index out of [0, n_scalars) */
    for (int bad = 0; bad < 3; bad++) {
        const int32_t value[] = {-1, 2, INT32_MIN};
        sidx[2] = value[bad];
        CHECK(F32(3, n, sc, 2, sidx) == FA_ERR_INDEX, "multi sidx %d", value[bad]);
        CHECK(F64(3, n, sc, 2, sidx) == FA_ERR_INDEX, "multi f64 sidx %d", value[bad]);
        CHECK(B16(3, n, sb, 2, sidx) == FA_ERR_INDEX, "multi bf16 sidx %d", value[bad]);
    }
    sidx[2] = 1;
    CHECK(F32(3, n, sc, 1, sidx) == FA_ERR_INDEX, "multi n_scalars too small");
    CHECK(F32(3, n, sc, 0, NULL) == FA_ERR_INDEX, "multi no scalars, no sidx");
    CHECK(F32(3, n, sc, -5, NULL) == FA_ERR_INDEX, "multi n_scalars < 0");
    /* one array of the last tensor NULL */
    for (int k = 0; k < 4; k++) {
        float *saved_f = pf[k][2];
        double *saved_d = pd[k][2];
        uint16_t *saved_h = ph[k][2];
        pf[k][2] = NULL;
        pd[k][2] = NULL;
        ph[k][2] = NULL;
        CHECK(F32(3, n, sc, 2, sidx) == FA_ERR_NULL, "multi f32 array %d NULL", k);
        CHECK(F64(3, n, sc, 2, sidx) == FA_ERR_NULL, "multi f64 array %d NULL", k);
        CHECK(B16(3, n, sb, 2, sidx) == FA_ERR_NULL, "multi bf16 array %d NULL", k);
        pf[k][2] = saved_f;
        pd[k][2] = saved_d;
        ph[k][2] = saved_h;
    }
    /* bad sizes in the last tensor */
    static const int64_t bad_sizes[] = {-1, INT64_MIN, (int64_t)1 << 62, INT64_MAX};
    for (size_t k = 0; k < sizeof bad_sizes / sizeof bad_sizes[0]; k++) {
        n[2] = bad_sizes[k];
        CHECK(F32(3, n, sc, 2, sidx) == FA_ERR_SIZE, "multi f32 n %" PRId64, n[2]);
        CHECK(F64(3, n, sc, 2, sidx) == FA_ERR_SIZE, "multi f64 n %" PRId64, n[2]);
        CHECK(B16(3, n, sb, 2, sidx) == FA_ERR_SIZE, "multi bf16 n %" PRId64, n[2]);
    }
    n[2] = 8;
    /* amsgrad (scalars 0, tensor 1) without the vmax table, or with a NULL entry */
    CHECK(fa_adam_multi_f32(3, pf[0], pf[1], pf[2], pf[3], NULL, n, sc, 2, sidx) ==
              FA_ERR_AMSGRAD,
          "multi f32 ams table");
    CHECK(fa_adam_multi_f32_bf16(3, pf[0], pf[1], ph[2], ph[3], NULL, n, sb, 2, sidx, keys) ==
              FA_ERR_AMSGRAD,
          "multi bf16 ams table");
    double *const saved_vmax = pd[4][1];
    pd[4][1] = NULL;
    CHECK(F64(3, n, sc, 2, sidx) == FA_ERR_AMSGRAD, "multi f64 ams entry");
    pd[4][1] = saved_vmax;
    /* no tensor with amsgrad: the vmax table may be NULL (n == 0 everywhere,
     * so nothing is touched) */
    int64_t zeros[3] = {0, 0, 0};
    CHECK(fa_adam_multi_f32(3, pf[0], pf[1], pf[2], pf[3], NULL, zeros, sc + 1, 1, NULL) ==
              FA_OK,
          "multi no ams, NULL table");
    /* overlap inside one tensor (the same pointer twice, or one element apart) */
    float *const saved_grad = pf[1][2];
    pf[1][2] = pf[0][2];
    CHECK(F32(3, n, sc, 2, sidx) == FA_ERR_OVERLAP, "multi f32 overlap");
    pf[1][2] = pf[0][2] + 7;
    CHECK(B16(3, n, sb, 2, sidx) == FA_ERR_OVERLAP, "multi bf16 overlap +7");
    pf[1][2] = saved_grad;
    uint16_t *const saved_v = ph[3][2];
    ph[3][2] = ph[2][2] + 7;
    CHECK(B16(3, n, sb, 2, sidx) == FA_ERR_OVERLAP, "multi bf16 state overlap");
    ph[3][2] = saved_v;
    /* the rounding mode must suit the function, in every tensor */
    CHECK(F32(3, n, sb, 2, sidx) == FA_ERR_ROUNDING, "multi f32 bf16 scalars");
    CHECK(F64(3, n, sb, 2, sidx) == FA_ERR_ROUNDING, "multi f64 bf16 scalars");
    CHECK(B16(3, n, sc, 2, sidx) == FA_ERR_ROUNDING, "multi bf16 f32 scalars");
    sb[0].state_rounding = 3;
    CHECK(B16(3, n, sb, 2, sidx) == FA_ERR_ROUNDING, "multi bf16 rounding 3");
    sb[0].state_rounding = FA_STATE_BF16_STOCHASTIC;
    sc[1].state_rounding = FA_STATE_BF16_NEAREST; /* only in the scalars of tensors 0, 2 */
    CHECK(F32(3, n, sc, 2, sidx) == FA_ERR_ROUNDING, "multi f32 rounding, one struct");
    sc[1].state_rounding = FA_STATE_SAME_DTYPE;
    munmap(region, 16 * gap);

    /* The sum of n past int64_t: 16 tensors of 2^59 elements, each tensor's
     * arrays 2^62 bytes apart (disjoint), every tensor at the same addresses
     * (cross-tensor overlap is not checked). Addresses only: never accessed. */
    enum { BIG = 16 };
    float *bf[5][BIG];
    uint16_t *bh[5][BIG];
    int64_t big_n[BIG];
    int32_t big_index[BIG];
    for (int t = 0; t < BIG; t++) {
        big_n[t] = (int64_t)1 << 59;
        big_index[t] = 1; /* no amsgrad */
        for (int k = 0; k < 5; k++) {
            const uintptr_t at = ((uintptr_t)k << 62) + 4096;
            bf[k][t] = (float *)at;
            bh[k][t] = (uint16_t *)at;
        }
    }
    CHECK(fa_adam_multi_f32(BIG, bf[0], bf[1], bf[2], bf[3], NULL, big_n, sc, 2, big_index) ==
              FA_ERR_SIZE,
          "multi f32 sum overflow");
    CHECK(fa_adam_multi_f32_bf16(BIG, bf[0], bf[1], bh[2], bh[3], NULL, big_n, sb, 2, big_index,
                                 NULL) == FA_ERR_SIZE,
          "multi bf16 sum overflow");
#undef F32
#undef F64
#undef B16
}

/* --------------------------------------------------------------- main -- */

static void run_suite(void)
{
    /* every size 0..70 (all SIMD tails), odd sizes past the parallel threshold */
    static const int64_t large[] = {127, 1001, 4099, 32769, 40001};
    for (int threads = 1; threads <= 2; threads++) {
#if defined(_OPENMP)
        const int expect = threads;
#else
        const int expect = 1; /* built without OpenMP (as the library must be): one thread */
#endif
        CHECK(fa_set_num_threads(threads) == FA_OK && fa_get_num_threads() == expect,
              "set_num_threads(%d): fa_get_num_threads() == %d", threads, fa_get_num_threads());
        for (int64_t i = 0; i < 71 + (int64_t)(sizeof large / sizeof large[0]); i++) {
            const int64_t n = i < 71 ? i : large[i - 71];
            for (int flags = 0; flags < 16; flags++) {
                const int variant = (int)((n + flags) % 3);
                check_f32(n, flags, variant);
                check_f64(n, flags, variant);
                check_bf16(n, flags, FA_STATE_BF16_NEAREST, 0);
                check_bf16(n, flags, FA_STATE_BF16_STOCHASTIC, 0);
            }
            /* 0: specials; 1: finite; 2, 3: finite but one NaN / -Inf; 4: finite values
             * and a tiny (subnormal) scale, so that quotients overflow to Inf. Odd
             * sizes use powers of two (the library multiplies by the reciprocal). */
            for (int clean = 0; clean < 5; clean++) {
                const int pow2 = n % 2;
                check_unscale_f32(n, clean == 4 ? 1e-45 : pow2 ? 1024.0 : 3.0, clean);
                check_unscale_f64(n, clean == 4 ? 1e-310 : pow2 ? 0.25 : 0.1, clean);
            }
        }
        /* global indices across the 2^32 boundary where the kernel splits its loop */
        static const int64_t firsts[] = {((int64_t)1 << 32) - 3, ((int64_t)1 << 32) - 40000,
                                         ((int64_t)1 << 32) + 1, ((int64_t)5 << 40) + 17};
        for (size_t f = 0; f < sizeof firsts / sizeof firsts[0]; f++)
            for (int flags = 0; flags < 16; flags += 5) {
                check_bf16(37, flags, FA_STATE_BF16_STOCHASTIC, firsts[f]);
                check_bf16(40003, flags, FA_STATE_BF16_STOCHASTIC, firsts[f]);
            }
        run_multi_suite();
    }
    check_errors();
    check_multi_errors();
}

/* The variants this CPU can run, as the library decides (fastadam.c). */
static int cpu_has(const char *isa)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (strcmp(isa, "avx2") == 0)
        return __builtin_cpu_supports("avx2");
    if (strcmp(isa, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw");
#endif
    return strcmp(isa, "baseline") == 0;
}

/* The whole suite on the variant this process runs (FASTADAM_ISA, if set,
 * must be the one the library chose): 0 if every check passed. */
static int run_here(void)
{
    const char *want = getenv("FASTADAM_ISA");
    CHECK(want == NULL || strcmp(fa_isa(), want) == 0, "FASTADAM_ISA=%s ran %s", want, fa_isa());
    run_suite();
    if (g_failures) {
        fprintf(stderr, "[%s] %ld of %ld checks failed\n", fa_isa(), g_failures, g_checks);
        return 1;
    }
    printf("passed: %ld checks on the %s variant\n", g_checks, fa_isa());
    return 0;
}

int main(int argc, char **argv)
{
    (void)argc;
    if (getenv("FA_TEST_CHILD") != NULL) /* one variant, forced through FASTADAM_ISA */
        return run_here();
    static const char *const isas[] = {
        "baseline",
#if defined(FA_HAVE_AVX2)
        "avx2",
#endif
#if defined(FA_HAVE_AVX512)
        "avx512",
#endif
    };
    /* Built with the baseline variant only (every target but x86-64, e.g.
     * aarch64): nothing to choose between, so it runs in this process. That
     * also spares the exec of /proc/self/exe, which qemu-user cannot follow
     * for a foreign binary unless binfmt_misc is set up for it. */
    if (sizeof isas / sizeof isas[0] == 1) {
        setenv("FASTADAM_ISA", "baseline", 1);
        const int rc = run_here();
        if (rc == 0)
            printf("all passed: 1 variants\n");
        return rc;
    }
    int failed = 0, ran = 0;
    for (size_t k = 0; k < sizeof isas / sizeof isas[0]; k++) {
        if (!cpu_has(isas[k])) {
            printf("skipped: the CPU cannot run the %s variant\n", isas[k]);
            continue;
        }
        fflush(stdout);
        const pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 2;
        }
        if (pid == 0) {
            setenv("FA_TEST_CHILD", "1", 1);
            setenv("FASTADAM_ISA", isas[k], 1);
            execv("/proc/self/exe", argv);
            perror("execv /proc/self/exe");
            _exit(2);
        }
        int status = 0;
        if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "the %s variant failed (wait status %d)\n", isas[k], status);
            failed++;
        }
        ran++;
    }
    if (failed || ran == 0)
        return 1;
    printf("all passed: %d variants\n", ran);
    return 0;
}
