/// A CUDA graph (pea_cuda_graph_*): the ops of one piece of work captured once from the stream, replayed with
/// one launch. It owns the device blocks its capture allocated (the library keeps them from other tensors while
/// it lives), and gives them back when it goes.
final class CUDAGraph {
    let context: CUDAContext
    let handle: OpaquePointer
    private let destroy: CUDALibrary.GraphDestroyFn

    init(context: CUDAContext, handle: OpaquePointer, destroy: @escaping CUDALibrary.GraphDestroyFn) {
        self.context = context
        self.handle = handle
        self.destroy = destroy
    }

    deinit { _ = destroy(context.handle, handle) }
}

extension CUDABackend {
    /// Whether the library captures and replays CUDA graphs (a library built before them does not).
    var supportsGraphs: Bool {
        ["pea_cuda_graph_begin", "pea_cuda_graph_end", "pea_cuda_graph_replay", "pea_cuda_graph_destroy"].allSatisfy(library.exports)
    }

    /// `body`'s ops captured into a graph instead of run: the tensors `body` returns are allocated but hold
    /// nothing until the graph is replayed, and every replay rewrites them from what body's input tensors hold
    /// then. `body` must not move data between host and device (an upload, a download or a synchronize fails the
    /// capture, as does any failed op): the capture then throws, naming the op, and nothing is kept.
    func captureGraph<T>(_ body: () throws -> T) throws -> (graph: CUDAGraph, result: T) {
        let begin = try kernel("pea_cuda_graph_begin", CUDALibrary.GraphBeginFn.self, "captureGraph")
        let end = try kernel("pea_cuda_graph_end", CUDALibrary.GraphEndFn.self, "captureGraph")
        let destroy = try kernel("pea_cuda_graph_destroy", CUDALibrary.GraphDestroyFn.self, "captureGraph")
        try check(begin(context.handle), "captureGraph")
        var handle: OpaquePointer?
        let result: T
        do {
            result = try body()
        } catch {
            _ = end(context.handle, &handle)  // ends the capture (it fails, naming body's failure); body's error wins
            throw error
        }
        try check(end(context.handle, &handle), "captureGraph")
        return (CUDAGraph(context: context, handle: handle!, destroy: destroy), result)
    }

    /// Queues one run of `graph` on the stream.
    func replay(_ graph: CUDAGraph) throws {
        let replay = try kernel("pea_cuda_graph_replay", CUDALibrary.GraphReplayFn.self, "replay")
        try check(replay(context.handle, graph.handle), "replay")
    }

    /// A new tensor holding a copy of x (a device-to-device copy on the stream).
    func duplicate(_ x: Tensor) throws -> Tensor {
        try own(x, "duplicate")
        let y = try empty(x.shape, x.dtype)
        try copyContiguous(x, into: y, "duplicate")
        return y
    }

    /// destination ← source, tensors of one shape and dtype.
    func copy(_ source: Tensor, into destination: Tensor) throws {
        try own(source, "copy")
        try own(destination, "copy")
        guard source.shape == destination.shape, source.dtype == destination.dtype else {
            throw PEAError.shapeMismatch("copy: \(source.dtype) \(source.shape) into \(destination.dtype) \(destination.shape)")
        }
        try copyContiguous(source, into: destination, "copy")
    }
}
