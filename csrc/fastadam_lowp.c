/*
 * fastadam_lowp.c - the low-precision entry point (fastadam_lowp.h): checks,
 * then one OpenMP region over the concatenation of the tensors, each thread
 * running the kernel of fa_isa()'s variant (fastadam_lowp_kernel.h) on its
 * share. Elements are independent and the random bits depend on the element's
 * index in its tensor only, so the results do not depend on the split.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#if defined(_OPENMP)
#  include <omp.h>
#endif

#include "fastadam.h"
#include "fastadam_lowp.h"
#include "fastadam_lowp_internal.h"

#define FA_LP_PARALLEL_MIN 65536
#define FA_LP_MIN_PER_THREAD 32768
#define FA_LP_GRAIN 64 /* shares start at multiples of 64 elements of a tensor */

static pthread_once_t g_lp_once = PTHREAD_ONCE_INIT;
static const fa_lowp_table *g_lp_table;
static atomic_int g_lp_forked; /* libgomp's pool does not survive fork: one thread there */

static void fa_lp_atfork_child(void)
{
    atomic_store_explicit(&g_lp_forked, 1, memory_order_relaxed);
}

static void fa_lp_init(void)
{
    const char *isa = fa_isa(); /* the dispatcher's choice, FASTADAM_ISA included */
    g_lp_table = &fa_lowp_kernels_baseline;
#ifdef FA_HAVE_AVX512
    if (strcmp(isa, "avx512") == 0)
        g_lp_table = &fa_lowp_kernels_avx512;
#endif
#ifdef FA_HAVE_AVX2
    if (strcmp(isa, "avx2") == 0)
        g_lp_table = &fa_lowp_kernels_avx2;
#endif
    (void)isa;
    pthread_atfork(NULL, NULL, fa_lp_atfork_child);
}

/* element sizes of param, grad, moments, copy by kind */
static const size_t FA_LP_ELSIZE[FA_LOWP_N_KINDS][4] = {
    {2, 2, 2, 0}, {2, 2, 2, 0}, {4, 4, 4, 2}, {4, 2, 4, 2}, {4, 4, 4, 2}, {4, 2, 4, 2},
    {2, 2, 4, 0}, {2, 2, 4, 0}, {2, 2, 2, 0},
};

/* whether a kind has a copy (the master kinds) */
static int fa_lp_has_copy(int kind)
{
    return kind >= FA_LOWP_MASTER_BF16 && kind <= FA_LOWP_MASTER_F16_G;
}

typedef struct fa_lp_job {
    int kind, rounding;
    int64_t count;
    void *const *table[6];
    const int64_t *n;
    const fa_adam_scalars *scalars;
    const int32_t *scalar_index;
    const uint32_t *keys;
} fa_lp_job;

static const fa_adam_scalars *fa_lp_scalars_of(const fa_lp_job *job, int64_t t)
{
    return &job->scalars[job->scalar_index != NULL ? job->scalar_index[t] : 0];
}

static int fa_lp_overlap(const void *a, uintptr_t abytes, const void *b, uintptr_t bbytes)
{
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + bbytes && y < x + abytes;
}

static int fa_lp_check(const fa_lp_job *job, int64_t n_scalars, int64_t *total)
{
    if (job->count < 0)
        return FA_ERR_SIZE;
    for (int r = 0; r < 4; r++)
        if (job->table[r] == NULL)
            return FA_ERR_NULL;
    if (job->n == NULL || (fa_lp_has_copy(job->kind) && job->table[5] == NULL))
        return FA_ERR_NULL;
    *total = 0;
    if (job->count == 0)
        return FA_OK;
    if (job->scalars == NULL)
        return FA_ERR_NULL;
    for (int64_t t = 0; t < job->count; t++) {
        const int64_t k = job->scalar_index != NULL ? job->scalar_index[t] : 0;
        if (k < 0 || k >= n_scalars)
            return FA_ERR_INDEX;
    }
    int64_t sum = 0;
    const int copy = fa_lp_has_copy(job->kind);
    for (int64_t t = 0; t < job->count; t++) {
        const fa_adam_scalars *sc = fa_lp_scalars_of(job, t);
        const int64_t n = job->n[t];
        if (n < 0 || (uint64_t)n > (uint64_t)(PTRDIFF_MAX / 4) || n > INT64_MAX - sum)
            return FA_ERR_SIZE;
        if (sc->state_rounding != FA_STATE_SAME_DTYPE)
            return FA_ERR_ROUNDING;
        const void *arr[6];
        size_t size[6];
        int count = 0;
        for (int r = 0; r < 6; r++) {
            if (r == 4 && !sc->amsgrad)
                continue;
            if (r == 5 && !copy)
                continue;
            if (r == 4 && job->table[4] == NULL)
                return FA_ERR_AMSGRAD;
            arr[count] = job->table[r][t];
            if (arr[count] == NULL)
                return r == 4 ? FA_ERR_AMSGRAD : FA_ERR_NULL;
            size[count] = FA_LP_ELSIZE[job->kind][r < 2 ? r : r == 5 ? 3 : 2];
            count++;
        }
        if (n > 0)
            for (int i = 0; i < count; i++)
                for (int j = i + 1; j < count; j++)
                    if (fa_lp_overlap(arr[i], (uintptr_t)n * size[i], arr[j],
                                      (uintptr_t)n * size[j]))
                        return FA_ERR_OVERLAP;
        sum += n;
    }
    *total = sum;
    return FA_OK;
}

static void fa_lp_piece_run(const fa_lp_job *job, int64_t t, int64_t lo, int64_t hi)
{
    const fa_adam_scalars *sc = fa_lp_scalars_of(job, t);
    const fa_scalars_f32 s = FA_ROUND_SCALARS(float, sc);
    const int flags = (sc->weight_decay != 0.0 ? FA_F_L2 : 0) | (sc->amsgrad ? FA_F_AMSGRAD : 0) |
                      (sc->unscale ? FA_F_UNSCALE : 0) | (sc->maximize ? FA_F_MAXIMIZE : 0);
    const size_t *es = FA_LP_ELSIZE[job->kind];
#define FA_LP_AT(r, e) \
    ((job->table[r] != NULL && job->table[r][t] != NULL) ? (void *)((char *)job->table[r][t] + (size_t)lo * (e)) : NULL)
    fa_lowp_piece pc = {
        FA_LP_AT(0, es[0]), FA_LP_AT(1, es[1]), FA_LP_AT(2, es[2]), FA_LP_AT(3, es[2]),
        sc->amsgrad ? FA_LP_AT(4, es[2]) : NULL,
        fa_lp_has_copy(job->kind) ? FA_LP_AT(5, es[3]) : NULL,
        hi - lo, lo, job->keys != NULL ? job->keys[t] : sc->rounding_key,
    };
#undef FA_LP_AT
    g_lp_table->k[job->kind][job->rounding](&pc, &s, flags);
}

#if defined(_OPENMP)
/* Start of share k of parts of [0, total): the even point, moved down to a
 * multiple of FA_LP_GRAIN elements of the tensor it falls in. Monotone in k. */
static int64_t fa_lp_split(const fa_lp_job *job, int64_t total, int k, int parts)
{
    if (k <= 0)
        return 0;
    if (k >= parts)
        return total;
    const int64_t s = (total / parts) * k + (total % parts) * k / parts;
    int64_t start = 0, t = 0;
    while (start + job->n[t] <= s)
        start += job->n[t++];
    return start + (s - start) / FA_LP_GRAIN * FA_LP_GRAIN;
}
#endif

int fa_adam_lowp_multi(int kind, int param_rounding, int64_t count, void *const *param,
                       void *const *grad, void *const *exp_avg, void *const *exp_avg_sq,
                       void *const *max_exp_avg_sq, void *const *copy, const int64_t *n,
                       const fa_adam_scalars *scalars, int64_t n_scalars,
                       const int32_t *scalar_index, const uint32_t *rounding_keys)
{
    if (kind < 0 || kind >= FA_LOWP_N_KINDS)
        return FA_ERR_ROUNDING;
    if (param_rounding & ~(FA_LOWP_STOCHASTIC | FA_LOWP_STOCHASTIC_STATE))
        return FA_ERR_ROUNDING;
    pthread_once(&g_lp_once, fa_lp_init);
    if (g_lp_table->k[kind][param_rounding] == NULL)
        return FA_ERR_ROUNDING;
    const fa_lp_job job = {kind, param_rounding, count,
                           {param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, copy},
                           n, scalars, scalar_index, rounding_keys};
    int64_t total;
    const int rc = fa_lp_check(&job, n_scalars, &total);
    if (rc != FA_OK || total == 0)
        return rc;
    int nt = 1;
#if defined(_OPENMP)
    if (total >= FA_LP_PARALLEL_MIN && !atomic_load_explicit(&g_lp_forked, memory_order_relaxed)) {
        int64_t want = fa_get_num_threads();
        if (want > total / FA_LP_MIN_PER_THREAD)
            want = total / FA_LP_MIN_PER_THREAD;
        nt = want < 1 ? 1 : (int)want;
    }
#endif
    if (nt <= 1) {
        for (int64_t t = 0; t < count; t++)
            if (n[t] > 0)
                fa_lp_piece_run(&job, t, 0, n[t]);
        return FA_OK;
    }
#if defined(_OPENMP)
#  pragma omp parallel num_threads(nt)
    {
        const int parts = omp_get_num_threads(), k = omp_get_thread_num();
        const int64_t lo = fa_lp_split(&job, total, k, parts);
        const int64_t hi = fa_lp_split(&job, total, k + 1, parts);
        int64_t start = 0;
        for (int64_t t = 0; t < count && start < hi; start += n[t], t++) {
            const int64_t a = lo > start ? lo - start : 0;
            const int64_t b = hi - start < n[t] ? hi - start : n[t];
            if (a < b)
                fa_lp_piece_run(&job, t, a, b);
        }
    }
#endif
    return FA_OK;
}
