/*
 * divider_rate.c - how often one core issues an IEEE float32 square root and
 * division, the two operations every Adam step needs per element (exactly
 * rounded, for bit-identity with torch's order of operations).
 *
 *     gcc -O1 -mavx2 bench/divider_rate.c -o /tmp/divider_rate && /tmp/divider_rate
 *     gcc -O1 -mavx512f -DZMM bench/divider_rate.c -o /tmp/divider_rate && /tmp/divider_rate
 *
 * Each loop issues four independent instructions (no result is read back), so
 * the time is the divider's issue rate, not its latency. Printed: ns per
 * instruction, and ns per element for one square root plus one division per
 * element, on one core. Compare with a step's ns per element per core: what
 * is left above the divider's share is the rest of the loop's work.
 */
#include <stdio.h>
#include <time.h>

#define ROUNDS 25000000L /* four instructions each */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ns per instruction of a loop body of four */
#define RATE(body, clobbers...)                                                              \
    ({                                                                                       \
        const double t0 = now();                                                             \
        for (long i = 0; i < ROUNDS; i++)                                                    \
            __asm__ volatile(body ::: clobbers);                                             \
        (now() - t0) / (4.0 * ROUNDS) * 1e9;                                                 \
    })

/* op1 four times on register 1 (and register 2, when op2 names it) into
 * registers 3-6 of width r ("ymm" or "zmm"); PAIR: two square roots, two
 * divisions */
#define FOUR(r, op1, op2)                                                                    \
    op1 " %%" r "1," op2 "%%" r "3\n\t" op1 " %%" r "1," op2 "%%" r "4\n\t"             \
    op1 " %%" r "1," op2 "%%" r "5\n\t" op1 " %%" r "1," op2 "%%" r "6"
#define PAIR(r)                                                                              \
    "vsqrtps %%" r "1,%%" r "3\n\tvdivps %%" r "1,%%" r "2,%%" r "4\n\t"                 \
    "vsqrtps %%" r "1,%%" r "5\n\tvdivps %%" r "1,%%" r "2,%%" r "6"

/* the rates at one width, printed */
#define REPORT(r, lanes)                                                                     \
    do {                                                                                     \
        const double div = RATE(FOUR(r, "vdivps", "%%" r "2,"), "xmm3", "xmm4", "xmm5", "xmm6"); \
        const double sqrt = RATE(FOUR(r, "vsqrtps", ""), "xmm3", "xmm4", "xmm5", "xmm6");    \
        const double pair = RATE(PAIR(r), "xmm3", "xmm4", "xmm5", "xmm6");                   \
        printf("%s (%d lanes): vdivps %.2f ns, vsqrtps %.2f ns, a pair %.2f ns: "            \
               "%.3f ns/element\n",                                                          \
               r, lanes, div, sqrt, 2 * pair, 2 * pair / lanes);                             \
    } while (0)

int main(void)
{
    /* normal operands (1.2345, 0.777): no fast path for zeros or subnormals */
    __asm__ volatile("movl $0x3f9e0419, %%eax\n\tvmovd %%eax, %%xmm1\n\t"
                     "vbroadcastss %%xmm1, %%ymm1\n\t"
                     "movl $0x3f46e979, %%eax\n\tvmovd %%eax, %%xmm2\n\t"
                     "vbroadcastss %%xmm2, %%ymm2" ::: "eax", "xmm1", "xmm2");
    REPORT("ymm", 8);
#ifdef ZMM
    __asm__ volatile("vbroadcastss %%xmm1, %%zmm1\n\tvbroadcastss %%xmm2, %%zmm2" ::
                         : "xmm1", "xmm2");
    REPORT("zmm", 16);
#endif
    return 0;
}
