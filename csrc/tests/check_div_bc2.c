/*
 * check_div_bc2.c - the kernels' division by bias_correction2_sqrt through its
 * reciprocal (div_bc2 in fastadam_kernel_impl.h) against the division itself,
 * bit for bit.
 *
 * Compiled with the library's flags plus the target flags of the avx2 variant
 * (-mavx2 -mfma) and of the avx512 one (-mavx512f -mavx512vl -mavx512bw -mfma
 * -mprefer-vector-width=512), each in turn (tests/test_c_fma_division.py), so
 * div_bc2 takes its FMA path; the loops below are vectorized like the kernels'
 * own. For each divisor b:
 *   float: every significand of a in [1, 2) and in the lowest and highest binades
 *          sqrt can return ([2^-75, 2^-73) and [2^63, 2^64)), plus +0, +Inf and NaNs;
 *   double: N_DOUBLE pseudo-random a over the same range of exponents.
 * The divisors b: sqrt(1 - beta2^t) rounded as compute_scalars and the dispatcher
 * round it, for several beta2 and t = 1..steps, then `random` pseudo-random b in
 * [2^-40, 2] (the range where the dispatcher lets the kernels use the reciprocal),
 * and the ends of that range.
 *
 * usage: check_div_bc2 STEPS RANDOM   (prints the counts; exit 1 on any mismatch)
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastadam_internal.h"

#if !defined(__FMA__)
#error "compile with -mfma (the avx2 or avx512 variant's flags): the FMA path is what is checked"
#endif

#define FA_T float
#define FA_UINT uint32_t
#define FA_SQRT sqrtf
#define FA_SUFFIX f32
#define FA_FMA fmaf
#include "fastadam_kernel_impl.h"
#undef FA_T
#undef FA_UINT
#undef FA_SQRT
#undef FA_SUFFIX
#undef FA_FMA

#define FA_T double
#define FA_UINT uint64_t
#define FA_SQRT sqrt
#define FA_SUFFIX f64
#define FA_FMA fma
#include "fastadam_kernel_impl.h"
#undef FA_T
#undef FA_UINT
#undef FA_SQRT
#undef FA_SUFFIX
#undef FA_FMA

#define N_FLOAT_BINADE (1 << 23)
#define N_DOUBLE (1 << 20)

static uint64_t rng = 0x9E3779B97F4A7C15u;
static uint64_t next_u64(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint32_t f2u(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}
static float u2f(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}
static uint64_t d2u(double x)
{
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}
static double u2d(uint64_t u)
{
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static float *fa_in, *f_div, *f_rcp;
static double *d_in, *d_div, *d_rcp;
static int64_t n_float, n_checked_f, n_checked_d, bad_f, bad_d;

/* The scalars as the dispatcher builds them (FA_BC2_RCP in fastadam.c). */
static fa_scalars_f32 scalars_f32(float b)
{
    fa_scalars_f32 c;
    memset(&c, 0, sizeof c);
    c.bias_correction2_sqrt = b;
    c.bias_correction2_rcp = 1.0f / b;
    return c;
}
static fa_scalars_f64 scalars_f64(double b)
{
    fa_scalars_f64 c;
    memset(&c, 0, sizeof c);
    c.bias_correction2_sqrt = b;
    c.bias_correction2_rcp = 1.0 / b;
    return c;
}

static __attribute__((noinline)) void run_f32(float b)
{
    const fa_scalars_f32 c = scalars_f32(b);
    for (int64_t i = 0; i < n_float; i++)
        f_rcp[i] = div_bc2_f32(fa_in[i], c);
    for (int64_t i = 0; i < n_float; i++)
        f_div[i] = fa_in[i] / b;
    for (int64_t i = 0; i < n_float; i++)
        if (f2u(f_rcp[i]) != f2u(f_div[i])) {
            if (bad_f < 10)
                fprintf(stderr, "float: a=%a b=%a: div %a, rcp path %a\n", fa_in[i], b,
                        f_div[i], f_rcp[i]);
            bad_f++;
        }
    n_checked_f += n_float;
}

static __attribute__((noinline)) void run_f64(double b)
{
    const fa_scalars_f64 c = scalars_f64(b);
    for (int64_t i = 0; i < N_DOUBLE; i++)
        d_rcp[i] = div_bc2_f64(d_in[i], c);
    for (int64_t i = 0; i < N_DOUBLE; i++)
        d_div[i] = d_in[i] / b;
    for (int64_t i = 0; i < N_DOUBLE; i++)
        if (d2u(d_rcp[i]) != d2u(d_div[i])) {
            if (bad_d < 10)
                fprintf(stderr, "double: a=%a b=%a: div %a, rcp path %a\n", d_in[i], b,
                        d_div[i], d_rcp[i]);
            bad_d++;
        }
    n_checked_d += N_DOUBLE;
}

static void check_b(double b64)
{
    run_f32((float)b64);
    run_f64(b64);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s STEPS RANDOM\n", argv[0]);
        return 2;
    }
    const int steps = atoi(argv[1]), random_bs = atoi(argv[2]);

    /* float dividends: three binades in full, then the specials */
    const int binades[3] = {0, -75, 63};
    n_float = 3 * (int64_t)N_FLOAT_BINADE + 6;
    fa_in = malloc(sizeof(float) * n_float);
    f_div = malloc(sizeof(float) * n_float);
    f_rcp = malloc(sizeof(float) * n_float);
    d_in = malloc(sizeof(double) * N_DOUBLE);
    d_div = malloc(sizeof(double) * N_DOUBLE);
    d_rcp = malloc(sizeof(double) * N_DOUBLE);
    if (!fa_in || !f_div || !f_rcp || !d_in || !d_div || !d_rcp)
        return 2;
    int64_t k = 0;
    for (int e = 0; e < 3; e++)
        for (uint32_t s = 0; s < N_FLOAT_BINADE; s++)
            fa_in[k++] = u2f(((uint32_t)(binades[e] + 127) << 23) | s);
    fa_in[k++] = 0.0f;
    fa_in[k++] = INFINITY;
    fa_in[k++] = u2f(0x7FC00000u); /* the NaNs sqrt can return: quiet, either sign, */
    fa_in[k++] = u2f(0xFFC00000u); /* and with a payload */
    fa_in[k++] = u2f(0x7FC12345u);
    fa_in[k++] = u2f(0xFFC54321u);
    /* double dividends: random significands, exponents from sqrt's range */
    for (int64_t i = 0; i < N_DOUBLE; i++) {
        const uint64_t r = next_u64();
        const int64_t e = (int64_t)(r >> 52) % 1050 - 537; /* [2^-537, 2^513) */
        d_in[i] = u2d(((uint64_t)(e + 1023) << 52) | (next_u64() & ((1ull << 52) - 1)));
    }
    d_in[0] = 0.0;
    d_in[1] = INFINITY;
    d_in[2] = u2d(0x7FF8000000000000ull);
    d_in[3] = u2d(0xFFF8000000000123ull);

    int64_t n_b = 0;
    const double beta2s[] = {0.0, 0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999,
                             0.99999, 0.999999};
    for (size_t j = 0; j < sizeof beta2s / sizeof *beta2s; j++)
        for (int t = 1; t <= steps; t++, n_b++)
            check_b(sqrt(1.0 - pow(beta2s[j], t))); /* compute_scalars' b */
    const double ends[] = {0x1p-40, 2.0, 1.0, 0x1.fffffep-1, 0x1.000002p-40, 0x1.fffffep0};
    for (size_t j = 0; j < sizeof ends / sizeof *ends; j++, n_b++)
        check_b(ends[j]);
    for (int j = 0; j < random_bs; j++, n_b++) {
        /* uniform in log2 over [2^-40, 2] */
        const double u = (double)(next_u64() >> 11) * 0x1p-53;
        check_b(exp2(-40.0 + 41.0 * u));
    }
    printf("divisors %lld, float quotients %lld (mismatches %lld), double quotients %lld "
           "(mismatches %lld)\n",
           (long long)n_b, (long long)n_checked_f, (long long)bad_f, (long long)n_checked_d,
           (long long)bad_d);
    return bad_f || bad_d ? 1 : 0;
}
