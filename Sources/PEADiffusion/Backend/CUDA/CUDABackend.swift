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
                                   + (reason.isEmpty ? "pea_cuda_create returned \(CUDABackend.codeName(status))" : reason))
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
                                   + (message.isEmpty ? " (\(CUDABackend.codeName(status)))" : ": \(message)"))
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
/// cuBLAS) on the context's stream, validated first with `ShapeRules` exactly as `CPUBackend` validates it,
/// so both backends accept the same arguments and fail with the same messages.
///
/// Float tensors may be f32, f16 or bf16 (storage; arithmetic accumulates in f32): an op computes in the
/// dtype of its float inputs, which must all agree, and returns that dtype (`timestepEmbedding` always
/// returns f32, as the protocol says). Ids are i32 or i64. Ops are queued, not waited for: `download` and
/// `synchronize` are the only calls that wait for the device, so a kernel failure detected on the device
/// (an id outside the vocabulary, say) is reported by the next of those. Every library failure becomes
/// `PEAError.backend` with the library's message, prefixed by the op.
public final class CUDABackend: ComputeBackend, CustomStringConvertible {
    public let name = "cuda"
    public let library: CUDALibrary
    public let device: Int
    /// The device's name, compute capability and memory as the driver reports them (empty/0 when the
    /// library cannot say).
    public let deviceName: String
    public let computeCapability: (major: Int, minor: Int)
    public let totalMemory: Int

    let context: CUDAContext

    /// Opens `device` through `library` (default: the library `CUDALibrary.locate()` finds). Throws
    /// `PEAError.backend` saying where the library was looked for, what is wrong with it, or why the device
    /// cannot be opened (no driver, no device: the library's message).
    public init(library: CUDALibrary? = nil, device: Int = 0) throws {
        let library = try library ?? CUDALibrary()
        self.library = library
        self.device = device
        context = try CUDAContext(library: library, device: device)
        var name = [CChar](repeating: 0, count: 256)
        var major: Int32 = 0, minor: Int32 = 0
        var memory = 0
        if let info = library.deviceInfo, info(context.handle, &name, name.count, &major, &minor, &memory) == PEA_CUDA_OK {
            deviceName = String(cString: name)
            computeCapability = (Int(major), Int(minor))
            totalMemory = memory
        } else {
            deviceName = ""
            computeCapability = (0, 0)
            totalMemory = 0
        }
    }

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
        if let zero = library.zero {
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
        let stats = try function(library.memoryStats, "pea_cuda_memory_stats", "memoryStats")
        var inUse = 0, peak = 0
        var allocations: UInt64 = 0
        try check(stats(context.handle, &inUse, &peak, &allocations), "memoryStats")
        return CUDAMemoryStats(bytesInUse: inUse, peakBytes: peak, deviceAllocations: allocations)
    }

    /// Returns every cached (free) block to the driver.
    public func releaseCache() throws {
        let release = try function(library.releaseCache, "pea_cuda_release_cache", "releaseCache")
        try check(release(context.handle), "releaseCache")
    }

    /// TF32 tensor cores for f32 GEMMs (off by default: f32 GEMMs are exact f32).
    public func setTF32(_ enabled: Bool) throws {
        let set = try function(library.setTF32, "pea_cuda_set_tf32", "setTF32")
        try check(set(context.handle, enabled ? 1 : 0), "setTF32")
    }

    // MARK: device timing (benchmarks)

    /// GPU milliseconds per run of `body`, timed on the device: a spin kernel holds the stream for
    /// `gateMicroseconds` while the host queues an event, `launches` calls of `body` and a second event, so the
    /// queued runs execute back to back however slowly the host enqueues them; the result is the time between
    /// the two events divided by `launches`. `gateMicroseconds` must cover the host's time to queue the runs.
    public func deviceTimedMilliseconds(launches: Int, gateMicroseconds: Double, _ body: () throws -> Void) throws -> Double {
        let record = try function(library.timerRecord, "pea_cuda_timer_record", "deviceTimed")
        let elapsed = try function(library.timerElapsed, "pea_cuda_timer_elapsed", "deviceTimed")
        let spin = try function(library.spin, "pea_cuda_spin", "deviceTimed")
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
        let start = try function(library.profileStart, "pea_cuda_profile_start", "profile")
        let stop = try function(library.profileStop, "pea_cuda_profile_stop", "profile")
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

    /// True when the library has the op's kernel and the op takes `dtype`: float ops take f32, f16 and bf16;
    /// cast, concat, split, permute every dtype; embedding i32/i64 ids (and f32/f16/bf16 tables);
    /// timestepEmbedding timesteps of any dtype.
    public func supports(_ op: Op, dtype: DType) -> Bool {
        let present: Bool
        switch op {
        case .cast: present = library.convert != nil
        case .gemm: present = library.gemm != nil
        case .linear: present = library.linear != nil
        case .conv2d: present = library.conv2d != nil
        case .groupNorm: present = library.groupNorm != nil
        case .layerNorm: present = library.layerNorm != nil
        case .softmax: present = library.softmax != nil
        case .attention: present = library.attention != nil
        case .activation: present = library.activation != nil
        case .geglu: present = library.geglu != nil
        case .binary: present = library.binary != nil
        case .affine: present = library.affine != nil
        case .upsampleNearest2x: present = library.upsampleNearest2x != nil
        case .concat, .split, .permute: present = library.copyStrided != nil
        case .embedding: present = library.embedding != nil
        case .timestepEmbedding: present = library.timestepEmbedding != nil
        case .mean: present = library.mean != nil
        case .conv2dBackwardData, .groupNormBackward, .layerNormBackward, .softmaxBackward, .activationBackward,
             .gegluBackward, .upsampleNearest2xBackward:
            present = hasBackwardKernel(op)   // CUDABackend+Backward.swift
        case .adamw: return library.adamw != nil && dtype == .f32
        case .sumOfSquares: return library.sumSquares != nil && dtype == .f32
        }
        guard present else { return false }
        switch op {
        case .cast, .concat, .split, .permute, .embedding, .timestepEmbedding: return true
        default: return dtype.isFloatingPoint
        }
    }

    // MARK: ops

    public func cast(_ x: Tensor, to dtype: DType) throws -> Tensor {
        try own(x, "cast")
        let convert = try function(library.convert, "pea_cuda_convert", "cast")
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(convert(context.handle, pointer(x), x.dtype.kernelCode, pointer(y), dtype.kernelCode, Int64(x.count)),
                  "cast \(x.dtype) to \(dtype)")
        return y
    }

    public func gemm(_ a: Tensor, _ b: Tensor, transposeA: Bool, transposeB: Bool, alpha: Float, beta: Float,
                     c: Tensor?) throws -> Tensor {
        let dtype = try floats("gemm", a, b, c)
        if beta != 0, c == nil { throw PEAError.shapeMismatch("gemm: beta is \(beta) but no c was given") }
        let s = try ShapeRules.gemm(a.shape, b.shape, transposeA: transposeA, transposeB: transposeB, c: c?.shape)
        let gemm = try function(library.gemm, "pea_cuda_gemm", "gemm")
        let outShape = (s.aBatched || s.bBatched) ? [s.batch, s.m, s.n] : [s.m, s.n]
        if s.k == 0 {   // op(a)·op(b) is zero: beta·c or zeros
            if let c, beta != 0 { return try affine(c, scale: beta, shift: 0).reshaped(outShape) }
            return try zeros(outShape, dtype: dtype)
        }
        let y = try empty(outShape, dtype)
        if y.count == 0 { return y }
        if let c, beta != 0 { try copyContiguous(c, into: y, "gemm") }
        let lda = transposeA ? s.m : s.k, ldb = transposeB ? s.k : s.n
        try check(gemm(context.handle, dtype.kernelCode, transposeA ? 1 : 0, transposeB ? 1 : 0,
                       Int64(s.m), Int64(s.n), Int64(s.k), alpha,
                       pointer(a), Int64(lda), s.aBatched ? Int64(s.m * s.k) : 0,
                       pointer(b), Int64(ldb), s.bBatched ? Int64(s.k * s.n) : 0,
                       beta, pointer(y), Int64(s.n), Int64(s.m * s.n), Int64(s.batch)), "gemm")
        return y
    }

    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> Tensor {
        let dtype = try floats("linear", x, weight, bias)
        try ShapeRules.requireRank(weight, 2...2, "linear", "weight")
        guard x.rank >= 1, x.shape.last == weight.shape[1] else {
            throw PEAError.shapeMismatch("linear: input \(x.shape) does not end in the weight's input width \(weight.shape[1])")
        }
        let (outFeatures, inFeatures) = (weight.shape[0], weight.shape[1])
        try ShapeRules.requireShape(bias, [outFeatures], "linear", "bias")
        let linear = try function(library.linear, "pea_cuda_linear", "linear")
        let outShape = Array(x.shape.dropLast()) + [outFeatures]
        if inFeatures == 0 {   // an empty sum: the bias, or zeros
            let zero = try zeros(outShape, dtype: dtype)
            guard let bias, zero.count > 0 else { return zero }
            return try binary(.add, zero, bias)
        }
        let y = try empty(outShape, dtype)
        if y.count == 0 { return y }
        let rows = x.count / inFeatures
        try check(linear(context.handle, dtype.kernelCode, pointer(x), pointer(weight), bias.map(pointer) ?? nil, pointer(y),
                         Int64(rows), Int64(inFeatures), Int64(outFeatures)), "linear")
        return y
    }

    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D) throws -> Tensor {
        let dtype = try floats("conv2d", x, weight, bias)
        let outShape = try ShapeRules.conv2dOutput(x.shape, weight: weight.shape, stride: stride, padding: padding)
        try ShapeRules.requireShape(bias, [weight.shape[0]], "conv2d", "bias")
        let conv2d = try function(library.conv2d, "pea_cuda_conv2d", "conv2d")
        var params = ck_conv2d_params(
            B: Int64(x.shape[0]), Cin: Int64(x.shape[1]), H: Int64(x.shape[2]), W: Int64(x.shape[3]),
            Cout: Int64(weight.shape[0]), kh: Int64(weight.shape[2]), kw: Int64(weight.shape[3]),
            strideH: Int64(stride.0), strideW: Int64(stride.1),
            padTop: Int64(padding.top), padBottom: Int64(padding.bottom), padLeft: Int64(padding.left), padRight: Int64(padding.right))
        let y = try empty(outShape, dtype)
        if y.count == 0 { return y }
        try check(conv2d(context.handle, dtype.kernelCode, &params, pointer(x), pointer(weight), bias.map(pointer) ?? nil, pointer(y)),
                  "conv2d")
        return y
    }

    public func groupNorm(_ x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?, eps: Float, fuseSiLU: Bool) throws -> Tensor {
        let dtype = try floats("groupNorm", x, weight, bias)
        let (batch, channels, spatial) = try ShapeRules.groupNorm(x, groups: groups, weight: weight, bias: bias, op: "groupNorm")
        let groupNorm = try function(library.groupNorm, "pea_cuda_group_norm", "groupNorm")
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
        let layerNorm = try function(library.layerNorm, "pea_cuda_layer_norm", "layerNorm")
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(layerNorm(context.handle, dtype.kernelCode, pointer(x), weight.map(pointer) ?? nil, bias.map(pointer) ?? nil,
                            pointer(y), Int64(rows), Int64(width), eps), "layerNorm")
        return y
    }

    public func softmax(_ x: Tensor) throws -> Tensor {
        let dtype = try floats("softmax", x)
        try ShapeRules.requireRank(x, 1...8, "softmax", "input")
        let softmax = try function(library.softmax, "pea_cuda_softmax", "softmax")
        let width = x.shape[x.rank - 1]
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(softmax(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(x.count / width), Int64(width)), "softmax")
        return y
    }

    public func attention(q: Tensor, k: Tensor, v: Tensor, heads: Int, mask: Tensor?, causal: Bool, scale: Float?) throws -> Tensor {
        let dtype = try floats("attention", q, k, v, mask)
        let s = try ShapeRules.attention(q: q.shape, k: k.shape, v: v.shape, heads: heads, mask: mask?.shape)
        let attention = try function(library.attention, "pea_cuda_attention", "attention")
        let outShape = [s.batch, s.queries, heads * s.valueHeadDim]
        if s.keys == 0 { return try zeros(outShape, dtype: dtype) }   // every key masked: zeros, as the kernels define it
        let y = try empty(outShape, dtype)
        if y.count == 0 { return y }
        // Sequence layout [B, T, H·D]: head h of token t starts at t·H·D + h·D. The params' float pointers
        // carry device pointers of `dtype`.
        func floatPointer(_ t: Tensor) -> UnsafePointer<Float>? { pointer(t).map { UnsafePointer<Float>(OpaquePointer($0)) } }
        var p = ck_attention_params()
        p.q = floatPointer(q); p.k = floatPointer(k); p.v = floatPointer(v)
        p.out = pointer(y).map { UnsafeMutablePointer<Float>(OpaquePointer($0)) }
        p.B = Int64(s.batch); p.H = Int64(heads); p.Tq = Int64(s.queries); p.Tk = Int64(s.keys)
        p.D = Int64(s.headDim); p.Dv = Int64(s.valueHeadDim)
        (p.q_sb, p.q_sh, p.q_st) = (Int64(s.queries * q.shape[2]), Int64(s.headDim), Int64(q.shape[2]))
        (p.k_sb, p.k_sh, p.k_st) = (Int64(s.keys * k.shape[2]), Int64(s.headDim), Int64(k.shape[2]))
        (p.v_sb, p.v_sh, p.v_st) = (Int64(s.keys * v.shape[2]), Int64(s.valueHeadDim), Int64(v.shape[2]))
        (p.o_sb, p.o_sh, p.o_st) = (Int64(s.queries * y.shape[2]), Int64(s.valueHeadDim), Int64(y.shape[2]))
        if let mask {
            let strides = ShapeRules.broadcastStrides(mask.shape, to: [s.batch, heads, s.queries, s.keys])
            p.mask = floatPointer(mask)
            (p.m_sb, p.m_sh, p.m_st) = (Int64(strides[0]), Int64(strides[1]), Int64(strides[2]))
        }
        p.scale = scale ?? 1 / Float(s.headDim).squareRoot()
        p.causal = causal ? 1 : 0
        try check(attention(context.handle, dtype.kernelCode, &p), "attention")
        return y
    }

    public func activation(_ x: Tensor, _ kind: Activation) throws -> Tensor {
        let dtype = try floats("activation", x)
        let activation = try function(library.activation, "pea_cuda_activation", "activation")
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        let code: Int32
        switch kind {
        case .gelu: code = Int32(PEA_ACT_GELU_ERF)
        case .geluTanh: code = Int32(PEA_ACT_GELU_TANH)
        case .quickGELU: code = Int32(PEA_ACT_QUICK_GELU)
        case .silu: code = Int32(PEA_ACT_SILU)
        }
        try check(activation(context.handle, dtype.kernelCode, code, pointer(x), pointer(y), Int64(x.count)), "activation \(kind.rawValue)")
        return y
    }

    public func geglu(_ x: Tensor) throws -> Tensor {
        let dtype = try floats("geglu", x)
        guard x.rank >= 1, x.shape[x.rank - 1] % 2 == 0 else {
            throw PEAError.shapeMismatch("geglu: the last dimension of \(x.shape) must be even")
        }
        let geglu = try function(library.geglu, "pea_cuda_geglu", "geglu")
        let width = x.shape[x.rank - 1] / 2
        let y = try empty(Array(x.shape.dropLast()) + [width], dtype)
        if y.count == 0 { return y }
        try check(geglu(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(y.count / width), Int64(width)), "geglu")
        return y
    }

    public func binary(_ op: BinaryOp, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        let dtype = try floats("binary", a, b)
        let shape = try ShapeRules.broadcast(a.shape, b.shape, op: op.rawValue)
        guard shape.count <= Int(CK_MAX_RANK) else { throw PEAError.unsupported("\(op.rawValue): rank above \(CK_MAX_RANK)") }
        let binary = try function(library.binary, "pea_cuda_binary", "binary")
        let y = try empty(shape, dtype)
        if y.count == 0 { return y }
        let indexShape = shape.isEmpty ? [1] : shape
        let aStrides = ShapeRules.broadcastStrides(a.shape, to: indexShape).map(Int64.init)
        let bStrides = ShapeRules.broadcastStrides(b.shape, to: indexShape).map(Int64.init)
        let code: Int32
        switch op {
        case .add: code = Int32(CK_ADD)
        case .sub: code = Int32(CK_SUB)
        case .mul: code = Int32(CK_MUL)
        case .div: code = Int32(CK_DIV)
        }
        try check(binary(context.handle, dtype.kernelCode, code, pointer(a), aStrides, pointer(b), bStrides, pointer(y),
                         indexShape.map(Int64.init), Int32(indexShape.count)), op.rawValue)
        return y
    }

    public func affine(_ x: Tensor, scale: Float, shift: Float) throws -> Tensor {
        let dtype = try floats("affine", x)
        let affine = try function(library.affine, "pea_cuda_affine", "affine")
        let y = try empty(x.shape, dtype)
        if y.count == 0 { return y }
        try check(affine(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(x.count), scale, shift), "affine")
        return y
    }

    public func upsampleNearest2x(_ x: Tensor) throws -> Tensor {
        let dtype = try floats("upsampleNearest2x", x)
        try ShapeRules.requireRank(x, 4...4, "upsampleNearest2x", "input")
        let upsample = try function(library.upsampleNearest2x, "pea_cuda_upsample_nearest2x", "upsampleNearest2x")
        let y = try empty([x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3]], dtype)
        if y.count == 0 { return y }
        try check(upsample(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(x.shape[0] * x.shape[1]),
                           Int64(x.shape[2]), Int64(x.shape[3])), "upsampleNearest2x")
        return y
    }

    public func concat(_ tensors: [Tensor], dim: Int) throws -> Tensor {
        for t in tensors { try own(t, "concat") }
        let (axis, shape) = try ShapeRules.concat(tensors.map(\.shape), dim: dim)
        let dtype = tensors[0].dtype
        guard tensors.allSatisfy({ $0.dtype == dtype }) else { throw PEAError.shapeMismatch("concat: tensors of different dtypes") }
        let y = try empty(shape, dtype)
        var offset = 0
        for t in tensors {
            try copyBlock(from: t, sourceOffset: 0, sourceShape: t.shape, to: y, destinationOffset: offset, axis: axis,
                          blockShape: t.shape, "concat")
            offset += t.shape[axis]
        }
        return y
    }

    public func split(_ x: Tensor, sizes: [Int], dim: Int) throws -> [Tensor] {
        try own(x, "split")
        let axis = try ShapeRules.split(x.shape, sizes: sizes, dim: dim)
        var offset = 0
        return try sizes.map { size in
            var shape = x.shape
            shape[axis] = size
            let part = try empty(shape, x.dtype)
            try copyBlock(from: x, sourceOffset: offset, sourceShape: x.shape, to: part, destinationOffset: 0, axis: axis,
                          blockShape: shape, "split")
            offset += size
            return part
        }
    }

    public func permute(_ x: Tensor, _ dims: [Int]) throws -> Tensor {
        try own(x, "permute")
        let axes = try ShapeRules.permute(x.shape, dims)
        let shape = axes.map { x.shape[$0] }
        let y = try empty(shape, x.dtype)
        if y.count == 0 { return y }
        let sourceStrides = ShapeRules.strides(x.shape)
        try stridedCopy(from: pointer(x), strides: axes.map { sourceStrides[$0] }, to: pointer(y),
                        strides: ShapeRules.strides(shape), shape: shape, elementSize: x.dtype.byteSize, "permute")
        return y
    }

    public func embedding(_ ids: Tensor, table: Tensor) throws -> Tensor {
        try own(ids, "embedding")
        let dtype = try floats("embedding", table)
        guard ids.dtype == .i32 || ids.dtype == .i64 else {
            throw PEAError.shapeMismatch("embedding: ids must be i32 or i64, got \(ids.dtype)")
        }
        try ShapeRules.requireRank(table, 2...2, "embedding", "table")
        let embedding = try function(library.embedding, "pea_cuda_embedding", "embedding")
        let y = try empty(ids.shape + [table.shape[1]], dtype)
        if y.count == 0 { return y }
        try check(embedding(context.handle, dtype.kernelCode, pointer(ids), ids.dtype == .i64 ? 1 : 0, Int64(ids.count),
                            pointer(table), Int64(table.shape[0]), Int64(table.shape[1]), pointer(y)), "embedding")
        return y
    }

    public func timestepEmbedding(_ t: Tensor, dim: Int, flipSinToCos: Bool, downscaleFreqShift: Float,
                                  scale: Float, maxPeriod: Float) throws -> Tensor {
        try own(t, "timestepEmbedding")
        try ShapeRules.requireRank(t, 1...1, "timestepEmbedding", "timesteps")
        guard dim > 0 else { throw PEAError.shapeMismatch("timestepEmbedding: dim must be positive, got \(dim)") }
        let embed = try function(library.timestepEmbedding, "pea_cuda_timestep_embedding", "timestepEmbedding")
        let y = try empty([t.shape[0], dim], .f32)
        if y.count == 0 { return y }
        try check(embed(context.handle, DType.f32.kernelCode, pointer(t), t.dtype.kernelCode, Int64(t.shape[0]), Int64(dim),
                        flipSinToCos ? 1 : 0, downscaleFreqShift, scale, maxPeriod, pointer(y)), "timestepEmbedding")
        return y
    }

    public func mean(_ x: Tensor, dim: Int, keepDim: Bool) throws -> Tensor {
        let dtype = try floats("mean", x)
        let axis = try ShapeRules.axis(dim, rank: x.rank, op: "mean")
        let mean = try function(library.mean, "pea_cuda_mean", "mean")
        var shape = x.shape
        if keepDim { shape[axis] = 1 } else { shape.remove(at: axis) }
        let y = try empty(shape, dtype)
        if y.count == 0 { return y }
        let outer = x.shape[..<axis].reduce(1, *), inner = x.shape[(axis + 1)...].reduce(1, *)
        try check(mean(context.handle, dtype.kernelCode, pointer(x), pointer(y), Int64(outer), Int64(x.shape[axis]), Int64(inner)), "mean")
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

    /// Turns a library status into a Swift error naming `op`, with the library's message.
    func check(_ status: Int32, _ op: String) throws {
        guard status != PEA_CUDA_OK else { return }
        let message = library.message(context.handle)
        throw PEAError.backend("cuda \(op): " + (message.isEmpty ? Self.codeName(status) : message))
    }

    /// The library's function for `op`, or an error naming the symbol a library built before that kernel lacks.
    func function<F>(_ function: F?, _ symbol: String, _ op: String) throws -> F {
        guard let function else {
            throw PEAError.unsupported("\(op): \(library.path) has no \(symbol) (built before that kernel existed? rebuild it: make cuda / make cuda-emu)")
        }
        return function
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

    /// y ← x, same element count and dtype (a device-to-device copy on the stream).
    private func copyContiguous(_ x: Tensor, into y: Tensor, _ op: String) throws {
        try stridedCopy(from: pointer(x), strides: [1], to: pointer(y), strides: [1], shape: [x.count],
                        elementSize: x.dtype.byteSize, op)
    }

    /// Copies the block of `source` that starts at `sourceOffset` along `axis` and has `blockShape` into
    /// `destination` starting at `destinationOffset` along the same axis.
    private func copyBlock(from source: Tensor, sourceOffset: Int, sourceShape: [Int], to destination: Tensor,
                           destinationOffset: Int, axis: Int, blockShape: [Int], _ op: String) throws {
        guard blockShape.reduce(1, *) > 0 else { return }
        let sourceStrides = ShapeRules.strides(sourceShape), destinationStrides = ShapeRules.strides(destination.shape)
        let size = source.dtype.byteSize
        let src = pointer(source).map { $0 + sourceOffset * sourceStrides[axis] * size }
        let dst = pointer(destination).map { $0 + destinationOffset * destinationStrides[axis] * size }
        try stridedCopy(from: src, strides: sourceStrides, to: dst, strides: destinationStrides, shape: blockShape,
                        elementSize: size, op)
    }

    /// dst[idx·dstStrides] = src[idx·srcStrides] over `shape` (rank 0 copies one element).
    private func stridedCopy(from source: UnsafeMutableRawPointer?, strides sourceStrides: [Int], to destination: UnsafeMutableRawPointer?,
                             strides destinationStrides: [Int], shape: [Int], elementSize: Int, _ op: String) throws {
        guard shape.count <= Int(CK_MAX_RANK) else { throw PEAError.unsupported("\(op): rank above \(CK_MAX_RANK)") }
        guard shape.reduce(1, *) > 0 else { return }
        let copy = try function(library.copyStrided, "pea_cuda_copy_strided", op)
        let (shape, sourceStrides, destinationStrides) = shape.isEmpty ? ([1], [1], [1]) : (shape, sourceStrides, destinationStrides)
        try check(copy(context.handle, source, sourceStrides.map(Int64.init), destination, destinationStrides.map(Int64.init),
                       shape.map(Int64.init), Int32(shape.count), Int64(elementSize)), op)
    }
}
