/*
 * profile.cu — the per-op profile (pea_cuda_profile_start / _stop): where an evaluation's GPU time goes.
 *
 * While a profile runs, PEA_OP brackets each op call with two events recorded on the stream, before and after
 * the work the call queues; the GPU time between them is that call's time, whatever the host did meanwhile.
 * Pairs go into a ring; when it is full the host waits for the last pair and folds the ring into per-op totals
 * (a wait every PEA_PROFILE_PAIRS calls: a profile run is slightly slower than a plain one, the per-op times
 * are not affected). One more event marks the first call's start; with the last call's end it gives the span,
 * and the span minus the summed calls is the time the GPU sat idle waiting for the host to queue work.
 *
 * Events are created on the first profile and kept for the context's life. No kernels.
 */
#include "internal.h"

#include <string.h>

#include <algorithm>

enum { PEA_PROFILE_PAIRS = 1024, PEA_PROFILE_OPS = 64 };

struct pea_profile {
    cudaEvent_t start[PEA_PROFILE_PAIRS], end[PEA_PROFILE_PAIRS];
    const char *pending_op[PEA_PROFILE_PAIRS];
    bool running;        /* between pea_cuda_profile_start and _stop */
    int pending;         /* recorded pairs not yet folded */
    int depth;           /* nesting of op calls: only the outermost is recorded */
    cudaEvent_t first;   /* the first call's start (the last call's end is end[pending − 1]) */
    bool any;            /* first is recorded */
    pea_cuda_profile_entry totals[PEA_PROFILE_OPS];
    int ops;             /* distinct op names in totals */
    uint64_t dropped;    /* calls of ops beyond PEA_PROFILE_OPS names (never with today's ~40 ops) */
    cudaError_t error;   /* the first failed event call; reported by pea_cuda_profile_stop */
};

static void profile_note(pea_profile *p, cudaError_t e) {
    if (e != cudaSuccess && p->error == cudaSuccess) p->error = e;
}

/* Waits for the pending pairs and adds each one's time to its op's total. */
static void profile_fold(pea_profile *p) {
    if (p->pending == 0) return;
    profile_note(p, cudaEventSynchronize(p->end[p->pending - 1]));
    for (int i = 0; i < p->pending; i++) {
        float ms = 0.0f;
        profile_note(p, cudaEventElapsedTime(&ms, p->start[i], p->end[i]));
        const char *op = p->pending_op[i];
        int k = 0;
        while (k < p->ops && strcmp(p->totals[k].op, op) != 0) k++;
        if (k == p->ops) {
            if (p->ops == PEA_PROFILE_OPS) {
                p->dropped++;
                continue;
            }
            p->totals[p->ops++] = pea_cuda_profile_entry{op, 0, 0.0};
        }
        p->totals[k].calls++;
        p->totals[k].ms += ms;
    }
    p->pending = 0;
}

void pea_profile_begin(pea_cuda_context *ctx, const char *op) {
    pea_profile *p = ctx->profile;
    if (p->pending == PEA_PROFILE_PAIRS) profile_fold(p);
    if (!p->any) {
        profile_note(p, cudaEventRecord(p->first, ctx->stream));
        p->any = true;
    }
    p->pending_op[p->pending] = op;
    profile_note(p, cudaEventRecord(p->start[p->pending], ctx->stream));
}

void pea_profile_end(pea_cuda_context *ctx) {
    pea_profile *p = ctx->profile;
    profile_note(p, cudaEventRecord(p->end[p->pending], ctx->stream));
    p->pending++;
}

/* Ops queued during a CUDA graph capture are not timed (their work runs at replays, timed as one call). */
pea_op_scope::pea_op_scope(pea_cuda_context *c, const char *op)
    : ctx(c->profile && c->profile->running && !c->capture ? c : nullptr) {
    if (ctx && ctx->profile->depth++ == 0) pea_profile_begin(ctx, op);
}

pea_op_scope::~pea_op_scope() {
    if (ctx && --ctx->profile->depth == 0) pea_profile_end(ctx);
}

/* The events, created by the first pea_cuda_profile_start and kept for later ones. */
static pea_profile *profile_create(pea_cuda_context *ctx, const char *op, int *rc) {
    pea_profile *p = new pea_profile();
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < PEA_PROFILE_PAIRS && e == cudaSuccess; i++) {
        e = cudaEventCreate(&p->start[i]);
        if (e == cudaSuccess) e = cudaEventCreate(&p->end[i]);
    }
    if (e == cudaSuccess) e = cudaEventCreate(&p->first);
    if (e != cudaSuccess) {
        ctx->profile = p;
        pea_profile_destroy(ctx);
        *rc = pea_check_cuda(ctx, op, e, "cudaEventCreate");
        return nullptr;
    }
    *rc = PEA_CUDA_OK;
    return p;
}

void pea_profile_destroy(pea_cuda_context *ctx) {
    pea_profile *p = ctx->profile;
    if (!p) return;
    for (int i = 0; i < PEA_PROFILE_PAIRS; i++) {
        if (p->start[i]) cudaEventDestroy(p->start[i]);
        if (p->end[i]) cudaEventDestroy(p->end[i]);
    }
    if (p->first) cudaEventDestroy(p->first);
    delete p;
    ctx->profile = nullptr;
}

extern "C" int pea_cuda_profile_start(pea_cuda_context *ctx) {
    static const char *op = "profile_start";
    PEA_BEGIN(ctx, op);
    if (!ctx->profile) {
        int rc;
        pea_profile *p = profile_create(ctx, op, &rc);
        if (!p) return rc;
        ctx->profile = p;
    }
    pea_profile *p = ctx->profile;
    PEA_REQUIRE(ctx, op, p->depth == 0, "called inside an op");
    PEA_REQUIRE(ctx, op, !ctx->capture, "during CUDA graph capture (a capture cannot wait for the device)");
    profile_fold(p); /* a restart: the old pairs must be done before their events are reused */
    p->running = true;
    p->pending = 0;
    p->any = false;
    p->ops = 0;
    p->dropped = 0;
    p->error = cudaSuccess;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_profile_stop(pea_cuda_context *ctx, pea_cuda_profile_entry *entries, int capacity,
                                     int *count, double *span_ms) {
    static const char *op = "profile_stop";
    PEA_BEGIN(ctx, op);
    pea_profile *p = ctx->profile;
    PEA_REQUIRE(ctx, op, p && p->running, "no profile is running (call pea_cuda_profile_start first)");
    PEA_REQUIRE(ctx, op, !ctx->capture, "during CUDA graph capture (a capture cannot wait for the device)");
    PEA_REQUIRE(ctx, op, count && span_ms && capacity >= 0 && (entries || capacity == 0),
                "count or span_ms is NULL, or entries is NULL with capacity %d", capacity);
    /* a recorded call always leaves a pair pending (the ring is folded when a call begins, not when it ends),
     * and folding leaves the events as they are: end[last] is the last call's end */
    const int last = p->pending - 1;
    profile_fold(p);
    p->running = false;
    float span = 0.0f;
    if (p->any && last >= 0) profile_note(p, cudaEventElapsedTime(&span, p->first, p->end[last]));
    if (p->error != cudaSuccess) {
        cudaGetLastError();
        return pea_check_cuda(ctx, op, p->error, "recording the profile's events (a queued kernel failed?)");
    }
    PEA_REQUIRE(ctx, op, p->dropped == 0, "%llu calls of ops beyond the first %d names were not counted",
                (unsigned long long)p->dropped, (int)PEA_PROFILE_OPS);
    std::sort(p->totals, p->totals + p->ops,
              [](const pea_cuda_profile_entry &a, const pea_cuda_profile_entry &b) { return a.ms > b.ms; });
    for (int i = 0; i < p->ops && i < capacity; i++) entries[i] = p->totals[i];
    *count = p->ops;
    *span_ms = span;
    return PEA_CUDA_OK;
}
