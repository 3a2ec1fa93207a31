#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A denoiser whose evaluations on the CUDA backend are replayed CUDA graphs (`--cuda-graphs on`): one graph per
/// key — the shapes and dtypes of the inputs, ControlNet residuals included — captured on the first evaluation
/// that sees the key and replayed by every later one. Per-step values (the latents, the timestep, the text states,
/// SDXL's added conditioning, ControlNet's residuals) are device tensors, so one graph serves every step: before a
/// replay each input is copied into the graph's own input tensor, and after it the output is copied out, so the
/// tensor handed back is the caller's (the next replay does not overwrite it).
///
/// The first evaluation of a key runs the denoiser eagerly on the graph's input tensors (its result is that
/// evaluation's answer, and it fills the allocator's cache with the blocks the capture then takes), then captures
/// the same evaluation. A capture that fails (the denoiser reads a value back to the host, say) leaves the key eager
/// for good, with one warning; the answers are the eager ones either way.
///
/// A graph keeps the device memory of one evaluation's activations while it lives (its blocks can serve nothing
/// else), so at most `capacity` graphs are kept: capturing one more first drops the least recently replayed.
/// A graph reads the weights the denoiser had when it was captured: they must not be replaced while it lives
/// (a pipeline's UNet never changes after loading; LoRAs are merged before).
public final class CUDAGraphedDenoiser: DenoisingModel {
    public let base: any DenoisingModel
    public let capacity: Int
    let backend: CUDABackend
    private let warn: (String) -> Void
    private let lock = PThreadLock()

    /// What one key holds: a graph with its input tensors and output, or nothing (eager, after a failed capture).
    private enum Entry {
        case graph(CUDAGraph, inputs: [Tensor?], output: Tensor, lastUse: Int)
        case eager
    }
    private struct Key: Hashable {
        let shapes: [[Int]]
        let dtypes: [DType?]
    }
    private var entries: [Key: Entry] = [:]
    private var counts = Counts()
    private var clock = 0 /* evaluations so far: the graphs' lastUse */

    /// Captures, replays and eager fallbacks so far (tests check a graph is captured once and replayed).
    public struct Counts: Equatable, Sendable {
        public var captures = 0, replays = 0, fallbacks = 0
    }
    public var statistics: Counts { lock.withLock { counts } }
    /// The graphs held (one per key that captured).
    public var graphCount: Int { lock.withLock { entries.values.filter { if case .graph = $0 { true } else { false } }.count } }

    /// `warn` gets the message of a capture that failed (default: stderr, as `pea: warning: …`).
    public init(_ base: any DenoisingModel, backend: CUDABackend, capacity: Int = 4,
                warn: @escaping (String) -> Void = { fputs("pea: warning: \($0)\n", stderr) }) {
        precondition(capacity >= 1, "CUDAGraphedDenoiser: capacity \(capacity)")
        self.base = base
        self.capacity = capacity
        self.backend = backend
        self.warn = warn
    }

    public var latentChannels: Int { base.latentChannels }
    public var sampleSize: Int? { base.sampleSize }
    public var contextDim: Int { base.contextDim }
    public var takesTextTime: Bool { base.takesTextTime }
    public var timestepConditionDim: Int? { base.timestepConditionDim }
    public var dtype: DType { base.dtype }

    public func callAsFunction(_ inputs: DenoisingInputs) throws -> Tensor {
        let tensors = Self.tensors(inputs)
        let key = Key(shapes: tensors.map { $0?.shape ?? [-1] }, dtypes: tensors.map { $0?.dtype })
        return try lock.withLock {
            clock += 1
            switch entries[key] {
            case .graph(let graph, let graphInputs, let output, _):
                for (source, destination) in zip(tensors, graphInputs) {
                    if let source, let destination { try backend.copy(source, into: destination) }
                }
                try backend.replay(graph)
                entries[key] = .graph(graph, inputs: graphInputs, output: output, lastUse: clock)
                counts.replays += 1
                return try backend.duplicate(output)
            case .eager:
                return try base(inputs)
            case nil:
                let graphInputs = try tensors.map { try $0.map(backend.duplicate) }
                let staged = Self.inputs(graphInputs, like: inputs)
                let answer = try base(staged)
                dropLeastRecentlyUsedGraph(keeping: capacity - 1)
                do {
                    let (graph, output) = try backend.captureGraph { try base(staged) }
                    entries[key] = .graph(graph, inputs: graphInputs, output: output, lastUse: clock)
                    counts.captures += 1
                } catch {
                    entries[key] = .eager
                    counts.fallbacks += 1
                    warn("cuda graphs: the denoiser's evaluation for inputs \(key.shapes) could not be captured (\(error)); "
                         + "it runs without a graph")
                }
                return answer
            }
        }
    }

    /// Drops the least recently used graphs until at most `count` are left (their memory goes back to the cache).
    private func dropLeastRecentlyUsedGraph(keeping count: Int) {
        var graphs = entries.compactMap { key, entry -> (Key, Int)? in
            if case .graph(_, _, _, let lastUse) = entry { (key, lastUse) } else { nil }
        }
        graphs.sort { $0.1 < $1.1 }
        for (key, _) in graphs.prefix(max(0, graphs.count - count)) { entries[key] = nil }
    }

    /// The input tensors in a fixed order: sample, timestep, text states, SDXL's pair, LCM's condition, then
    /// ControlNet's residuals (down…, mid) when present.
    private static func tensors(_ inputs: DenoisingInputs) -> [Tensor?] {
        var list: [Tensor?] = [inputs.sample, inputs.timestep, inputs.encoderHiddenStates, inputs.textEmbeds, inputs.timeIds,
                               inputs.timestepCondition]
        if let control = inputs.controlResiduals { list += control.down + [control.mid] }
        return list
    }

    /// `tensors` (as `tensors(_:)` orders them) as inputs of the same kind as `inputs`.
    private static func inputs(_ tensors: [Tensor?], like inputs: DenoisingInputs) -> DenoisingInputs {
        var staged = DenoisingInputs(sample: tensors[0]!, timestep: tensors[1]!, encoderHiddenStates: tensors[2]!,
                                     textEmbeds: tensors[3], timeIds: tensors[4], timestepCondition: tensors[5])
        if inputs.controlResiduals != nil {
            staged.controlResiduals = ControlResiduals(down: tensors[6..<tensors.count - 1].map { $0! }, mid: tensors.last!!)
        }
        return staged
    }
}
