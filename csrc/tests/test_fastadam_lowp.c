/*
 * test_fastadam_lowp.c - the low-precision entry point (fastadam_lowp.h)
 * against a scalar C reference, with no Python: every kind, every rounding,
 * every flag combination, odd sizes, 1 and 2 threads, each array its own
 * exact-size allocation (so the sanitizers see any access out of bounds), then
 * the error codes. Run per ISA variant (FASTADAM_ISA, one process each).
 * tests/test_c_sanitizers.py builds it with ASan and UBSan.
 *
 * The reference's float16 conversions are the compiler's _Float16 casts where
 * it has them (an independent check of the library's integer code).
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fastadam.h"
#include "fastadam_lowp.h"

static long g_checks, g_failures;

static uint32_t bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float from_bits(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static uint64_t g_rng = 0x9E3779B97F4A7C15u;

static double uniform(void)
{
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1p-53;
}

/* ---------------------------------------------------------- reference -- */

static float widen_bf16(uint16_t h)
{
    return from_bits((uint32_t)h << 16);
}

static uint16_t bf16_round(float x, uint32_t add)
{
    const uint32_t u = bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + add) >> 16);
}

static uint16_t bf16_nearest(float x)
{
    return bf16_round(x, 0x7FFFu + ((bits(x) >> 16) & 1u));
}

#if defined(__FLT16_MAX__)
static float widen_f16(uint16_t h)
{
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

static uint16_t f16_nearest(float x)
{
    const _Float16 f = (_Float16)x;
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
}
#else
static float widen_f16(uint16_t h)
{
    const uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF, s = (uint32_t)(h & 0x8000) << 16;
    if (e == 0x1F)
        return from_bits(s | 0x7F800000u | (m << 13));
    if (e == 0)
        return (h & 0x8000 ? -1.0f : 1.0f) * (float)m * 0x1p-24f;
    return from_bits(s | (((uint32_t)(h & 0x7FFF) << 13) + 0x38000000u));
}

static uint16_t f16_nearest(float x)
{
    /* no _Float16: via double, rounding once (the float is exact in double) */
    const double d = (double)x;
    const uint16_t sign = signbit(x) ? 0x8000 : 0;
    const double a = fabs(d);
    if (isnan(x))
        return (uint16_t)(sign | 0x7E00 | ((bits(x) >> 13) & 0x3FF));
    if (a >= 65520.0)
        return sign | 0x7C00;
    int e;
    frexp(a, &e);
    const double ulp = ldexp(1.0, (e - 11 < -24 ? -24 : e - 11));
    const double q = nearbyint(a / ulp) * ulp; /* ties to even in the default mode */
    for (uint32_t h = 0; h < 0x7C00; h++)
        if ((double)widen_f16((uint16_t)h) == q)
            return (uint16_t)(sign | h);
    return sign | 0x7C00;
}
#endif

static uint32_t mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

enum { F32 = 0, BF = 1, HF = 2 };
enum { N_KINDS = 9 };
static const int KIND_TYPES[N_KINDS][4] = {
    /* param, grad, moments, copy (-1 none) */
    {BF, BF, BF, -1}, {HF, HF, HF, -1}, {F32, F32, F32, BF},
    {F32, BF, F32, BF}, {F32, F32, F32, HF}, {F32, HF, F32, HF},
    {BF, BF, F32, -1}, {HF, HF, F32, -1}, {HF, HF, BF, -1},
};

/* float16's stochastic rounding with 32 random bits r, written another way:
 * the neighbour toward zero, the gap to the next one, and the discarded
 * fraction of the gap in units of 2^-nb (nb random bits decide). */
static uint16_t f16_stochastic(float x, uint32_t r)
{
    const uint16_t sign = signbit(x) ? 0x8000 : 0;
    const double a = fabs((double)x);
    if (isnan(x))
        return f16_nearest(x);
    if (a >= 65536.0)
        return sign | 0x7C00;
    if (a < 0x1p-32)
        return sign;
    int e;
    frexp(a, &e);                                  /* a in [2^(e-1), 2^e) */
    const int lsb = e - 11 < -24 ? -24 : e - 11;   /* the float16 grid's step there */
    const double gap = ldexp(1.0, lsb);
    const double lo = floor(a / gap) * gap;
    /* random bits used: those of the float32 significand below the grid */
    const int nb = lsb - (e - 24);
    const double frac = (a - lo) / gap * ldexp(1.0, nb); /* an integer < 2^nb */
    const double rb = (double)(r & (uint32_t)((1ull << nb) - 1u));
    const double q = frac + rb >= ldexp(1.0, nb) ? lo + gap : lo;
    if (q >= 65536.0)
        return sign | 0x7C00;
    return (uint16_t)(sign | f16_nearest((float)q)); /* q is a float16 value */
}

static size_t elsize(int t)
{
    return t == F32 ? 4 : 2;
}

static float load(const void *a, int64_t i, int t)
{
    if (t == F32)
        return ((const float *)a)[i];
    const uint16_t h = ((const uint16_t *)a)[i];
    return t == BF ? widen_bf16(h) : widen_f16(h);
}

static void store(void *a, int64_t i, int t, float x)
{
    if (t == F32)
        ((float *)a)[i] = x;
    else
        ((uint16_t *)a)[i] = t == BF ? bf16_nearest(x) : f16_nearest(x);
}

static void reference(int kind, int rounding, void *p, void *g, void *m, void *v, void *vmax,
                      void *copy, int64_t n, const fa_adam_scalars *sc, uint32_t key)
{
    const int pt = KIND_TYPES[kind][0], gt = KIND_TYPES[kind][1], st = KIND_TYPES[kind][2],
              ct = KIND_TYPES[kind][3];
    const int psr = (rounding & 1) != 0, ssr = (rounding & 2) != 0;
    const float step_size = (float)sc->step_size, bc2 = (float)sc->bias_correction2_sqrt,
                eps = (float)sc->eps, omb1 = (float)sc->one_minus_beta1,
                beta2 = (float)sc->beta2, omb2 = (float)sc->one_minus_beta2,
                wd = (float)sc->weight_decay, decay = (float)sc->decay,
                scale = (float)sc->grad_scale;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t r = mix32((uint32_t)i ^ mix32(key ^ (uint32_t)((uint64_t)i >> 32)));
        const uint32_t r2 = mix32(r);
        float gi = load(g, i, gt);
        if (sc->unscale) {
            gi = gi / scale;
            store(g, i, gt, gi);
        }
        if (sc->maximize)
            gi = -gi;
        float pi = load(p, i, pt);
        const float m0 = load(m, i, st), v0 = load(v, i, st);
        float mi, vi;
        if (ct < 0) {
            if (sc->weight_decay != 0.0)
                gi = fmaf(pi, wd, gi);
            pi = pi * decay;
            mi = omb1 < 0.5f ? fmaf(omb1, gi - m0, m0) : fmaf(omb1 - 1.0f, gi - m0, gi);
            vi = fmaf(omb2 * gi, gi, v0 * beta2);
        } else {
            if (sc->weight_decay != 0.0)
                gi = gi + wd * pi;
            pi = pi * decay;
            mi = m0 + (gi - m0) * omb1;
            vi = v0 * beta2 + omb2 * gi * gi;
        }
        if (ssr) { /* bfloat16 moments */
            ((uint16_t *)m)[i] = bf16_round(mi, r2 & 0xFFFFu);
            ((uint16_t *)v)[i] = bf16_round(vi, r2 >> 16);
        } else {
            store(m, i, st, mi);
            store(v, i, st, vi);
        }
        float second = vi;
        if (sc->amsgrad) {
            const float old = load(vmax, i, st);
            second = (old > vi || old != old) ? old : vi;
            if (ssr)
                ((uint16_t *)vmax)[i] = bf16_round(second, r2 >> 16);
            else
                store(vmax, i, st, second);
        }
        pi = pi - step_size * mi / (sqrtf(second) / bc2 + eps);
        const int rt = ct >= 0 ? ct : pt; /* the type the parameter is rounded to */
        uint16_t rounded = 0;
        if (rt != F32)
            rounded = !psr ? (rt == BF ? bf16_nearest(pi) : f16_nearest(pi))
                           : (rt == BF ? bf16_round(pi, r & 0xFFFFu) : f16_stochastic(pi, r));
        if (ct >= 0) {
            ((float *)p)[i] = pi;
            ((uint16_t *)copy)[i] = rounded;
        } else {
            ((uint16_t *)p)[i] = rounded;
        }
    }
}

/* ---------------------------------------------------------- the checks -- */

static int same(const void *a, const void *b, int64_t i, int t)
{
    g_checks++;
    if (t == F32) {
        const float x = ((const float *)a)[i], y = ((const float *)b)[i];
        return (isnan(x) && isnan(y)) || bits(x) == bits(y);
    }
    const uint16_t x = ((const uint16_t *)a)[i], y = ((const uint16_t *)b)[i];
    const uint16_t inf = t == BF ? 0x7F80 : 0x7C00;
    return ((x & 0x7FFF) > inf && (y & 0x7FFF) > inf) || x == y;
}

static void fill(void *a, int64_t n, int t, double scale, int positive)
{
    for (int64_t i = 0; i < n; i++) {
        double x = (uniform() * 2 - 1) * scale;
        if (positive)
            x = fabs(x);
        const double r = uniform();
        if (r < 0.01)
            x = NAN;
        else if (r < 0.02)
            x = positive ? INFINITY : -INFINITY;
        else if (r < 0.03)
            x = 0.0;
        else if (r < 0.04)
            x = 70000.0; /* past float16's range */
        if (t == F32)
            ((float *)a)[i] = (float)x;
        else
            ((uint16_t *)a)[i] = t == BF ? bf16_nearest((float)x) : f16_nearest((float)x);
    }
}

enum { NT = 3 };

static void check(int kind, int rounding, int flags, const int64_t *n)
{
    const int pt = KIND_TYPES[kind][0], gt = KIND_TYPES[kind][1], st = KIND_TYPES[kind][2],
              ct = KIND_TYPES[kind][3];
    const int types[6] = {pt, gt, st, st, st, ct < 0 ? F32 : ct};
    void *arr[6][NT], *ref[6][NT];
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < 6; r++) {
            const size_t bytes = (size_t)(n[t] > 0 ? n[t] : 1) * elsize(types[r]);
            arr[r][t] = malloc(bytes);
            ref[r][t] = malloc(bytes);
            fill(arr[r][t], n[t], types[r], r == 0 ? 1.0 : r == 1 ? 0.1 : 0.01, r >= 3);
            memcpy(ref[r][t], arr[r][t], bytes);
        }
    fa_adam_scalars sc = {0};
    sc.step_size = 1e-2 / (1 - pow(0.9, 3));
    sc.bias_correction2_sqrt = sqrt(1 - pow(0.999, 3));
    sc.eps = 1e-8;
    sc.one_minus_beta1 = (flags & 16) ? 0.7 : 0.1; /* 16: torch's other lerp branch */
    sc.beta2 = 0.999;
    sc.one_minus_beta2 = 1 - 0.999;
    sc.weight_decay = (flags & 1) ? 0.01 : 0.0;
    sc.decay = (flags & 1) ? 1.0 : 1.0 - 1e-2 * 0.1;
    sc.amsgrad = (flags & 2) != 0;
    sc.unscale = (flags & 4) != 0;
    sc.grad_scale = sc.unscale ? 3.0 : 1.0;
    sc.maximize = (flags & 8) != 0;
    sc.state_rounding = FA_STATE_SAME_DTYPE;
    const uint32_t keys[NT] = {0x12345678u, 0x9ABCDEF0u, 7u};
    const int rc = fa_adam_lowp_multi(kind, rounding, NT, arr[0], arr[1], arr[2], arr[3],
                                      sc.amsgrad ? arr[4] : NULL, ct >= 0 ? arr[5] : NULL, n,
                                      &sc, 1, NULL, keys);
    if (rc != FA_OK) {
        g_failures++;
        fprintf(stderr, "kind %d: rc %d\n", kind, rc);
    }
    for (int t = 0; t < NT; t++) {
        reference(kind, rounding, ref[0][t], ref[1][t], ref[2][t], ref[3][t], ref[4][t],
                  ref[5][t], n[t], &sc, keys[t]);
        for (int r = 0; r < 6; r++) {
            if ((r == 4 && !sc.amsgrad) || (r == 5 && ct < 0))
                continue;
            for (int64_t i = 0; i < n[t]; i++)
                if (!same(arr[r][t], ref[r][t], i, types[r])) {
                    if (g_failures++ < 10)
                        fprintf(stderr, "kind %d sr %d flags %d tensor %d array %d elem %lld\n",
                                kind, rounding, flags, t, r, (long long)i);
                    break;
                }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < 6; r++) {
            free(arr[r][t]);
            free(ref[r][t]);
        }
}

static void expect(int got, int want, const char *what)
{
    g_checks++;
    if (got != want) {
        g_failures++;
        fprintf(stderr, "%s: got %d, want %d\n", what, got, want);
    }
}

static void check_errors(void)
{
    float p[8] = {0}, g[8] = {0}, m[8] = {0}, v[8] = {0};
    uint16_t c[8] = {0}, h[8] = {0};
    void *P[1] = {p}, *G[1] = {g}, *M[1] = {m}, *V[1] = {v}, *C[1] = {c}, *H[1] = {h};
    int64_t n[1] = {8};
    fa_adam_scalars sc = {0};
    sc.step_size = 1e-3, sc.bias_correction2_sqrt = 1, sc.one_minus_beta1 = 0.1;
    sc.beta2 = 0.999, sc.one_minus_beta2 = 0.001, sc.decay = 1, sc.grad_scale = 1;
    expect(fa_adam_lowp_multi(2, 0, 1, P, G, M, V, NULL, NULL, n, &sc, 1, NULL, NULL),
           FA_ERR_NULL, "master without a copy");
    expect(fa_adam_lowp_multi(N_KINDS, 0, 1, P, G, M, V, NULL, C, n, &sc, 1, NULL, NULL),
           FA_ERR_ROUNDING, "unknown kind");
    expect(fa_adam_lowp_multi(4, 2, 1, P, G, M, V, NULL, C, n, &sc, 1, NULL, NULL),
           FA_ERR_ROUNDING, "stochastic float32 moments");
    expect(fa_adam_lowp_multi(7, 2, 1, H, H, M, V, NULL, NULL, n, &sc, 1, NULL, NULL),
           FA_ERR_ROUNDING, "stochastic float32 moments of float16 params");
    expect(fa_adam_lowp_multi(0, 4, 1, H, H, H, H, NULL, NULL, n, &sc, 1, NULL, NULL),
           FA_ERR_ROUNDING, "an unknown rounding bit");
    void *overlap[1] = {(char *)p + 4};
    expect(fa_adam_lowp_multi(2, 0, 1, P, overlap, M, V, NULL, C, n, &sc, 1, NULL, NULL),
           FA_ERR_OVERLAP, "overlap");
    sc.amsgrad = 1;
    expect(fa_adam_lowp_multi(2, 0, 1, P, G, M, V, NULL, C, n, &sc, 1, NULL, NULL),
           FA_ERR_AMSGRAD, "amsgrad without vmax");
    sc.amsgrad = 0;
    sc.state_rounding = FA_STATE_BF16_NEAREST;
    expect(fa_adam_lowp_multi(0, 0, 1, H, H, H, H, NULL, NULL, n, &sc, 1, NULL, NULL),
           FA_ERR_ROUNDING, "bf16 state rounding");
    sc.state_rounding = 0;
    const int32_t bad_index[1] = {1};
    expect(fa_adam_lowp_multi(2, 0, 1, P, G, M, V, NULL, C, n, &sc, 1, bad_index, NULL),
           FA_ERR_INDEX, "scalar index");
    int64_t neg[1] = {-1};
    expect(fa_adam_lowp_multi(2, 0, 1, P, G, M, V, NULL, C, neg, &sc, 1, NULL, NULL),
           FA_ERR_SIZE, "negative n");
    for (int i = 0; i < 8; i++)
        if (p[i] != 0 || c[i] != 0 || h[i] != 0)
            expect(1, 0, "an error wrote to an array");
}

static int run_here(void)
{
    static const int64_t sizes[][NT] = {
        {0, 1, 7}, {33, 64, 65}, {1000, 3, 70001}, {131072, 5, 0},
    };
    for (int threads = 1; threads <= 2; threads++) {
        fa_set_num_threads(threads);
        for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
            for (int kind = 0; kind < N_KINDS; kind++)
                for (int rounding = 0; rounding < 4; rounding++) {
                    const int bf16_moments = KIND_TYPES[kind][2] == BF;
                    if ((rounding & 2) && !bf16_moments)
                        continue;
                    /* the (kind, rounding) pairs that existed before the float16
                     * stochastic rounding and the kinds 6-8: every flag
                     * combination on the two small sizes, four on the large ones.
                     * The newer pairs (to keep the sanitizer run short): every
                     * combination on the first sizes, four on the second, and
                     * all flags at once on the large ones with 2 threads. */
                    const int older = kind < 6 && rounding < 2 &&
                                      (rounding == 0 || KIND_TYPES[kind][3] == BF ||
                                       kind == 0);
                    for (int flags = 0; flags < 32; flags++) {
                        const int some = flags == 0 || flags == 3 || flags == 12 || flags == 31;
                        const int run = older ? (s < 2 || some)
                                              : (s == 0 || (s == 1 && some) ||
                                                 (threads == 2 && flags == 31));
                        if (run)
                            check(kind, rounding, flags, sizes[s]);
                    }
                }
    }
    check_errors();
    printf("passed: %ld checks on the %s variant\n", g_checks, fa_isa());
    return g_failures ? 1 : 0;
}

int main(int argc, char **argv)
{
    (void)argc;
    if (getenv("FA_TEST_CHILD") != NULL)
        return run_here();
    static const char *const isas[] = {"baseline", "avx2", "avx512"};
    int failed = 0;
    for (size_t k = 0; k < 3; k++) {
        fflush(stdout);
        const pid_t pid = fork();
        if (pid == 0) {
            setenv("FA_TEST_CHILD", "1", 1);
            setenv("FASTADAM_ISA", isas[k], 1);
            execv("/proc/self/exe", argv);
            _exit(2);
        }
        int status = 0;
        if (pid < 0 || waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0) {
            fprintf(stderr, "the %s run failed\n", isas[k]);
            failed++;
        }
    }
    if (failed)
        return 1;
    printf("all passed\n");
    return 0;
}
