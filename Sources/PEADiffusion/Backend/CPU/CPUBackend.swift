#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels

/// Host memory, 64-byte aligned so the SIMD kernels can use aligned loads when they like. Large buffers come
/// from `CPUBufferCache`, so a model evaluated again reuses its activations' memory.
final class CPUStorage: TensorStorage {
    let pointer: UnsafeMutableRawPointer
    let byteCount: Int
    /// The bytes actually held (≥ byteCount): the cache's size class of the buffer.
    private let capacity: Int

    init(byteCount: Int) throws {
        (pointer, capacity) = try CPUBufferCache.shared.allocate(byteCount)
        self.byteCount = byteCount
    }

    deinit { CPUBufferCache.shared.release(pointer, capacity: capacity) }
}

/// The CPU backend's allocator for large host buffers: freed buffers are kept and handed to the next tensor
/// of a size they fit. A UNet evaluation or a training step allocates and frees the same activation sizes every
/// time; a buffer handed back to the kernel comes back as fresh pages that it faults in and zeroes one 4 KiB
/// page at a time (measured: 2.2 million page faults, 8.9 GB zeroed, per SD1.5 training step when at most
/// 512 MB was kept).
///
/// The memory it manages, live buffers plus kept ones, stays within a quarter above the most that was ever
/// live at once (or within `floor`, when that is more): a request that finds no kept buffer to fit, and would
/// push the total past that, first frees kept buffers, largest first. The quarter is room for the sizes that
/// do not fit each other (a kept buffer serves requests up to a quarter smaller than it); with it an SD1.5
/// training step takes about 2,800 page faults instead of 2.2 million (`pea bench train-step`).
final class CPUBufferCache: @unchecked Sendable {
    static let shared = CPUBufferCache(floor: 512 << 20)
    /// Below this, malloc's own free lists are fast enough.
    static let smallest = 1 << 20
    /// A kept buffer serves a request that is at most this fraction (1/4) smaller than it.
    static let slackShift = 2
    /// Buffers this large start on a 2 MiB boundary and ask for transparent huge pages (where the kernel's
    /// setting is `madvise`): one fault maps 2 MiB instead of 4 KiB, and the GEMM's walks over activations miss
    /// the TLB less.
    static let hugePageThreshold = 4 << 20
    static let hugePage = 2 << 20

    private let floor: Int
    /// Kept buffers by capacity, and their capacities in increasing order.
    private var kept: [Int: [UnsafeMutableRawPointer]] = [:]
    private var keptCapacities: [Int] = []
    private(set) var keptBytes = 0
    private(set) var liveBytes = 0
    private(set) var peakLiveBytes = 0
    /// Large buffers obtained from the system so far (posix_memalign): constant in a repeating workload.
    private(set) var systemAllocations = 0
    private let lock = PThreadLock()

    init(floor: Int) { self.floor = floor }

    deinit {
        for pointer in kept.values.joined() { free(pointer) }
    }

    /// Buffers are sized in 64 KiB steps so that nearby sizes share them.
    static func capacity(for byteCount: Int) -> Int {
        byteCount < smallest ? max(byteCount, 64) : (byteCount + 0xFFFF) & ~0xFFFF
    }

    /// A buffer of at least `byteCount` bytes, and its capacity.
    func allocate(_ byteCount: Int) throws -> (UnsafeMutableRawPointer, Int) {
        var capacity = Self.capacity(for: byteCount)
        var reused: UnsafeMutableRawPointer?
        var evicted: [UnsafeMutableRawPointer] = []
        if capacity >= Self.smallest {
            lock.withLock {
                if let (pointer, size) = takeKept(fitting: capacity) {
                    reused = pointer
                    capacity = size
                } else {
                    let peak = max(peakLiveBytes, liveBytes + capacity)
                    let budget = max(floor, peak + peak >> Self.slackShift)
                    while liveBytes + keptBytes + capacity > budget, let largest = keptCapacities.last {
                        evicted.append(removeKept(largest))
                    }
                }
                if reused == nil { systemAllocations += 1 }
                liveBytes += capacity
                peakLiveBytes = max(peakLiveBytes, liveBytes)
            }
        }
        for pointer in evicted { free(pointer) }
        if let reused { return (reused, capacity) }
        var raw: UnsafeMutableRawPointer?
        let huge = capacity >= Self.hugePageThreshold
        guard posix_memalign(&raw, huge ? Self.hugePage : 64, capacity) == 0, let raw else {
            if capacity >= Self.smallest { lock.withLock { liveBytes -= capacity } }
            throw PEAError.backend("cpu: cannot allocate \(byteCount) bytes", kind: .outOfMemory)
        }
        #if os(Linux)
        if huge { _ = madvise(raw, capacity & ~(Self.hugePage - 1), MADV_HUGEPAGE) }
        #endif
        return (raw, capacity)
    }

    /// Takes back a buffer `allocate` returned: kept when large, else freed.
    func release(_ pointer: UnsafeMutableRawPointer, capacity: Int) {
        guard capacity >= Self.smallest else { free(pointer); return }
        lock.withLock {
            liveBytes -= capacity
            if kept[capacity, default: []].isEmpty { keptCapacities.insert(capacity, at: insertionIndex(capacity)) }
            kept[capacity, default: []].append(pointer)
            keptBytes += capacity
        }
    }

    /// The smallest kept buffer of at least `capacity` bytes and at most a quarter more (lock held).
    private func takeKept(fitting capacity: Int) -> (UnsafeMutableRawPointer, Int)? {
        let index = insertionIndex(capacity)
        guard index < keptCapacities.count else { return nil }
        let size = keptCapacities[index]
        guard size <= capacity + capacity >> Self.slackShift else { return nil }
        return (removeKept(size), size)
    }

    /// Removes one kept buffer of exactly `size` bytes, which must exist (lock held).
    private func removeKept(_ size: Int) -> UnsafeMutableRawPointer {
        let pointer = kept[size]!.removeLast()
        if kept[size]!.isEmpty {
            kept[size] = nil
            keptCapacities.remove(at: insertionIndex(size))
        }
        keptBytes -= size
        return pointer
    }

    /// The first index of `keptCapacities` whose value is ≥ `capacity` (lock held).
    private func insertionIndex(_ capacity: Int) -> Int {
        var low = 0, high = keptCapacities.count
        while low < high {
            let mid = (low + high) / 2
            if keptCapacities[mid] < capacity { low = mid + 1 } else { high = mid }
        }
        return low
    }
}

/// The reference backend: every op runs the C kernels of CKernels/cpu/ on host memory, synchronously,
/// in f32. f16/bf16 tensors can be stored and cast, not computed on — with one exception, half-size weights:
/// the weight of `linear`, `conv2d` and `conv2dBackwardData` (and an operand of an unbatched `gemm`) may be
/// f16 or bf16, widened to f32 as the GEMM packs it, so a model holds its matrices at half the memory and
/// computes exactly as it would on f32 copies of them.
public final class CPUBackend: ComputeBackend, StridedCopying {
    public let name = "cpu"
    public let halfWeights: DType?

    /// `threads` ≤ 0 (the default) uses every online CPU. The kernels' thread pool is process-wide.
    /// `halfWeights` (f16 or bf16): models loaded in f32 hold their weight matrices in it.
    public init(threads: Int = 0, halfWeights: DType? = nil) {
        precondition(halfWeights == nil || halfWeights == .f16 || halfWeights == .bf16, "half-size weights are f16 or bf16")
        if threads > 0 { ck_set_num_threads(Int32(threads)) }
        self.halfWeights = halfWeights
    }

    // MARK: memory

    public func upload(bytes: UnsafeRawBufferPointer, shape: [Int], dtype: DType) throws -> Tensor {
        guard bytes.count == shape.reduce(1, *) * dtype.byteSize else {
            throw PEAError.shapeMismatch("upload: \(bytes.count) bytes for \(dtype) \(shape)")
        }
        let tensor = try empty(shape, dtype)
        if let base = bytes.baseAddress { pointer(tensor).copyMemory(from: base, byteCount: bytes.count) }
        return tensor
    }

    public func upload(_ host: HostTensor) throws -> Tensor {
        let tensor = try empty(host.shape, host.dtype)
        host.bytes.withUnsafeBytes { source in
            if let base = source.baseAddress { pointer(tensor).copyMemory(from: base, byteCount: host.bytes.count) }
        }
        return tensor
    }

    public func download(_ tensor: Tensor) throws -> HostTensor {
        try own(tensor, "download")
        let bytes = [UInt8](UnsafeRawBufferPointer(start: pointer(tensor), count: tensor.byteCount))
        return HostTensor(shape: tensor.shape, dtype: tensor.dtype, bytes: bytes)
    }

    public func zeros(_ shape: [Int], dtype: DType) throws -> Tensor {
        let tensor = try empty(shape, dtype)
        pointer(tensor).initializeMemory(as: UInt8.self, repeating: 0, count: tensor.byteCount)
        return tensor
    }

    public func synchronize() throws {}

    /// Every op, in the dtypes its registry row allows with f32 as the compute dtype.
    public func supports(_ op: Op, dtype: DType) -> Bool {
        op.info.dtypes.accepts(dtype, compute: [.f32])
    }

    // MARK: ops

    public func cast(_ x: Tensor, to dtype: DType) throws -> Tensor {
        try own(x, "cast")
        let y = try empty(x.shape, dtype)
        let status = ck_convert(pointer(x), x.dtype.kernelCode, pointer(y), dtype.kernelCode, Int64(x.count))
        guard status == CK_OK else { throw PEAError.backend("cpu: cast \(x.dtype) to \(dtype) failed", kind: .invalidArgument) }
        return y
    }

    public func gemm(_ a: Tensor, _ b: Tensor, transposeA: Bool, transposeB: Bool, alpha: Float, beta: Float,
                     c: Tensor?) throws -> Tensor {
        try f32("gemm", c)
        try f32OrHalfWeight("gemm", a)
        try f32OrHalfWeight("gemm", b)
        let plan = try ShapeRules.gemm(a, b, transposeA: transposeA, transposeB: transposeB, beta: beta, c: c)
        let s = plan.shape
        let y = try empty(plan.outputShape, .f32)
        if let c, plan.readsC { pointer(y).copyMemory(from: pointer(c), byteCount: y.byteCount) }
        if a.dtype != .f32 || b.dtype != .f32 {
            guard s.batch == 1 else {
                throw PEAError.unsupported("gemm: a batched product computes in f32 on the cpu backend, got \(a.dtype) × \(b.dtype)")
            }
            try check(ck_gemm_mixed(transposeA ? 1 : 0, transposeB ? 1 : 0, Int64(s.m), Int64(s.n), Int64(s.k), alpha,
                                    pointer(a), a.dtype.kernelCode, Int64(plan.lda), pointer(b), b.dtype.kernelCode, Int64(plan.ldb),
                                    beta, floats(y), Int64(plan.ldc)), "gemm")
            return y
        }
        ck_sgemm_batched(transposeA ? 1 : 0, transposeB ? 1 : 0, Int64(s.m), Int64(s.n), Int64(s.k), alpha,
                         floats(a), Int64(plan.lda), Int64(plan.batchStrideA), floats(b), Int64(plan.ldb), Int64(plan.batchStrideB),
                         beta, floats(y), Int64(plan.ldc), Int64(plan.batchStrideC), Int64(s.batch))
        return y
    }

    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> Tensor {
        try linear(x, weight: weight, bias: bias, residual: nil)
    }

    /// The bias and the residual are written into y first and the GEMM accumulates onto them (beta = 1).
    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?, residual: Tensor?) throws -> Tensor {
        try f32("linear", x, bias, residual)
        try f32OrHalfWeight("linear", weight)
        let plan = try ShapeRules.linear(x, weight: weight, bias: bias)
        try ShapeRules.requireResidual(residual, plan.outputShape, "linear")
        let (rows, inFeatures, outFeatures) = (plan.rows, plan.inFeatures, plan.outFeatures)
        let y = try empty(plan.outputShape, .f32)
        let out = floats(y)
        if let residual, let bias, y.count > 0 {
            let sum = try ShapeRules.binary(.add, residual, bias)   // the bias broadcast over the rows
            ck_binary_f32(sum.code, floats(residual), sum.aStrides, floats(bias), sum.bStrides, out, sum.indexShape,
                          Int32(sum.indexShape.count))
        } else if let residual {
            out.update(from: floats(residual), count: rows * outFeatures)
        } else if let bias {
            let b = floats(bias)
            for r in 0..<rows { (out + r * outFeatures).update(from: b, count: outFeatures) }
        }
        try check(ck_gemm_mixed(0, 1, Int64(rows), Int64(outFeatures), Int64(inFeatures), 1, floats(x), DType.f32.kernelCode,
                                Int64(inFeatures), pointer(weight), weight.dtype.kernelCode, Int64(inFeatures),
                                bias == nil && residual == nil ? 0 : 1, out, Int64(outFeatures)), "linear")
        return y
    }

    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D) throws -> Tensor {
        try conv2d(x, weight: weight, bias: bias, stride: stride, padding: padding, residual: nil)
    }

    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D,
                       residual: Tensor?) throws -> Tensor {
        try f32("conv2d", x, bias, residual)
        try f32OrHalfWeight("conv2d", weight)
        var plan = try ShapeRules.conv2d(x, weight: weight, bias: bias, stride: stride, padding: padding)
        try ShapeRules.requireResidual(residual, plan.outputShape, "conv2d")
        let y = try empty(plan.outputShape, .f32)
        let workspace = try conv2dWorkspace(&plan.params)
        try check(ck_conv2d_f32(&plan.params, floats(x), pointer(weight), weight.dtype.kernelCode, bias.map(floats),
                                residual.map(floats), floats(y), workspace?.pointer.assumingMemoryBound(to: Float.self)), "conv2d")
        return y
    }

    public func groupNorm(_ x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?, eps: Float, fuseSiLU: Bool) throws -> Tensor {
        try f32("groupNorm", x, weight, bias)
        let (batch, channels, spatial) = try ShapeRules.groupNorm(x, groups: groups, weight: weight, bias: bias, op: "groupNorm")
        let y = try empty(x.shape, .f32)
        ck_group_norm_f32(floats(x), weight.map(floats), bias.map(floats), floats(y), Int64(batch),
                          Int64(channels), Int64(spatial), Int64(groups), eps, fuseSiLU ? 1 : 0)
        return y
    }

    public func layerNorm(_ x: Tensor, weight: Tensor?, bias: Tensor?, eps: Float) throws -> Tensor {
        try f32("layerNorm", x, weight, bias)
        let (rows, width) = try ShapeRules.layerNorm(x, weight: weight, bias: bias, op: "layerNorm")
        let y = try empty(x.shape, .f32)
        ck_layer_norm_f32(floats(x), weight.map(floats), bias.map(floats), floats(y), Int64(rows), Int64(width), eps)
        return y
    }

    public func softmax(_ x: Tensor) throws -> Tensor {
        try f32("softmax", x)
        let (rows, width) = try ShapeRules.rows(x, "softmax", "input")
        let y = try empty(x.shape, .f32)
        ck_softmax_f32(floats(x), floats(y), Int64(rows), Int64(width))
        return y
    }

    public func attention(q: Tensor, k: Tensor, v: Tensor, heads: Int, mask: Tensor?, causal: Bool, scale: Float?) throws -> Tensor {
        try f32("attention", q, k, v, mask)
        var plan = try ShapeRules.attention(q: q, k: k, v: v, heads: heads, mask: mask, causal: causal, scale: scale)
        let y = try empty(plan.outputShape, .f32)
        plan.params.q = UnsafePointer(floats(q)); plan.params.k = UnsafePointer(floats(k)); plan.params.v = UnsafePointer(floats(v))
        plan.params.out = floats(y)
        plan.params.mask = mask.map { UnsafePointer(floats($0)) }
        ck_attention_f32(&plan.params)
        return y
    }

    public func activation(_ x: Tensor, _ kind: Activation) throws -> Tensor {
        try f32("activation", x)
        let y = try empty(x.shape, .f32)
        ck_activation_f32(kind.kernelCode, floats(x), floats(y), Int64(x.count))
        return y
    }

    public func geglu(_ x: Tensor) throws -> Tensor {
        try f32("geglu", x)
        let plan = try ShapeRules.geglu(x)
        let y = try empty(plan.outputShape, .f32)
        ck_geglu_f32(floats(x), floats(y), Int64(plan.rows), Int64(plan.width))
        return y
    }

    public func binary(_ op: BinaryOp, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        try f32("binary", a, b)
        let plan = try ShapeRules.binary(op, a, b)
        let y = try empty(plan.outputShape, .f32)
        if y.count == 0 { return y }
        ck_binary_f32(plan.code, floats(a), plan.aStrides, floats(b), plan.bStrides, floats(y), plan.indexShape, Int32(plan.indexShape.count))
        return y
    }

    public func affine(_ x: Tensor, scale: Float, shift: Float) throws -> Tensor {
        try f32("affine", x)
        let y = try empty(x.shape, .f32)
        ck_affine_f32(floats(x), floats(y), Int64(x.count), scale, shift)
        return y
    }

    public func upsampleNearest2x(_ x: Tensor) throws -> Tensor {
        try f32("upsampleNearest2x", x)
        let plan = try ShapeRules.upsampleNearest2x(x)
        let y = try empty(plan.outputShape, .f32)
        ck_upsample_nearest2x_f32(floats(x), floats(y), Int64(plan.planes), Int64(plan.height), Int64(plan.width))
        return y
    }

    public func embedding(_ ids: Tensor, table: Tensor) throws -> Tensor {
        try own(ids, "embedding")
        try f32("embedding", table)
        let y = try empty(ShapeRules.embedding(ids, table: table), .f32)
        let status = ck_embedding_f32(pointer(ids), ids.dtype == .i64 ? 1 : 0, Int64(ids.count), floats(table),
                                      Int64(table.shape[0]), Int64(table.shape[1]), floats(y))
        guard status == CK_OK else {
            throw PEAError.backend("embedding: a token id is outside the vocabulary of \(table.shape[0]) entries", kind: .invalidArgument)
        }
        return y
    }

    public func timestepEmbedding(_ t: Tensor, dim: Int, flipSinToCos: Bool, downscaleFreqShift: Float,
                                  scale: Float, maxPeriod: Float) throws -> Tensor {
        try own(t, "timestepEmbedding")
        let outputShape = try ShapeRules.timestepEmbedding(t, dim: dim)
        let times = t.dtype == .f32 ? t : try cast(t, to: .f32)
        let y = try empty(outputShape, .f32)
        ck_timestep_embedding_f32(floats(times), Int64(t.shape[0]), Int64(dim), flipSinToCos ? 1 : 0,
                                  downscaleFreqShift, scale, maxPeriod, floats(y))
        return y
    }

    public func mean(_ x: Tensor, dim: Int, keepDim: Bool) throws -> Tensor {
        try f32("mean", x)
        let plan = try ShapeRules.mean(x, dim: dim, keepDim: keepDim)
        let y = try empty(plan.outputShape, .f32)
        ck_mean_f32(floats(x), floats(y), Int64(plan.outer), Int64(plan.count), Int64(plan.inner))
        return y
    }

    // MARK: helpers

    func empty(_ shape: [Int], _ dtype: DType) throws -> Tensor {
        guard shape.allSatisfy({ $0 >= 0 }) else { throw PEAError.shapeMismatch("negative dimension in \(shape)") }
        let storage = try CPUStorage(byteCount: shape.reduce(1, *) * dtype.byteSize)
        return Tensor(shape: shape, dtype: dtype, storage: storage, backend: self)
    }

    func own(_ x: Tensor, _ op: String) throws {
        // Any CPUBackend instance may use another's tensors: they all live in host memory.
        guard x.storage is CPUStorage else {
            throw PEAError.unsupported("\(op): a tensor of backend '\(x.backend.name)' is not in host memory; download it first")
        }
    }

    /// Every tensor given is on this backend and f32 (the CPU computes in f32 only).
    func f32(_ op: String, _ tensors: Tensor?...) throws {
        for case let t? in tensors {
            try own(t, op)
            guard t.dtype == .f32 else {
                throw PEAError.unsupported("\(op): the cpu backend computes in f32, got a \(t.dtype) tensor; cast it first")
            }
        }
    }

    /// A weight on this backend in f32, or in f16/bf16 (half-size weights, widened as the GEMM packs them).
    func f32OrHalfWeight(_ op: String, _ weight: Tensor) throws {
        try own(weight, op)
        guard weight.dtype == .f32 || weight.dtype == .f16 || weight.dtype == .bf16 else {
            throw PEAError.unsupported("\(op): the cpu backend takes f32, f16 or bf16 weights, got \(weight.dtype)")
        }
    }

    /// A kernel's status as an error: only running out of memory (for a widening buffer) is expected.
    func check(_ status: Int32, _ op: String) throws {
        guard status == CK_OK else {
            throw PEAError.backend("cpu: \(op): " + (status == CK_ENOMEM ? "out of memory" : "invalid argument (status \(status))"),
                                   kind: status == CK_ENOMEM ? .outOfMemory : .invalidArgument)
        }
    }

    /// The im2col scratch a convolution plan needs (nil when its kernel needs none).
    func conv2dWorkspace(_ params: inout ck_conv2d_params) throws -> CPUStorage? {
        let count = Int(ck_conv2d_workspace_floats(&params))
        return count > 0 ? try CPUStorage(byteCount: count * 4) : nil
    }

    func pointer(_ x: Tensor) -> UnsafeMutableRawPointer { (x.storage as! CPUStorage).pointer }
    func floats(_ x: Tensor) -> UnsafeMutablePointer<Float> { pointer(x).assumingMemoryBound(to: Float.self) }

    /// Runs one strided copy of a data-movement plan (concat, split and permute: DataMovement.swift).
    func copy(_ copy: ShapeRules.StridedCopy, from source: Tensor, to destination: Tensor, _ op: String) {
        guard !copy.isEmpty else { return }
        let size = source.dtype.byteSize
        ck_copy_strided(pointer(source) + copy.sourceOffset * size, copy.sourceStrides.map(Int64.init),
                        pointer(destination) + copy.destinationOffset * size, copy.destinationStrides.map(Int64.init),
                        copy.shape.map(Int64.init), Int32(copy.shape.count), Int64(size))
    }
}
