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
#if defined(_OPENMP)
static int g_default_threads = 1;      /* written once under g_once */
static atomic_int g_num_threads;       /* 0 until set: use g_default_threads */
#endif
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
     * -mfma (BW: 512-bit vectors of the bfloat16 states' 16-bit lanes). */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma"))
        return FA_ISA_AVX512;
#  endif
#  if defined(FA_HAVE_AVX2)
    /* compiled with -mavx2 -mfma; every AVX2 CPU made has FMA, but ask */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
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

#if defined(_OPENMP)
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

#endif

int64_t fa_bf16_prefetch_elements = FA_PREFETCH_BYTES / sizeof(float);

static int64_t fa_bf16_prefetch_bytes(void)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel"))
        return FA_BF16_PREFETCH_BYTES_INTEL;
#endif
    return FA_PREFETCH_BYTES;
}

static void fa_init(void)
{
    g_table = fa_table_for(fa_choose_isa());
    fa_bf16_prefetch_elements = fa_bf16_prefetch_bytes() / (int64_t)sizeof(float);
#if defined(_OPENMP)
    g_default_threads = fa_cpus_available();
#endif
}

static inline void fa_ensure_init(void)
{
    pthread_once(&g_once, fa_init);
}

/* ----------------------------------------------------------- threads -- */

/* Built without OpenMP (e.g. Apple clang, or -DFASTADAM_OPENMP=OFF), the library
 * has one thread, the caller's: a count is still checked and accepted, and
 * fa_get_num_threads says 1, the number every step then uses. */
int fa_set_num_threads(int n)
{
    if (n < 0)
        return FA_ERR_THREADS;
#if defined(_OPENMP)
    if (n > FA_MAX_THREADS)
        n = FA_MAX_THREADS;
    atomic_store_explicit(&g_num_threads, n, memory_order_relaxed);
#endif
    return FA_OK;
}

int fa_get_num_threads(void)
{
#if defined(_OPENMP)
    const int n = atomic_load_explicit(&g_num_threads, memory_order_relaxed);
    if (n > 0)
        return n;
    fa_ensure_init();
    return g_default_threads;
#else
    return 1;
#endif
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

/* Index i of an array of n elements at base, moved forward to the next
 * 64-byte boundary of base (at most n). Monotone in i, so split points made
 * with it keep their order. */
static inline int64_t fa_align_up(uintptr_t base, size_t elsize, int64_t i, int64_t n)
{
    const uintptr_t addr = base + (uintptr_t)i * elsize;
    const uintptr_t pad = (FA_CACHE_LINE - addr % FA_CACHE_LINE) % FA_CACHE_LINE;
    i += (int64_t)(pad / elsize);
    return i < n ? i : n;
}

/* k*n/parts without overflow (n may be near 2^63; 0 < k < parts is small). */
static inline int64_t fa_even_point(int64_t n, int k, int parts)
{
    return (n / parts) * k + (n % parts) * k / parts;
}

#if defined(_OPENMP)
/*
 * Start of share k of `parts` of [0, n): the even split point, moved forward
 * to the next 64-byte boundary of base. split(0) == 0 and split(parts) == n,
 * so the shares tile [0, n). Every element is computed the same way whoever
 * computes it, so the result does not depend on the split.
 */
static int64_t fa_split(uintptr_t base, size_t elsize, int64_t n, int k, int parts)
{
    if (k <= 0)
        return 0;
    if (k >= parts)
        return n;
    return fa_align_up(base, elsize, fa_even_point(n, k, parts), n);
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

/* What the pointer tables of a step point to. */
enum { FA_KIND_F32 = 0, FA_KIND_F64 = 1, FA_KIND_BF16 = 2 };

static const size_t FA_ELSIZE[3][FA_N_ARRAYS] = {
    [FA_KIND_F32] = {4, 4, 4, 4, 4},
    [FA_KIND_F64] = {8, 8, 8, 8, 8},
    [FA_KIND_BF16] = {4, 4, 2, 2, 2},
};

/*
 * One call's work: `count` tensors, array r of tensor t being table[r][t].
 * The multi-tensor functions pass the caller's tables; the single-array ones
 * pass tables of one entry (the addresses of their own arguments) and a copy
 * of the scalars, so the checks and the work splitting below exist once.
 */
typedef struct fa_job {
    int kind;
    int64_t count;
    const void *table[FA_N_ARRAYS]; /* T *const * of the kind's types; [4] may be NULL */
    const int64_t *n;
    const fa_adam_scalars *scalars;
    const int32_t *scalar_index; /* NULL: every tensor uses scalars[0] */
    const uint32_t *keys;        /* bf16: NULL, or each tensor's rounding_key */
    int64_t first_index;         /* bf16: global index of element 0 of every tensor */
} fa_job;

/* Array r of tensor t, read through the type the caller's table has (the
 * tables are only ever accessed as what they are, never as void *). */
static inline void *fa_entry(const fa_job *job, int r, int64_t t)
{
    if (job->kind == FA_KIND_F64)
        return ((double *const *)job->table[r])[t];
    if (r < 2 || job->kind == FA_KIND_F32)
        return ((float *const *)job->table[r])[t];
    return ((uint16_t *const *)job->table[r])[t];
}

static inline const fa_adam_scalars *fa_scalars_of(const fa_job *job, int64_t t)
{
    return &job->scalars[job->scalar_index != NULL ? job->scalar_index[t] : 0];
}

/*
 * Everything the step checks before touching memory; on success *total is
 * the element count over all tensors. Per tensor, in the order of the
 * single-array functions (their error codes do not change with the driver).
 */
static inline __attribute__((always_inline)) int fa_check_job(const fa_job *job,
                                                               int64_t n_scalars,
                                                               int64_t *total)
{
    if (job->count < 0)
        return FA_ERR_SIZE;
    for (int r = 0; r < 4; r++)
        if (job->table[r] == NULL)
            return FA_ERR_NULL;
    if (job->n == NULL)
        return FA_ERR_NULL;
    *total = 0;
    if (job->count == 0)
        return FA_OK;
    if (job->scalars == NULL)
        return FA_ERR_NULL;
    if (job->scalar_index == NULL) {
        if (n_scalars < 1)
            return FA_ERR_INDEX;
    } else {
        for (int64_t t = 0; t < job->count; t++)
            if (job->scalar_index[t] < 0 || job->scalar_index[t] >= n_scalars)
                return FA_ERR_INDEX;
    }
    const int bf16 = job->kind == FA_KIND_BF16;
    int64_t sum = 0;
    for (int64_t t = 0; t < job->count; t++) {
        const fa_adam_scalars *const sc = fa_scalars_of(job, t);
        const int64_t n = job->n[t];
        const void *arrays[FA_N_ARRAYS];
        for (int r = 0; r < 4; r++)
            arrays[r] = fa_entry(job, r, t);
        arrays[4] = sc->amsgrad && job->table[4] != NULL ? fa_entry(job, 4, t) : NULL;
        const int rc = fa_check(arrays, FA_ELSIZE[job->kind], n, sc->amsgrad);
        if (rc != FA_OK)
            return rc;
        /* The global indices [first_index, first_index + n) must exist. */
        if (job->first_index < 0 || job->first_index > INT64_MAX - n)
            return FA_ERR_SIZE;
        const int rounding_ok = bf16 ? sc->state_rounding == FA_STATE_BF16_NEAREST ||
                                           sc->state_rounding == FA_STATE_BF16_STOCHASTIC
                                     : sc->state_rounding == FA_STATE_SAME_DTYPE;
        if (!rounding_ok)
            return FA_ERR_ROUNDING;
        if (n > INT64_MAX - sum)
            return FA_ERR_SIZE;
        sum += n;
    }
    *total = sum;
    return FA_OK;
}

/* Elements [lo, hi) of tensor t, on the calling thread, by the kernel its
 * scalars select. bf16 pieces pass their global start, so the random bits (a
 * function of the index in the tensor) do not depend on how it was split.
 *
 * The piece runs as two kernel calls: the few elements before param's next
 * 64-byte boundary, then the rest, so that the vector loop's accesses to
 * param (and to every array with param's offset within a line, as NumPy's
 * large arrays all have) do not straddle cache lines. NumPy's large arrays
 * start 16 bytes past a page boundary; unpeeled, a one-thread float32 step
 * at 2^24 took 1.4x as long as on 64-byte aligned arrays (AVX-512, Zen 4;
 * BENCHMARKS.md, "Aligned loops"). Elements are independent, so the split
 * does not change a bit. */
static inline __attribute__((always_inline)) void fa_run_piece(const fa_job *job, int64_t t,
                                                               int64_t lo, int64_t hi)
{
    const fa_adam_scalars *const sc = fa_scalars_of(job, t);
    const int flags = fa_flags(sc);
    const int ams = sc->amsgrad != 0;
    const uintptr_t base = (uintptr_t)fa_entry(job, 0, t);
    const int64_t cut = fa_align_up(base, FA_ELSIZE[job->kind][0], lo, hi);
    const int64_t bounds[3] = {lo, cut, hi};
#define FA_AT(T, r) (((T *const *)job->table[r])[t] + a)
    switch (job->kind) {
    case FA_KIND_F32: {
        const fa_scalars_f32 s = FA_ROUND_SCALARS(float, sc);
        for (int h = 0; h < 2; h++) {
            const int64_t a = bounds[h], len = bounds[h + 1] - a;
            if (len > 0)
                g_table->f32[flags](FA_AT(float, 0), FA_AT(float, 1), FA_AT(float, 2),
                                    FA_AT(float, 3), ams ? FA_AT(float, 4) : NULL, len, &s);
        }
        break;
    }
    case FA_KIND_F64: {
        const fa_scalars_f64 s = FA_ROUND_SCALARS(double, sc);
        for (int h = 0; h < 2; h++) {
            const int64_t a = bounds[h], len = bounds[h + 1] - a;
            if (len > 0)
                g_table->f64[flags](FA_AT(double, 0), FA_AT(double, 1), FA_AT(double, 2),
                                    FA_AT(double, 3), ams ? FA_AT(double, 4) : NULL, len, &s);
        }
        break;
    }
    default: {
        const fa_scalars_f32 s = FA_ROUND_SCALARS(float, sc);
        const int mode = sc->state_rounding == FA_STATE_BF16_STOCHASTIC ? FA_BF16_STOCHASTIC
                                                                        : FA_BF16_NEAREST;
        const uint32_t key = job->keys != NULL ? job->keys[t] : sc->rounding_key;
        for (int h = 0; h < 2; h++) {
            const int64_t a = bounds[h], len = bounds[h + 1] - a;
            if (len > 0)
                g_table->bf16[mode][flags](FA_AT(float, 0), FA_AT(float, 1), FA_AT(uint16_t, 2),
                                           FA_AT(uint16_t, 3), ams ? FA_AT(uint16_t, 4) : NULL,
                                           len, job->first_index + a, &s, key);
        }
        break;
    }
    }
#undef FA_AT
}

#if defined(_OPENMP)
/*
 * Start of share k of `parts` of the concatenation [0, total) of the tensors:
 * the even point, moved forward to the next 64-byte boundary of the param of
 * the tensor it falls in, or to the next tensor's start if that boundary lies
 * past its end. Monotone in k, split(0) == 0, split(parts) == total: the
 * shares tile the concatenation, and no two threads write one cache line of
 * one param. On entry (*t, *start) is a tensor at or before the point and
 * its offset in the concatenation; on return, the tensor the point falls in
 * (so share k+1's start is found by scanning on from share k's).
 */
static int64_t fa_split_job(const fa_job *job, int64_t total, int k, int parts, int64_t *t,
                            int64_t *start)
{
    if (k <= 0)
        return 0;
    if (k >= parts)
        return total;
    const int64_t s = fa_even_point(total, k, parts); /* < total: the scan stops in range */
    while (*start + job->n[*t] <= s) {
        *start += job->n[*t];
        ++*t;
    }
    const size_t elsize = FA_ELSIZE[job->kind][0];
    return *start + fa_align_up((uintptr_t)fa_entry(job, 0, *t), elsize, s - *start,
                                job->n[*t]);
}
#endif

/*
 * Checks, then runs the job. Inlined (with fa_check_job and fa_run_piece)
 * into each entry point, so that each copy has its kind, and the
 * single-array ones their count of 1, folded in: a single-array call of 16
 * elements then cost ~3 ns more than before the driver existed, ~8 ns as an
 * out-of-line function. The team is sized by the total element count,
 * as one array of that size would be, and each thread walks the tensors its
 * share of the concatenation meets, one kernel call per piece: one parallel
 * region per call whatever the number of tensors, and no allocation. The
 * team may be smaller than asked (OMP_THREAD_LIMIT, nesting): the split uses
 * its real size, so every element is still covered exactly once.
 */
static inline __attribute__((always_inline)) int fa_run(const fa_job *job, int64_t n_scalars)
{
    int64_t total;
    const int rc = fa_check_job(job, n_scalars, &total);
    if (rc != FA_OK)
        return rc;
    if (total == 0)
        return FA_OK;
    fa_ensure_init();
    const int nt = fa_team_size(total, FA_PARALLEL_MIN_ELEMENTS, FA_MIN_ELEMENTS_PER_THREAD);
    if (nt <= 1) {
        for (int64_t t = 0; t < job->count; t++)
            if (job->n[t] > 0)
                fa_run_piece(job, t, 0, job->n[t]);
        return FA_OK;
    }
#if defined(_OPENMP)
#  pragma omp parallel num_threads(nt)
    {
        const int parts = omp_get_num_threads(), k = omp_get_thread_num();
        int64_t t = 0, start = 0;
        const int64_t lo = fa_split_job(job, total, k, parts, &t, &start);
        int64_t t_end = t, start_end = start;
        const int64_t hi = fa_split_job(job, total, k + 1, parts, &t_end, &start_end);
        for (; t < job->count && start < hi; start += job->n[t], t++) {
            const int64_t a = lo > start ? lo - start : 0;
            const int64_t b = hi - start < job->n[t] ? hi - start : job->n[t];
            if (a < b)
                fa_run_piece(job, t, a, b);
        }
    }
#endif
    return FA_OK;
}

/* A job of one tensor over the caller's arguments: the tables are the
 * addresses of the pointer arguments themselves. */
#define FA_ONE_TENSOR_JOB(kind_, sc_, first_)                                               \
    {                                                                                       \
        .kind = (kind_), .count = 1,                                                        \
        .table = {&param, &grad, &exp_avg, &exp_avg_sq, &max_exp_avg_sq}, .n = &n,          \
        .scalars = (sc_), .scalar_index = NULL, .keys = NULL, .first_index = (first_),      \
    }

int fa_adam_f32(float *param, float *grad, float *exp_avg, float *exp_avg_sq,
                float *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc)
{
    if (sc == NULL)
        return FA_ERR_NULL;
    /* One read of the caller's struct: the checks and the step see the same flags. */
    const fa_adam_scalars sc_copy = *sc;
    const fa_job job = FA_ONE_TENSOR_JOB(FA_KIND_F32, &sc_copy, 0);
    return fa_run(&job, 1);
}

int fa_adam_f64(double *param, double *grad, double *exp_avg, double *exp_avg_sq,
                double *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc)
{
    if (sc == NULL)
        return FA_ERR_NULL;
    const fa_adam_scalars sc_copy = *sc;
    const fa_job job = FA_ONE_TENSOR_JOB(FA_KIND_F64, &sc_copy, 0);
    return fa_run(&job, 1);
}

int fa_adam_f32_bf16_at(float *param, float *grad, uint16_t *exp_avg, uint16_t *exp_avg_sq,
                        uint16_t *max_exp_avg_sq, int64_t n, int64_t first_index,
                        const fa_adam_scalars *sc)
{
    if (sc == NULL)
        return FA_ERR_NULL;
    const fa_adam_scalars sc_copy = *sc;
    const fa_job job = FA_ONE_TENSOR_JOB(FA_KIND_BF16, &sc_copy, first_index);
    return fa_run(&job, 1);
}

int fa_adam_f32_bf16(float *param, float *grad, uint16_t *exp_avg, uint16_t *exp_avg_sq,
                     uint16_t *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc)
{
    return fa_adam_f32_bf16_at(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, 0, sc);
}

int fa_adam_multi_f32(int64_t count, float *const *param, float *const *grad,
                      float *const *exp_avg, float *const *exp_avg_sq,
                      float *const *max_exp_avg_sq, const int64_t *n,
                      const fa_adam_scalars *scalars, int64_t n_scalars,
                      const int32_t *scalar_index)
{
    const fa_job job = {FA_KIND_F32, count, {param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq},
                        n, scalars, scalar_index, NULL, 0};
    return fa_run(&job, n_scalars);
}

int fa_adam_multi_f64(int64_t count, double *const *param, double *const *grad,
                      double *const *exp_avg, double *const *exp_avg_sq,
                      double *const *max_exp_avg_sq, const int64_t *n,
                      const fa_adam_scalars *scalars, int64_t n_scalars,
                      const int32_t *scalar_index)
{
    const fa_job job = {FA_KIND_F64, count, {param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq},
                        n, scalars, scalar_index, NULL, 0};
    return fa_run(&job, n_scalars);
}

int fa_adam_multi_f32_bf16(int64_t count, float *const *param, float *const *grad,
                           uint16_t *const *exp_avg, uint16_t *const *exp_avg_sq,
                           uint16_t *const *max_exp_avg_sq, const int64_t *n,
                           const fa_adam_scalars *scalars, int64_t n_scalars,
                           const int32_t *scalar_index, const uint32_t *rounding_keys)
{
    const fa_job job = {FA_KIND_BF16, count, {param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq},
                        n, scalars, scalar_index, rounding_keys, 0};
    return fa_run(&job, n_scalars);
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
    case FA_ERR_INDEX:
        return "a scalar_index entry is outside [0, n_scalars) (or n_scalars < 1)";
    case FA_ERR_UNSUPPORTED:
        return "an option the function does not support (amsgrad with 8-bit states)";
    default:
        return "unknown fastadam error code";
    }
}

#include "fastadam_q8.h" /* 8-bit block-wise states (issue 18) */
