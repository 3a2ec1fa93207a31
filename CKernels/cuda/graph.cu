/*
 * graph.cu — CUDA graphs: the ops of one piece of work (a UNet evaluation) captured once from the stream and
 * replayed, so a denoising step costs one cudaGraphLaunch of host time instead of hundreds of launches.
 *
 * pea_cuda_graph_begin puts the stream in capture (cudaStreamCaptureModeThreadLocal: the capturing thread
 * may make no call that could synchronise) and the allocator in capture mode (allocator.cu: the blocks the
 * capture allocates or frees become the graph's, from the cache only); pea_cuda_graph_end instantiates what
 * was captured. What else must hold inside a capture, and where it is made to:
 *   - cuBLAS allocates nothing: the context gives it a workspace at create (context.cu), cuBLASLt gets its
 *     own (gemm.cu), conv2d's im2col workspace is the context's and already grown by the eager run;
 *   - nothing waits for the device and no host data is captured: upload, download, synchronize and
 *     release_cache refuse (allocator.cu, context.cu), and the profile records no events (profile.cu);
 *   - the device-side error record: whether a captured kernel may write it is kept with the graph, and a
 *     replay marks it for checking at the next synchronising call, as the eager op would have.
 * No kernels.
 */
#include <stdio.h>

#include "internal.h"

struct pea_cuda_graph {
    cudaGraphExec_t exec;
    pea_graph_pool *pool;
    int checks_device_errors; /* a captured kernel may set the device error record */
    int saved_error_check;    /* ctx->error_check_pending before the capture (captured kernels do not run) */
    pea_cuda_graph *next;     /* ctx->graphs */
};

/* Removes graph from the context's list; false when it is not one of its graphs. */
static bool unlink_graph(pea_cuda_context *ctx, pea_cuda_graph *graph) {
    for (pea_cuda_graph **g = &ctx->graphs; *g; g = &(*g)->next)
        if (*g == graph) {
            *g = graph->next;
            return true;
        }
    return false;
}

static bool is_graph_of(pea_cuda_context *ctx, pea_cuda_graph *graph) {
    for (pea_cuda_graph *g = ctx->graphs; g; g = g->next)
        if (g == graph) return true;
    return false;
}

extern "C" int pea_cuda_graph_begin(pea_cuda_context *ctx) {
    static const char *op = "graph_begin";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE(ctx, op, !ctx->capture, "a capture is already running (call pea_cuda_graph_end first)");
    pea_cuda_graph *g = new pea_cuda_graph();
    cudaError_t e = cudaStreamBeginCapture(ctx->stream, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
        delete g;
        return pea_check_cuda(ctx, op, e, "cudaStreamBeginCapture");
    }
    g->saved_error_check = ctx->error_check_pending;
    ctx->error_check_pending = 0;
    g->pool = pea_allocator_capture_begin(ctx);
    ctx->capture_failure[0] = 0;
    ctx->capture = g;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_graph_end(pea_cuda_context *ctx, pea_cuda_graph **graph) {
    static const char *op = "graph_end";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE(ctx, op, graph != NULL, "graph is NULL");
    *graph = NULL;
    PEA_REQUIRE(ctx, op, ctx->capture, "no capture is running (call pea_cuda_graph_begin first)");
    pea_cuda_graph *g = ctx->capture;
    ctx->capture = NULL;
    pea_allocator_capture_end(ctx);
    g->checks_device_errors = ctx->error_check_pending;
    ctx->error_check_pending = g->saved_error_check;
    cudaGraph_t captured = NULL;
    cudaError_t e = cudaStreamEndCapture(ctx->stream, &captured);
    if (e == cudaSuccess && !ctx->capture_failure[0]) e = cudaGraphInstantiateWithFlags(&g->exec, captured, 0);
    if (captured) cudaGraphDestroy(captured); /* the exec keeps what it needs */
    if (e != cudaSuccess || ctx->capture_failure[0]) {
        cudaGetLastError();
        pea_allocator_pool_release(ctx, g->pool);
        delete g;
        if (ctx->capture_failure[0]) {
            char why[sizeof ctx->capture_failure];
            snprintf(why, sizeof why, "%s", ctx->capture_failure);
            return pea_fail(ctx, PEA_CUDA_ERROR_KERNEL, op, "the capture failed: %s", why);
        }
        return pea_check_cuda(ctx, op, e, "ending the capture (cudaStreamEndCapture, cudaGraphInstantiate)");
    }
    g->next = ctx->graphs;
    ctx->graphs = g;
    *graph = g;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_graph_replay(pea_cuda_context *ctx, pea_cuda_graph *graph) {
    static const char *op = "graph_replay";
    PEA_OP(ctx, op);
    PEA_REQUIRE(ctx, op, is_graph_of(ctx, graph), "%p is not a live graph of this context", (void *)graph);
    PEA_REQUIRE(ctx, op, !ctx->capture, "during a capture");
    PEA_TRY(pea_check_cuda(ctx, op, cudaGraphLaunch(graph->exec, ctx->stream), "cudaGraphLaunch"));
    if (graph->checks_device_errors) ctx->error_check_pending = 1;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_graph_destroy(pea_cuda_context *ctx, pea_cuda_graph *graph) {
    static const char *op = "graph_destroy";
    if (!ctx) return PEA_CUDA_ERROR_INVALID;
    if (!graph) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, unlink_graph(ctx, graph), "%p is not a live graph of this context", (void *)graph);
    cudaGraphExecDestroy(graph->exec);
    cudaGetLastError();
    pea_allocator_pool_release(ctx, graph->pool);
    delete graph;
    return PEA_CUDA_OK;
}

void pea_graphs_destroy(pea_cuda_context *ctx) {
    if (ctx->capture) { /* a capture left running: end it, keep nothing */
        pea_cuda_graph *g = NULL;
        if (pea_cuda_graph_end(ctx, &g) == PEA_CUDA_OK) pea_cuda_graph_destroy(ctx, g);
    }
    while (ctx->graphs) pea_cuda_graph_destroy(ctx, ctx->graphs);
}
