/*
 * fastadam.c - public entry points: argument checks, run-time ISA dispatch,
 * OpenMP work splitting and fork safety. The arithmetic itself lives in
 * fastadam_kernel_impl.h, compiled once per ISA (fastadam_kernel.c).
 */
#define _GNU_SOURCE /* sched_getaffinity / CPU_COUNT */
#include "fastadam.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#  include <sched.h>
#endif
#if defined(_OPENMP)
#  include <omp.h>
#endif

#include "fastadam_internal.h"

/*
 * Steps smaller than this run on the calling thread with no parallel region,
 * and no thread of a parallel step gets fewer than FA_MIN_ELEMENTS_PER_THREAD.
 * Measured on a 2-core x86-64 KVM guest (AVX-512), float32, workers still
 * spinning from the previous step: a serial step costs ~0.55 ns/element
 * (divide/sqrt bound) and a fork/join ~2-3 us, so 2 threads break even near
 * 16K elements and win clearly from 24K (32K: 17.5 -> 11.1 us). Waking workers
 * that went to sleep costs far more (tens of us on bare metal, up to ms on
 * this VM), so the cut-off keeps every thread >= 16K elements (~9 us of work)
 * rather than sitting at the break-even point. Overridable at build time.
 */
#ifndef FA_PARALLEL_MIN_ELEMENTS
#  define FA_PARALLEL_MIN_ELEMENTS 32768
#endif
#ifndef FA_MIN_ELEMENTS_PER_THREAD
#  define FA_MIN_ELEMENTS_PER_THREAD 16384
#endif
/* fa_set_num_threads clamps to this (more would only exhaust the OS). */
#define FA_MAX_THREADS 4096

/* Threads' shares start on this boundary of param, so no two threads write
 * the same cache line of param (false sharing). */
#define FA_CACHE_LINE 64

/* ---------------------------------------------------------------- state -- */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static const fa_kernel_table *g_table; /* written once under g_once */
static int g_default_threads = 1;      /* written once under g_once */
static atomic_int g_num_threads;       /* 0 until set: use g_default_threads */
/* Set in a fork() child: GNU libgomp's thread pool does not survive fork, and
 * a child that enters a parallel region after its parent used one hangs. */
static atomic_int g_forked;

/* ------------------------------------------------------- fork safety -- */

static void fa_atfork_child(void)
{
    atomic_store_explicit(&g_forked, 1, memory_order_relaxed);
}

/* Registered when the library is loaded, not at the first step: the child of
 * any fork after loading is marked, whoever used OpenMP in the parent. glibc
 * drops the handler again if the library is unloaded. */
__attribute__((constructor)) static void fa_register_atfork(void)
{
    pthread_atfork(NULL, NULL, fa_atfork_child);
}

/* ------------------------------------------------------ ISA selection -- */

enum { FA_ISA_BASELINE = 0, FA_ISA_AVX2 = 1, FA_ISA_AVX512 = 2 };

static const fa_kernel_table *fa_table_for(int isa)
{
    switch (isa) {
#if defined(FA_HAVE_AVX512)
    case FA_ISA_AVX512:
        return &fa_kernels_avx512;
#endif
#if defined(FA_HAVE_AVX2)
    case FA_ISA_AVX2:
        return &fa_kernels_avx2;
#endif
    default:
        return &fa_kernels_baseline;
    }
}

/* The best variant that is both compiled in and supported by this CPU (and
 * its OS: libgcc's __builtin_cpu_supports checks that the OS saves the
 * AVX / AVX-512 register state). */
static int fa_best_isa(void)
{
#if defined(__x86_64__) && (defined(FA_HAVE_AVX2) || defined(FA_HAVE_AVX512))
    __builtin_cpu_init();
#  if defined(FA_HAVE_AVX512)
    /* The avx512 variant is compiled with -mavx512f -mavx512vl -mavx512bw
     * (BW: 512-bit vectors of the bfloat16 states' 16-bit lanes). */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
        return FA_ISA_AVX512;
#  endif
#  if defined(FA_HAVE_AVX2)
    if (__builtin_cpu_supports("avx2"))
        return FA_ISA_AVX2;
#  endif
#endif
    return FA_ISA_BASELINE;
}

/* FASTADAM_ISA may lower the choice (to test every variant on one machine);
 * a variant the CPU lacks, or an unknown name, is ignored. */
static int fa_choose_isa(void)
{
    const int best = fa_best_isa();
    const char *env = getenv("FASTADAM_ISA");
    int wanted = best;
    if (env != NULL) {
        if (strcmp(env, "baseline") == 0)
            wanted = FA_ISA_BASELINE;
        else if (strcmp(env, "avx2") == 0)
            wanted = FA_ISA_AVX2;
        else if (strcmp(env, "avx512") == 0)
            wanted = FA_ISA_AVX512;
    }
    return wanted < best ? wanted : best;
}

static int fa_cpus_available(void)
{
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0)
            return n;
    }
#endif
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (n > FA_MAX_THREADS ? FA_MAX_THREADS : (int)n) : 1;
}

static void fa_init(void)
{
    g_table = fa_table_for(fa_choose_isa());
    g_default_threads = fa_cpus_available();
}

static inline void fa_ensure_init(void)
{
    pthread_once(&g_once, fa_init);
}

/* ----------------------------------------------------------- threads -- */

int fa_set_num_threads(int n)
{
    if (n < 0)
        return FA_ERR_THREADS;
    if (n > FA_MAX_THREADS)
        n = FA_MAX_THREADS;
    atomic_store_explicit(&g_num_threads, n, memory_order_relaxed);
    return FA_OK;
}

int fa_get_num_threads(void)
{
    const int n = atomic_load_explicit(&g_num_threads, memory_order_relaxed);
    if (n > 0)
        return n;
    fa_ensure_init();
    return g_default_threads;
}

/* How many threads a call over n elements uses: one below min_total, else at
 * most one per min_per_thread elements. */
static int fa_team_size(int64_t n, int64_t min_total, int64_t min_per_thread)
{
#if defined(_OPENMP)
    if (n < min_total || atomic_load_explicit(&g_forked, memory_order_relaxed))
        return 1;
    int64_t nt = fa_get_num_threads();
    const int64_t cap = n / min_per_thread;
    if (nt > cap)
        nt = cap;
    return nt < 1 ? 1 : (int)nt;
#else
    (void)n;
    (void)min_total;
    (void)min_per_thread;
    return 1;
#endif
}

#if defined(_OPENMP)
/*
 * Start of share k of `parts` of [0, n): the even split point k*n/parts,
 * moved forward to the next 64-byte boundary of param (base). Monotone in k,
 * with split(0) == 0 and split(parts) == n, so the shares tile [0, n).
 * Every element is computed the same way whoever computes it, so the result
 * does not depend on the split.
 */
static int64_t fa_split(uintptr_t base, size_t elsize, int64_t n, int k, int parts)
{
    if (k <= 0)
        return 0;
    if (k >= parts)
        return n;
    /* k*n/parts without overflow (n may be near 2^63; k < parts is small). */
    int64_t i = (n / parts) * k + (n % parts) * k / parts;
    const uintptr_t addr = base + (uintptr_t)i * elsize;
    const uintptr_t pad = (FA_CACHE_LINE - addr % FA_CACHE_LINE) % FA_CACHE_LINE;
    i += (int64_t)(pad / elsize);
    return i < n ? i : n;
}
#endif

/* --------------------------------------------------- argument checks -- */

/* [a, a+abytes) and [b, b+bbytes) share a byte. */
static int fa_overlap(const void *a, uintptr_t abytes, const void *b, uintptr_t bbytes)
{
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + bbytes && y < x + abytes;
}

/* The arrays of a step, in the order param, grad, exp_avg, exp_avg_sq,
 * max_exp_avg_sq, each with its element size. */
enum { FA_N_ARRAYS = 5 };

/* Everything a step checks about its arrays before touching memory. vmax
 * (arrays[4]) counts only when amsgrad is set. */
static int fa_check(const void *const arrays[FA_N_ARRAYS], const size_t elsize[FA_N_ARRAYS],
                    int64_t n, int amsgrad)
{
    for (int i = 0; i < 4; i++)
        if (arrays[i] == NULL)
            return FA_ERR_NULL;
    if (n < 0)
        return FA_ERR_SIZE;
    if (amsgrad && arrays[4] == NULL)
        return FA_ERR_AMSGRAD;
    const int count = amsgrad ? 5 : 4;
    /* No array can span more than the address space; past that n is bogus
     * (and n * elsize below would overflow). */
    for (int i = 0; i < count; i++)
        if ((uint64_t)n > (uint64_t)(PTRDIFF_MAX / (ptrdiff_t)elsize[i]))
            return FA_ERR_SIZE;
    if (n == 0)
        return FA_OK;
    for (int i = 0; i < count; i++)
        for (int j = i + 1; j < count; j++)
            if (fa_overlap(arrays[i], (uintptr_t)n * elsize[i], arrays[j],
                           (uintptr_t)n * elsize[j]))
                return FA_ERR_OVERLAP;
    return FA_OK;
}

static int fa_flags(const fa_adam_scalars *sc)
{
    return (sc->weight_decay != 0.0 ? FA_F_L2 : 0) | (sc->amsgrad ? FA_F_AMSGRAD : 0) |
           (sc->unscale ? FA_F_UNSCALE : 0) | (sc->maximize ? FA_F_MAXIMIZE : 0);
}

/* ------------------------------------------------------------- steps -- */

/*
 * Runs the trailing arguments (a call using lo and hi) over the shares
 * [lo, hi) of [0, n) on nt threads, split on cache lines of `base` (elements
 * of `elsize` bytes). The team may be smaller than asked (OMP_THREAD_LIMIT, nesting):
 * the split uses its real size, so every element is still covered exactly once.
 */
#if defined(_OPENMP)
#  define FA_PARALLEL_SHARES(nt, base, elsize, n, ...)                                   \
      _Pragma("omp parallel num_threads(nt)")                                            \
      {                                                                                  \
          const int parts_ = omp_get_num_threads(), k_ = omp_get_thread_num();           \
          const int64_t lo = fa_split((uintptr_t)(base), (elsize), (n), k_, parts_);     \
          const int64_t hi = fa_split((uintptr_t)(base), (elsize), (n), k_ + 1, parts_); \
          if (lo < hi) {                                                                 \
              __VA_ARGS__;                                                               \
          }                                                                              \
      }
#else
#  define FA_PARALLEL_SHARES(nt, base, elsize, n, ...) \
      {                                                \
          const int64_t lo = 0, hi = (n);              \
          (void)(nt);                                  \
          __VA_ARGS__;                                 \
      }
#endif

/* The double scalars rounded to float once, by C's conversion (round to
 * nearest even, like NumPy's float64 -> float32 cast). */
#define FA_ROUND_SCALARS(T, sc)                                                            \
    {                                                                                      \
        (T)(sc)->step_size,       (T)(sc)->bias_correction2_sqrt, (T)(sc)->eps,            \
        (T)(sc)->one_minus_beta1, (T)(sc)->beta2,                 (T)(sc)->one_minus_beta2, \
        (T)(sc)->weight_decay,    (T)(sc)->decay,                 (T)(sc)->grad_scale,     \
    }

/* The two same-type entry points differ only in the element type; the macro
 * keeps them identical. */
#define FA_DEFINE_STEP(name, T, sfx)                                                          \
    int name(T *param, T *grad, T *exp_avg, T *exp_avg_sq, T *max_exp_avg_sq, int64_t n,       \
             const fa_adam_scalars *sc_in)                                                    \
    {                                                                                         \
        if (sc_in == NULL)                                                                    \
            return FA_ERR_NULL;                                                               \
        /* One read of the caller's struct: the checks and the step see the same flags. */   \
        const fa_adam_scalars sc_copy = *sc_in;                                               \
        const fa_adam_scalars *const sc = &sc_copy;                                           \
        const void *const arrays[FA_N_ARRAYS] = {param, grad, exp_avg, exp_avg_sq,            \
                                                 max_exp_avg_sq};                             \
        const size_t sizes[FA_N_ARRAYS] = {sizeof(T), sizeof(T), sizeof(T), sizeof(T),        \
                                           sizeof(T)};                                        \
        const int rc = fa_check(arrays, sizes, n, sc->amsgrad);                               \
        if (rc != FA_OK)                                                                      \
            return rc;                                                                        \
        if (sc->state_rounding != FA_STATE_SAME_DTYPE)                                        \
            return FA_ERR_ROUNDING;                                                           \
        if (n == 0)                                                                           \
            return FA_OK;                                                                     \
        fa_ensure_init();                                                                     \
        const fa_scalars_##sfx s = FA_ROUND_SCALARS(T, sc);                                   \
        const fa_kernel_##sfx kernel = g_table->sfx[fa_flags(sc)];                            \
        T *const vmax = sc->amsgrad ? max_exp_avg_sq : NULL;                                  \
        const int nt = fa_team_size(n, FA_PARALLEL_MIN_ELEMENTS, FA_MIN_ELEMENTS_PER_THREAD); \
        if (nt <= 1) {                                                                        \
            kernel(param, grad, exp_avg, exp_avg_sq, vmax, n, &s);                            \
            return FA_OK;                                                                     \
        }                                                                                     \
        FA_PARALLEL_SHARES(nt, param, sizeof(T), n,                                           \
                           kernel(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo,       \
                                  vmax != NULL ? vmax + lo : NULL, hi - lo, &s))              \
        return FA_OK;                                                                         \
    }

FA_DEFINE_STEP(fa_adam_f32, float, f32)
FA_DEFINE_STEP(fa_adam_f64, double, f64)

int fa_adam_f32_bf16_at(float *param, float *grad, uint16_t *exp_avg, uint16_t *exp_avg_sq,
                        uint16_t *max_exp_avg_sq, int64_t n, int64_t first_index,
                        const fa_adam_scalars *sc_in)
{
    if (sc_in == NULL)
        return FA_ERR_NULL;
    const fa_adam_scalars sc_copy = *sc_in;
    const fa_adam_scalars *const sc = &sc_copy;
    const void *const arrays[FA_N_ARRAYS] = {param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq};
    const size_t sizes[FA_N_ARRAYS] = {sizeof(float), sizeof(float), sizeof(uint16_t),
                                       sizeof(uint16_t), sizeof(uint16_t)};
    const int rc = fa_check(arrays, sizes, n, sc->amsgrad);
    if (rc != FA_OK)
        return rc;
    /* The global indices [first_index, first_index + n) must exist. */
    if (first_index < 0 || first_index > INT64_MAX - n)
        return FA_ERR_SIZE;
    if (sc->state_rounding != FA_STATE_BF16_NEAREST &&
        sc->state_rounding != FA_STATE_BF16_STOCHASTIC)
        return FA_ERR_ROUNDING;
    if (n == 0)
        return FA_OK;
    fa_ensure_init();
    const fa_scalars_f32 s = FA_ROUND_SCALARS(float, sc);
    const int mode =
        sc->state_rounding == FA_STATE_BF16_STOCHASTIC ? FA_BF16_STOCHASTIC : FA_BF16_NEAREST;
    const fa_kernel_bf16 kernel = g_table->bf16[mode][fa_flags(sc)];
    const uint32_t key = sc->rounding_key;
    uint16_t *const vmax = sc->amsgrad ? max_exp_avg_sq : NULL;
    const int nt = fa_team_size(n, FA_PARALLEL_MIN_ELEMENTS, FA_MIN_ELEMENTS_PER_THREAD);
    if (nt <= 1) {
        kernel(param, grad, exp_avg, exp_avg_sq, vmax, n, first_index, &s, key);
        return FA_OK;
    }
    /* Each share passes its own global start, so the random bits (a function of
     * the global index) do not depend on the split. */
    FA_PARALLEL_SHARES(nt, param, sizeof(float), n,
                       kernel(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo,
                              vmax != NULL ? vmax + lo : NULL, hi - lo, first_index + lo, &s,
                              key))
    return FA_OK;
}

int fa_adam_f32_bf16(float *param, float *grad, uint16_t *exp_avg, uint16_t *exp_avg_sq,
                     uint16_t *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc)
{
    return fa_adam_f32_bf16_at(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, 0, sc);
}

/* ---------------------------------------------------- unscale + check -- */

/*
 * One division (or multiply) per element and 8 or 16 bytes of traffic: far
 * less work per element than a step, so a thread needs more elements to pay
 * for waking the team (measured as for the step's threshold, above).
 */
#ifndef FA_UNSCALE_PARALLEL_MIN_ELEMENTS
#  define FA_UNSCALE_PARALLEL_MIN_ELEMENTS 262144
#endif
#ifndef FA_UNSCALE_MIN_ELEMENTS_PER_THREAD
#  define FA_UNSCALE_MIN_ELEMENTS_PER_THREAD 131072
#endif

/* 1/scale when scale is a power of two and both it and 1/scale are normal
 * numbers of the type (then x * (1/scale) == x / scale exactly, whatever x,
 * even with denormals-are-zero set); else 0: the kernel must divide. */
static float fa_exact_reciprocal_f32(float scale)
{
    const float a = fabsf(scale);
    int e;
    if (!(a >= FLT_MIN && a <= FLT_MAX) || frexpf(a, &e) != 0.5f)
        return 0.0f;
    const float r = 1.0f / scale; /* exact: a power of two */
    return fabsf(r) >= FLT_MIN ? r : 0.0f;
}

static double fa_exact_reciprocal_f64(double scale)
{
    const double a = fabs(scale);
    int e;
    if (!(a >= DBL_MIN && a <= DBL_MAX) || frexp(a, &e) != 0.5)
        return 0.0;
    const double r = 1.0 / scale;
    return fabs(r) >= DBL_MIN ? r : 0.0;
}

#define FA_DEFINE_UNSCALE(name, T, sfx)                                                      \
    int name(T *grad, int64_t n, double grad_scale, int *found_inf)                          \
    {                                                                                        \
        if (grad == NULL || found_inf == NULL)                                               \
            return FA_ERR_NULL;                                                              \
        if (n < 0 || (uint64_t)n > (uint64_t)(PTRDIFF_MAX / (ptrdiff_t)sizeof(T)))           \
            return FA_ERR_SIZE;                                                              \
        if (n == 0) {                                                                        \
            *found_inf = 0;                                                                  \
            return FA_OK;                                                                    \
        }                                                                                    \
        fa_ensure_init();                                                                    \
        const fa_unscale_##sfx kernel = g_table->unscale_##sfx;                              \
        const T scale = (T)grad_scale; /* rounded once, like np.divide(g, T(scale)) */       \
        const T recip = fa_exact_reciprocal_##sfx(scale);                                    \
        const int nt = fa_team_size(n, FA_UNSCALE_PARALLEL_MIN_ELEMENTS,                     \
                                    FA_UNSCALE_MIN_ELEMENTS_PER_THREAD);                     \
        int bad = 0;                                                                         \
        if (nt <= 1) {                                                                       \
            bad = kernel(grad, n, scale, recip);                                             \
        } else {                                                                             \
            FA_UNSCALE_PARALLEL(T)                                                           \
        }                                                                                    \
        *found_inf = bad != 0;                                                               \
        return FA_OK;                                                                        \
    }

#if defined(_OPENMP)
#  define FA_UNSCALE_PARALLEL(T)                                                      \
      _Pragma("omp parallel num_threads(nt) reduction(|:bad)")                        \
      {                                                                               \
          const int parts = omp_get_num_threads(), k = omp_get_thread_num();          \
          const int64_t lo = fa_split((uintptr_t)grad, sizeof(T), n, k, parts);       \
          const int64_t hi = fa_split((uintptr_t)grad, sizeof(T), n, k + 1, parts);   \
          if (lo < hi)                                                                \
              bad |= kernel(grad + lo, hi - lo, scale, recip);                        \
      }
#else
#  define FA_UNSCALE_PARALLEL(T) bad = kernel(grad, n, scale, recip);
#endif

FA_DEFINE_UNSCALE(fa_unscale_check_f32, float, f32)
FA_DEFINE_UNSCALE(fa_unscale_check_f64, double, f64)

/* ------------------------------------------------------------- misc -- */

const char *fa_isa(void)
{
    fa_ensure_init();
    return g_table->isa;
}

const char *fa_strerror(int code)
{
    switch (code) {
    case FA_OK:
        return "success";
    case FA_ERR_NULL:
        return "a required pointer argument is NULL";
    case FA_ERR_SIZE:
        return "invalid element count (negative or larger than the address space) "
               "or first_index (negative, or first_index + n overflows)";
    case FA_ERR_AMSGRAD:
        return "amsgrad is set but max_exp_avg_sq is NULL";
    case FA_ERR_OVERLAP:
        return "the arrays overlap in memory";
    case FA_ERR_THREADS:
        return "the thread count must be >= 0 (0 restores the default)";
    case FA_ERR_ROUNDING:
        return "state_rounding does not match the function (0 for fa_adam_f32/f64, "
               "1 or 2 for fa_adam_f32_bf16)";
    default:
        return "unknown fastadam error code";
    }
}
