#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels

/// One pea_cuda context: a device, its stream, its cuBLAS handle and its caching allocator. Storages hold a
/// strong reference to it, so the context outlives every tensor allocated from it.
final class CUDAContext {
    let library: CUDALibrary
    let handle: OpaquePointer
    let device: Int

    init(library: CUDALibrary, device: Int) throws {
        var context: OpaquePointer?
        var message = [CChar](repeating: 0, count: 1024)
        let status = library.create(Int32(truncatingIfNeeded: device), &context, &message, message.count)
        guard status == PEA_CUDA_OK, let context else {
            let reason = String(cString: message)
            throw PEAError.backend("cuda: device \(device) is not usable (\(library.path)): "
                                   + (reason.isEmpty ? "pea_cuda_create returned \(CUDABackend.codeName(status))" : reason),
                                   kind: .unavailable)
        }
        self.library = library
        self.handle = context
        self.device = device
    }

    deinit { library.destroy(handle) }
}

/// Device memory from the context's caching allocator, returned to it (not to the driver) when the last
/// tensor using it goes away. Empty tensors have no memory (a nil pointer).
final class CUDAStorage: TensorStorage {
    let context: CUDAContext
    let pointer: UnsafeMutableRawPointer?
    let byteCount: Int

    init(context: CUDAContext, byteCount: Int) throws {
        self.context = context
        self.byteCount = byteCount
        guard byteCount > 0 else { pointer = nil; return }
        var memory: UnsafeMutableRawPointer?
        let status = context.library.alloc(context.handle, byteCount, &memory)
        guard status == PEA_CUDA_OK, let memory else {
            let message = context.library.message(context.handle)
            throw PEAError.backend("cuda: cannot allocate \(byteCount) bytes on device \(context.device)"
                                   + (message.isEmpty ? " (\(CUDABackend.codeName(status)))" : ": \(message)"),
                                   kind: CUDABackend.failureKind(status))
        }
        pointer = memory
    }

    deinit {
        if let pointer { _ = context.library.free(context.handle, pointer) }
    }
}

/// The caching allocator's counters (pea_cuda_memory_stats).
public struct CUDAMemoryStats: Equatable, Sendable {
    /// Bytes handed out to live tensors (and the library's own workspaces) now.
    public var bytesInUse: Int
    /// The most bytes ever handed out at once.
    public var peakBytes: Int
    /// cudaMalloc calls so far: constant in steady state, when every block comes from the cache.
    public var deviceAllocations: UInt64
}

/// Where a piece of work spent its GPU time, per op (`CUDABackend.profiled`).
public struct CUDAProfile {
    public struct Op {
        /// The op's name in the CUDA library ("conv2d", "attention", "linear", …).
        public let name: String
        public let calls: Int
        /// GPU milliseconds summed over the calls.
        public let milliseconds: Double
    }
    /// Largest time first.
    public let ops: [Op]
    /// GPU time from the first op call's start to the last one's end: the ops' time plus the time the GPU
    /// waited for the host to queue more work.
    public let spanMilliseconds: Double
    /// cudaMalloc calls the caching allocator made during the run (0 in a steady state).
    public let deviceAllocations: Int

    public var opMilliseconds: Double { ops.reduce(0) { $0 + $1.milliseconds } }
    /// The part of the span in which the GPU ran no op (waiting for the host).
    public var idleMilliseconds: Double { max(0, spanMilliseconds - opMilliseconds) }
}

/// Why the CUDA backend cannot be used (`CUDABackend.availability`).
public struct CUDAUnavailable: Error, CustomStringConvertible, Sendable {
    public enum Reason: Sendable { case noLibrary, unusableLibrary, incompleteLibrary, noDevice }
    public let reason: Reason
    public let message: String
    /// Whether a user could have expected CUDA here: a library was found, or PEA_CUDA_LIB names one.
    /// `--backend auto` mentions its fallback to the CPU only then.
    public let userExpectsCUDA: Bool
    public var description: String { message }
}

/// The GPU backend: every op is one call into the pea_cuda library (hand-written CUDA kernels, GEMMs through
/// cuBLAS) on the context's stream, running the plan `ShapeRules` makes for it exactly as `CPUBackend` runs
/// it, so both backends accept the same arguments and fail with the same messages; the function it calls
/// is its op registry row's.
///
/// Float tensors may be f32, f16 or bf16 (storage; arithmetic accumulates in f32): an op computes in the
/// dtype of its float inputs, which must all agree, and returns that dtype (`timestepEmbedding` always
/// returns f32, as the protocol says). Ids are i32 or i64. Ops are queued, not waited for: `download` and
/// `synchronize` are the only calls that wait for the device, so a kernel failure detected on the device
/// (an id outside the vocabulary, say) is reported by the next of those. Every library failure becomes
/// `PEAError.backend` with the library's message, prefixed by the op, and its kind (out of memory, invalid
/// argument, launch failure) from the status code.
public final class CUDABackend: ComputeBackend, StridedCopying, CustomStringConvertible {
    public let name = "cuda"
    public let library: CUDALibrary
    public let device: Int
    /// The device's name, compute capability and memory as the driver reports them (empty/0 when the
    /// library cannot say).
    public let deviceName: String
    public let computeCapability: (major: Int, minor: Int)
    public let totalMemory: Int

    let context: CUDAContext
    /// Each op's function from the library, resolved once (ops are called thousands of times per image).
    private let opKernels: [Op: UnsafeMutableRawPointer]
    /// pea_cuda_zero, resolved once like the ops' functions (zeros are made on every backward pass); nil in a
    /// library built before it existed.
    private let zeroFunction: CUDALibrary.ZeroFn?
    /// pea_cuda_attention_backward, resolved once; nil in a library built before it existed (the backward then
    /// falls back to the composed one). Not an op of the registry: every backend has `attentionBackward`
    /// (composed of registry ops by default); this is the CUDA backend's faster way to run it.
    let attentionBackwardFunction: CUDALibrary.AttentionBackwardFn?

    /// Opens `device` through `library` (default: the library `CUDALibrary.locate()` finds). Throws
    /// `PEAError.backend` saying where the library was looked for, what is wrong with it, or why the device
    /// cannot be opened (no driver, no device: the library's message).
    public init(library: CUDALibrary? = nil, device: Int = 0) throws {
        let library = try library ?? CUDALibrary()
        self.library = library
        self.device = device
        context = try CUDAContext(library: library, device: device)
        zeroFunction = library.function("pea_cuda_zero", as: CUDALibrary.ZeroFn.self)
        attentionBackwardFunction = library.function("pea_cuda_attention_backward", as: CUDALibrary.AttentionBackwardFn.self)
        opKernels = Dictionary(uniqueKeysWithValues: Op.allCases.compactMap { op in
            library.address(op.info.cudaFunctions[0]).map { (op, $0) }
        })
        var name = [CChar](repeating: 0, count: 256)
        var major: Int32 = 0, minor: Int32 = 0
        var memory = 0
        if let info = library.function("pea_cuda_device_info", as: CUDALibrary.DeviceInfoFn.self),
           info(context.handle, &name, name.count, &major, &minor, &memory) == PEA_CUDA_OK {
            deviceName = String(cString: name)
            computeCapability = (Int(major), Int(minor))
            totalMemory = memory
        } else {
            deviceName = ""
            computeCapability = (0, 0)
            totalMemory = 0
        }
    }

    public var deviceMemoryBytes: Double? { totalMemory > 0 ? Double(totalMemory) : nil }

    public var description: String {
        "cuda device \(device) (\(deviceName.isEmpty ? "unknown" : deviceName), sm_\(computeCapability.major)\(computeCapability.minor)) via \(library.path)"
    }

    /// The probe behind `--backend auto`: a backend on `device` when a complete library loads and a device
    /// opens, else why not. A library that lacks some ops counts as unavailable here (auto must not pick a
    /// backend that fails half-way through a model); `--backend cuda` still uses it.
    public static func availability(device: Int = 0) -> Result<CUDABackend, CUDAUnavailable> {
        let explicit = CUDALibrary.environmentLibrary != nil
        let path: String
        switch CUDALibrary.locate() {
        case .found(let found): path = found
        case .notFound(let message): return .failure(CUDAUnavailable(reason: .noLibrary, message: message, userExpectsCUDA: explicit))
        }
        let library: CUDALibrary
        do { library = try CUDALibrary(path: path) } catch {
            return .failure(CUDAUnavailable(reason: .unusableLibrary, message: "\(error)", userExpectsCUDA: true))
        }
        guard library.isComplete else {
            return .failure(CUDAUnavailable(
                reason: .incompleteLibrary,
                message: "cuda: \(library.path) lacks \(library.missingSymbols.joined(separator: ", ")); rebuild it (make cuda)",
                userExpectsCUDA: true))
        }
        do { return .success(try CUDABackend(library: library, device: device)) } catch {
            return .failure(CUDAUnavailable(reason: .noDevice, message: "\(error)", userExpectsCUDA: true))
        }
    }

    // MARK: memory

    public func upload(_ host: HostTensor) throws -> Tensor {
        let tensor = try empty(host.shape, host.dtype)
        guard tensor.byteCount > 0 else { return tensor }
        let status = host.bytes.withUnsafeBytes { library.upload(context.handle, pointer(tensor), $0.baseAddress, tensor.byteCount) }
        try check(status, "upload")
        return tensor
    }

    /// Straight from the caller's bytes (the library stages them), without a HostTensor copy.
    public func upload(bytes: UnsafeRawBufferPointer, shape: [Int], dtype: DType) throws -> Tensor {
        guard bytes.count == shape.reduce(1, *) * dtype.byteSize else {
            throw PEAError.shapeMismatch("upload: \(bytes.count) bytes for \(dtype) \(shape)")
        }
        let tensor = try empty(shape, dtype)
        guard tensor.byteCount > 0 else { return tensor }
        try check(library.upload(context.handle, pointer(tensor), bytes.baseAddress, tensor.byteCount), "upload")
        return tensor
    }

    public func download(_ tensor: Tensor) throws -> HostTensor {
        try own(tensor, "download")
        var bytes = [UInt8](repeating: 0, count: tensor.byteCount)
        if tensor.byteCount > 0 {
            let status = bytes.withUnsafeMutableBytes { library.download(context.handle, $0.baseAddress, pointer(tensor), tensor.byteCount) }
            try check(status, "download")
        }
        return HostTensor(shape: tensor.shape, dtype: tensor.dtype, bytes: bytes)
    }

    /// f32 tensors straight into the array (no byte buffer, no conversion pass).
    public func downloadFloats(_ tensor: Tensor) throws -> [Float] {
        guard tensor.dtype == .f32, tensor.count > 0 else { return try download(tensor).floats() }
        try own(tensor, "download")
        var status = Int32(PEA_CUDA_OK)
        let values = [Float](unsafeUninitializedCapacity: tensor.count) { buffer, initialized in
            status = library.download(context.handle, buffer.baseAddress, pointer(tensor), tensor.byteCount)
            if status != Int32(PEA_CUDA_OK) { buffer.initialize(repeating: 0) }
            initialized = tensor.count
        }
        try check(status, "download")
        return values
    }

    public func zeros(_ shape: [Int], dtype: DType) throws -> Tensor {
        let tensor = try empty(shape, dtype)
        guard tensor.byteCount > 0 else { return tensor }
        if let zero = zeroFunction {
            try check(zero(context.handle, pointer(tensor), tensor.byteCount), "zeros")
        } else {
            let bytes = [UInt8](repeating: 0, count: tensor.byteCount)
            try check(bytes.withUnsafeBytes { library.upload(context.handle, pointer(tensor), $0.baseAddress, $0.count) }, "zeros")
        }
        return tensor
    }

    public func synchronize() throws {
        try check(library.synchronize(context.handle), "synchronize")
    }

    /// The caching allocator's counters.
    public func memoryStats() throws -> CUDAMemoryStats {
        let stats = try kernel("pea_cuda_memory_stats", CUDALibrary.MemoryStatsFn.self, "memoryStats")
        var inUse = 0, peak = 0
        var allocations: UInt64 = 0
        try check(stats(context.handle, &inUse, &peak, &allocations), "memoryStats")
        return CUDAMemoryStats(bytesInUse: inUse, peakBytes: peak, deviceAllocations: allocations)
    }

    /// Returns every cached (free) block to the driver.
    public func releaseCache() throws {
        let release = try kernel("pea_cuda_release_cache", CUDALibrary.ReleaseCacheFn.self, "releaseCache")
        try check(release(context.handle), "releaseCache")
    }

    /// TF32 tensor cores for f32 GEMMs (off by default: f32 GEMMs are exact f32).
    public func setTF32(_ enabled: Bool) throws {
        let set = try kernel("pea_cuda_set_tf32", CUDALibrary.SetTF32Fn.self, "setTF32")
        try check(set(context.handle, enabled ? 1 : 0), "setTF32")
    }

    // MARK: device timing (benchmarks)

    /// GPU milliseconds per run of `body`, timed on the device: a spin kernel holds the stream for
    /// `gateMicroseconds` while the host queues an event, `launches` calls of `body` and a second event, so the
    /// queued runs execute back to back however slowly the host enqueues them; the result is the time between
    /// the two events divided by `launches`. `gateMicroseconds` must cover the host's time to queue the runs.
    public func deviceTimedMilliseconds(launches: Int, gateMicroseconds: Double, _ body: () throws -> Void) throws -> Double {
        let record = try kernel("pea_cuda_timer_record", CUDALibrary.TimerRecordFn.self, "deviceTimed")
        let elapsed = try kernel("pea_cuda_timer_elapsed", CUDALibrary.TimerElapsedFn.self, "deviceTimed")
        let spin = try kernel("pea_cuda_spin", CUDALibrary.SpinFn.self, "deviceTimed")
        try check(spin(context.handle, gateMicroseconds), "deviceTimed")
        try check(record(context.handle, 0), "deviceTimed")
        for _ in 0..<max(launches, 1) { try body() }
        try check(record(context.handle, 1), "deviceTimed")
        var ms: Float = 0
        try check(elapsed(context.handle, 0, 1, &ms), "deviceTimed")
        return Double(ms) / Double(max(launches, 1))
    }

    // MARK: per-op profile

    /// `body`'s work on the GPU, per op: each op call is bracketed by two events on the stream, and the GPU
    /// time between them is summed per op name (pea_cuda_profile_*). `body` runs once, as usual, apart from
    /// a wait for the GPU every 1024 calls (the event ring); the per-op times are the GPU's own.
    public func profiled<T>(_ body: () throws -> T) throws -> (result: T, profile: CUDAProfile) {
        let start = try kernel("pea_cuda_profile_start", CUDALibrary.ProfileStartFn.self, "profile")
        let stop = try kernel("pea_cuda_profile_stop", CUDALibrary.ProfileStopFn.self, "profile")
        let allocationsBefore = try memoryStats().deviceAllocations
        try check(start(context.handle), "profile")
        let result: T
        var entries = [pea_cuda_profile_entry](repeating: pea_cuda_profile_entry(), count: 64)
        var count: Int32 = 0
        var span = 0.0
        do {
            result = try body()
        } catch {
            _ = stop(context.handle, &entries, Int32(entries.count), &count, &span)  // stop it; body's error wins
            throw error
        }
        try check(stop(context.handle, &entries, Int32(entries.count), &count, &span), "profile")
        let ops = entries.prefix(min(Int(count), entries.count)).map {
            CUDAProfile.Op(name: $0.op.map { String(cString: $0) } ?? "?", calls: Int($0.calls), milliseconds: $0.ms)
        }
        let allocations = Int(try memoryStats().deviceAllocations - allocationsBefore)
        return (result, CUDAProfile(ops: ops, spanMilliseconds: span, deviceAllocations: allocations))
    }

    // MARK: capability

    /// True when the library exports the op's functions and the op takes `dtype` (the op registry's row: float
    /// ops take f32, f16 and bf16; cast, concat, split, permute and timestepEmbedding every dtype; embedding
    /// i32/i64 ids and float tables; the optimizer f32).
    public func supports(_ op: Op, dtype: DType) -> Bool {
        let info = op.info
        return info.cudaFunctions.allSatisfy(library.exports)
            && info.dtypes.accepts(dtype, compute: [.f32, .f16, .bf16])
    }

    // MARK: ops

    public func cast(_ x: Tensor, to dtype: DType) throws -> Tensor {
        try own(x, "cast")
        let convert = try kernel(for: .cast, CUDALibrary.ConvertFn.self)
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(convert(context.handle, pointer(x), x.dtype.kernelCode, pointer(y), dtype.kernelCode, Int64(x.count)),
                  "cast \(x.dtype) to \(dtype)")
        return y
    }

    public func gemm(_ a: Tensor, _ b: Tensor, transposeA: Bool, transposeB: Bool, alpha: Float, beta: Float,
                     c: Tensor?) throws -> Tensor {
        let dtype = try floats("gemm", a, b, c)
        let plan = try ShapeRules.gemm(a, b, transposeA: transposeA, transposeB: transposeB, beta: beta, c: c)
        let s = plan.shape
        let gemm = try kernel(for: .gemm, CUDALibrary.GemmFn.self)
        if s.k == 0 {   // op(a)·op(b) is zero: beta·c or zeros
            if let c, plan.readsC { return try affine(c, scale: beta, shift: 0).reshaped(plan.outputShape) }
            return try zeros(plan.outputShape, dtype: dtype)
        }
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        if let c, plan.readsC { try copyContiguous(c, into: y, "gemm") }
        try check(gemm(context.handle, dtype.kernelCode, transposeA ? 1 : 0, transposeB ? 1 : 0,
                       Int64(s.m), Int64(s.n), Int64(s.k), alpha,
                       pointer(a), Int64(plan.lda), Int64(plan.batchStrideA), pointer(b), Int64(plan.ldb), Int64(plan.batchStrideB),
                       beta, pointer(y), Int64(plan.ldc), Int64(plan.batchStrideC), Int64(s.batch)), "gemm")
        return y
    }

    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> Tensor {
        try linear(x, weight: weight, bias: bias, residual: nil)
    }

    /// The residual is cuBLASLt's C (beta = 1): y is written once.
    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?, residual: Tensor?) throws -> Tensor {
        let dtype = try floats("linear", x, weight, bias, residual)
        let plan = try ShapeRules.linear(x, weight: weight, bias: bias)
        try ShapeRules.requireResidual(residual, plan.outputShape, "linear")
        let linear = try kernel(for: .linear, CUDALibrary.LinearFn.self)
        if plan.inFeatures == 0 {   // an empty sum: the bias, or zeros, plus the residual
            var y = try zeros(plan.outputShape, dtype: dtype)
            if y.count == 0 { return y }
            if let bias { y = try binary(.add, y, bias) }
            if let residual { y = try binary(.add, y, residual) }
            return y
        }
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        try check(linear(context.handle, dtype.kernelCode, pointer(x), pointer(weight), bias.map(pointer) ?? nil,
                         residual.map(pointer) ?? nil, pointer(y), Int64(plan.rows), Int64(plan.inFeatures),
                         Int64(plan.outFeatures)), "linear")
        return y
    }

    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D) throws -> Tensor {
        try conv2d(x, weight: weight, bias: bias, stride: stride, padding: padding, residual: nil)
    }

    /// f16/bf16 1×1 and 3×3 convolutions add the bias and the residual in the implicit GEMM's epilogue.
    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D,
                       residual: Tensor?) throws -> Tensor {
        let dtype = try floats("conv2d", x, weight, bias, residual)
        var plan = try ShapeRules.conv2d(x, weight: weight, bias: bias, stride: stride, padding: padding)
        try ShapeRules.requireResidual(residual, plan.outputShape, "conv2d")
        let conv2d = try kernel(for: .conv2d, CUDALibrary.Conv2dFn.self)
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        try check(conv2d(context.handle, dtype.kernelCode, &plan.params, pointer(x), pointer(weight), bias.map(pointer) ?? nil,
                         residual.map(pointer) ?? nil, pointer(y)),
                  "conv2d")
        return y
    }

    public func groupNorm(_ x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?, eps: Float, fuseSiLU: Bool) throws -> Tensor {
        let dtype = try floats("groupNorm", x, weight, bias)
        let (batch, channels, spatial) = try ShapeRules.groupNorm(x, groups: groups, weight: weight, bias: bias, op: "groupNorm")
        let groupNorm = try kernel(for: .groupNorm, CUDALibrary.GroupNormFn.self)
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(groupNorm(context.handle, dtype.kernelCode, pointer(x), weight.map(pointer) ?? nil, bias.map(pointer) ?? nil,
                            pointer(y), Int64(batch), Int64(channels), Int64(spatial), Int64(groups), eps, fuseSiLU ? 1 : 0),
                  "groupNorm")
        return y
    }

    public func layerNorm(_ x: Tensor, weight: Tensor?, bias: Tensor?, eps: Float) throws -> Tensor {
        let dtype = try floats("layerNorm", x, weight, bias)
        let (rows, width) = try ShapeRules.layerNorm(x, weight: weight, bias: bias, op: "layerNorm")
        let layerNorm = try kernel(for: .layerNorm, CUDALibrary.LayerNormFn.self)
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(layerNorm(context.handle, dtype.kernelCode, pointer(x), weight.map(pointer) ?? nil, bias.map(pointer) ?? nil,
                            pointer(y), Int64(rows), Int64(width), eps), "layerNorm")
        return y
    }

    public func softmax(_ x: Tensor) throws -> Tensor {
        let dtype = try floats("softmax", x)
        let (rows, width) = try ShapeRules.rows(x, "softmax", "input")
        let softmax = try kernel(for: .softmax, CUDALibrary.SoftmaxFn.self)
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(softmax(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(rows), Int64(width)), "softmax")
        return y
    }

    public func attention(q: Tensor, k: Tensor, v: Tensor, heads: Int, mask: Tensor?, causal: Bool, scale: Float?) throws -> Tensor {
        let dtype = try floats("attention", q, k, v, mask)
        var plan = try ShapeRules.attention(q: q, k: k, v: v, heads: heads, mask: mask, causal: causal, scale: scale)
        let attention = try kernel(for: .attention, CUDALibrary.AttentionFn.self)
        if plan.shape.keys == 0 { return try zeros(plan.outputShape, dtype: dtype) }   // every key masked: zeros, as the kernels define it
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        bindAttentionInputs(&plan.params, q: q, k: k, v: v, mask: mask)
        plan.params.out = pointer(y).map { UnsafeMutablePointer<Float>(OpaquePointer($0)) }
        try check(attention(context.handle, dtype.kernelCode, &plan.params), "attention")
        return y
    }

    public func activation(_ x: Tensor, _ kind: Activation) throws -> Tensor {
        let dtype = try floats("activation", x)
        let activation = try kernel(for: .activation, CUDALibrary.ActivationFn.self)
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(activation(context.handle, dtype.kernelCode, kind.kernelCode, pointer(x), pointer(y), Int64(x.count)), "activation \(kind.rawValue)")
        return y
    }

    public func geglu(_ x: Tensor) throws -> Tensor {
        let dtype = try floats("geglu", x)
        let plan = try ShapeRules.geglu(x)
        let geglu = try kernel(for: .geglu, CUDALibrary.GegluFn.self)
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        try check(geglu(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(plan.rows), Int64(plan.width)), "geglu")
        return y
    }

    public func binary(_ op: BinaryOp, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        let dtype = try floats("binary", a, b)
        let plan = try ShapeRules.binary(op, a, b)
        let binary = try kernel(for: .binary, CUDALibrary.BinaryFn.self)
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        try check(binary(context.handle, dtype.kernelCode, plan.code, pointer(a), plan.aStrides, pointer(b), plan.bStrides, pointer(y),
                         plan.indexShape, Int32(plan.indexShape.count)), op.rawValue)
        return y
    }

    public func affine(_ x: Tensor, scale: Float, shift: Float) throws -> Tensor {
        let dtype = try floats("affine", x)
        let affine = try kernel(for: .affine, CUDALibrary.AffineFn.self)
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(affine(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(x.count), scale, shift), "affine")
        return y
    }

    public func upsampleNearest2x(_ x: Tensor) throws -> Tensor {
        let dtype = try floats("upsampleNearest2x", x)
        let plan = try ShapeRules.upsampleNearest2x(x)
        let upsample = try kernel(for: .upsampleNearest2x, CUDALibrary.UpsampleFn.self)
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        try check(upsample(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(plan.planes),
                           Int64(plan.height), Int64(plan.width)), "upsampleNearest2x")
        return y
    }

    public func embedding(_ ids: Tensor, table: Tensor) throws -> Tensor {
        try own(ids, "embedding")
        let dtype = try floats("embedding", table)
        let outputShape = try ShapeRules.embedding(ids, table: table)
        let embedding = try kernel(for: .embedding, CUDALibrary.EmbeddingFn.self)
        let y = try empty(outputShape, dtype)
        if y.count == 0 { return y }
        try check(embedding(context.handle, dtype.kernelCode, pointer(ids), ids.dtype == .i64 ? 1 : 0, Int64(ids.count),
                            pointer(table), Int64(table.shape[0]), Int64(table.shape[1]), pointer(y)), "embedding")
        return y
    }

    public func timestepEmbedding(_ t: Tensor, dim: Int, flipSinToCos: Bool, downscaleFreqShift: Float,
                                  scale: Float, maxPeriod: Float) throws -> Tensor {
        try own(t, "timestepEmbedding")
        let outputShape = try ShapeRules.timestepEmbedding(t, dim: dim)
        let embed = try kernel(for: .timestepEmbedding, CUDALibrary.TimestepEmbeddingFn.self)
        let y = try empty(outputShape, .f32)
        if y.count == 0 { return y }
        try check(embed(context.handle, DType.f32.kernelCode, pointer(t), t.dtype.kernelCode, Int64(t.shape[0]), Int64(dim),
                        flipSinToCos ? 1 : 0, downscaleFreqShift, scale, maxPeriod, pointer(y)), "timestepEmbedding")
        return y
    }

    public func mean(_ x: Tensor, dim: Int, keepDim: Bool) throws -> Tensor {
        let dtype = try floats("mean", x)
        let plan = try ShapeRules.mean(x, dim: dim, keepDim: keepDim)
        let mean = try kernel(for: .mean, CUDALibrary.MeanFn.self)
        let y = try empty(plan.outputShape, dtype)
        if y.count == 0 { return y }
        try check(mean(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(plan.outer), Int64(plan.count), Int64(plan.inner)), "mean")
        return y
    }

    // MARK: helpers

    /// The names of pea_cuda's status codes.
    static func codeName(_ status: Int32) -> String {
        switch Int(status) {
        case Int(PEA_CUDA_OK): return "PEA_CUDA_OK"
        case Int(PEA_CUDA_ERROR_NO_DEVICE): return "PEA_CUDA_ERROR_NO_DEVICE"
        case Int(PEA_CUDA_ERROR_OUT_OF_MEMORY): return "PEA_CUDA_ERROR_OUT_OF_MEMORY"
        case Int(PEA_CUDA_ERROR_INVALID): return "PEA_CUDA_ERROR_INVALID"
        case Int(PEA_CUDA_ERROR_KERNEL): return "PEA_CUDA_ERROR_KERNEL"
        default: return "status \(status)"
        }
    }

    /// The kind of failure a library status reports.
    static func failureKind(_ status: Int32) -> BackendFailure {
        switch Int(status) {
        case Int(PEA_CUDA_ERROR_NO_DEVICE): return .unavailable
        case Int(PEA_CUDA_ERROR_OUT_OF_MEMORY): return .outOfMemory
        case Int(PEA_CUDA_ERROR_INVALID): return .invalidArgument
        case Int(PEA_CUDA_ERROR_KERNEL): return .launchFailure
        default: return .other
        }
    }

    /// Turns a library status into a Swift error naming `op`, with the library's message and the status's kind.
    func check(_ status: Int32, _ op: String) throws {
        guard status != PEA_CUDA_OK else { return }
        let message = library.message(context.handle)
        throw PEAError.backend("cuda \(op): " + (message.isEmpty ? Self.codeName(status) : message), kind: Self.failureKind(status))
    }

    /// The library's function `name` (of type `F`), or an error naming it when this build of the library lacks it.
    func kernel<F>(_ name: String, _ type: F.Type, _ op: String) throws -> F {
        guard let function = library.function(name, as: type) else {
            throw PEAError.unsupported("\(op): \(library.path) has no \(name) (built before that kernel existed? rebuild it: make cuda / make cuda-emu)")
        }
        return function
    }

    /// The function that runs `op` (its registry row's), named after the op (or `name`) in errors.
    func kernel<F>(for op: Op, _ type: F.Type, _ name: String? = nil) throws -> F {
        guard let function = opKernels[op] else { return try kernel(op.info.cudaFunctions[0], type, name ?? op.rawValue) }  // its error
        return unsafeBitCast(function, to: F.self)
    }

    func empty(_ shape: [Int], _ dtype: DType) throws -> Tensor {
        guard shape.allSatisfy({ $0 >= 0 }) else { throw PEAError.shapeMismatch("negative dimension in \(shape)") }
        let storage = try CUDAStorage(context: context, byteCount: shape.reduce(1, *) * dtype.byteSize)
        return Tensor(shape: shape, dtype: dtype, storage: storage, backend: self)
    }

    /// The tensor lives in this backend's context (device memory of this device and stream).
    func own(_ x: Tensor, _ op: String) throws {
        guard let storage = x.storage as? CUDAStorage else {
            throw PEAError.unsupported("\(op): a tensor of backend '\(x.backend.name)' is not in CUDA device memory; upload it first")
        }
        guard storage.context === context else {
            throw PEAError.unsupported("\(op): the tensor belongs to another CUDA backend (device \(storage.context.device)); download and upload it")
        }
    }

    /// Every tensor given is on this backend and of one floating-point dtype, which is returned (f32 when
    /// none is given).
    func floats(_ op: String, _ tensors: Tensor?...) throws -> DType {
        var dtype: DType?
        for case let t? in tensors {
            try own(t, op)
            guard t.dtype.isFloatingPoint else {
                throw PEAError.unsupported("\(op): the cuda backend computes on f32, f16 or bf16 tensors, got a \(t.dtype) tensor; cast it first")
            }
            if let dtype, dtype != t.dtype {
                throw PEAError.shapeMismatch("\(op): tensors of different dtypes (\(dtype) and \(t.dtype)); cast them to one first")
            }
            dtype = t.dtype
        }
        return dtype ?? .f32
    }

    func pointer(_ x: Tensor) -> UnsafeMutableRawPointer? { (x.storage as! CUDAStorage).pointer }

    /// Sets attention params' q, k, v and mask to the tensors' buffers: the params' float pointers carry device
    /// pointers of the tensors' dtype.
    func bindAttentionInputs(_ params: inout ck_attention_params, q: Tensor, k: Tensor, v: Tensor, mask: Tensor?) {
        func floatPointer(_ t: Tensor) -> UnsafePointer<Float>? { pointer(t).map { UnsafePointer<Float>(OpaquePointer($0)) } }
        params.q = floatPointer(q); params.k = floatPointer(k); params.v = floatPointer(v)
        params.mask = mask.flatMap(floatPointer)
    }

    /// y ← x, same element count and dtype (a device-to-device copy on the stream).
    func copyContiguous(_ x: Tensor, into y: Tensor, _ op: String) throws {
        try copy(ShapeRules.StridedCopy(op, shape: [x.count], sourceStrides: [1], destinationStrides: [1]), from: x, to: y, op)
    }

    /// Runs one strided copy of a data-movement plan on the stream (concat, split and permute: DataMovement.swift).
    func copy(_ copy: ShapeRules.StridedCopy, from source: Tensor, to destination: Tensor, _ op: String) throws {
        guard !copy.isEmpty else { return }
        let run = try kernel(for: .permute, CUDALibrary.CopyStridedFn.self, op)
        let size = source.dtype.byteSize
        try check(run(context.handle, pointer(source).map { $0 + copy.sourceOffset * size }, copy.sourceStrides.map(Int64.init),
                      pointer(destination).map { $0 + copy.destinationOffset * size }, copy.destinationStrides.map(Int64.init),
                      copy.shape.map(Int64.init), Int32(copy.shape.count), Int64(size)), op)
    }
}
