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

    init(byteCount: Int) throws {
        if let cached = CPUBufferCache.shared.take(byteCount) {
            pointer = cached
        } else {
            var raw: UnsafeMutableRawPointer?
            guard posix_memalign(&raw, 64, CPUBufferCache.capacity(for: byteCount)) == 0, let raw else {
                throw PEAError.backend("cpu: cannot allocate \(byteCount) bytes")
            }
            pointer = raw
        }
        self.byteCount = byteCount
    }

    deinit {
        if !CPUBufferCache.shared.keep(pointer, byteCount: byteCount) { free(pointer) }
    }
}

/// Freed large host buffers, kept by size for the next tensor of that size. A UNet evaluation allocates and
/// frees the same few activation sizes over and over; without reuse every one of them is a fresh mapping
/// whose pages the kernel faults in and zeroes (measured: about a million page faults per SD1.5 evaluation).
/// The cache holds at most `limit` bytes, so peak memory stays within that of the largest live set plus it.
final class CPUBufferCache: @unchecked Sendable {
    static let shared = CPUBufferCache(limit: 512 << 20)
    /// Below this, malloc's own free lists are fast enough.
    static let smallest = 1 << 20

    private let limit: Int
    private var buffers: [Int: [UnsafeMutableRawPointer]] = [:]
    private var cachedBytes = 0
    private let lock = PThreadLock()

    init(limit: Int) { self.limit = limit }

    /// Buffers are sized in 64 KiB steps so that nearby sizes share them.
    static func capacity(for byteCount: Int) -> Int {
        byteCount < smallest ? max(byteCount, 64) : (byteCount + 0xFFFF) & ~0xFFFF
    }

    func take(_ byteCount: Int) -> UnsafeMutableRawPointer? {
        guard byteCount >= Self.smallest else { return nil }
        let capacity = Self.capacity(for: byteCount)
        return lock.withLock {
            guard let pointer = buffers[capacity]?.popLast() else { return nil }
            cachedBytes -= capacity
            return pointer
        }
    }

    /// Takes `pointer` into the cache, or returns false when it is small or the cache is full.
    func keep(_ pointer: UnsafeMutableRawPointer, byteCount: Int) -> Bool {
        guard byteCount >= Self.smallest else { return false }
        let capacity = Self.capacity(for: byteCount)
        return lock.withLock {
            guard cachedBytes + capacity <= limit else { return false }
            buffers[capacity, default: []].append(pointer)
            cachedBytes += capacity
            return true
        }
    }
}

/// The reference backend: every op runs the C kernels of CKernels/cpu/ on host memory, synchronously,
/// in f32. f16/bf16 tensors can be stored and cast, not computed on.
public final class CPUBackend: ComputeBackend {
    public let name = "cpu"

    /// `threads` ≤ 0 (the default) uses every online CPU. The kernels' thread pool is process-wide.
    public init(threads: Int = 0) {
        if threads > 0 { ck_set_num_threads(Int32(threads)) }
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

    public func supports(_ op: Op, dtype: DType) -> Bool {
        switch op {
        case .cast, .concat, .split, .permute: return true
        case .embedding: return dtype == .i32 || dtype == .i64
        case .timestepEmbedding: return true
        default: return dtype == .f32
        }
    }

    // MARK: ops

    public func cast(_ x: Tensor, to dtype: DType) throws -> Tensor {
        try own(x, "cast")
        let y = try empty(x.shape, dtype)
        let status = ck_convert(pointer(x), x.dtype.kernelCode, pointer(y), dtype.kernelCode, Int64(x.count))
        guard status == CK_OK else { throw PEAError.backend("cpu: cast \(x.dtype) to \(dtype) failed") }
        return y
    }

    public func gemm(_ a: Tensor, _ b: Tensor, transposeA: Bool, transposeB: Bool, alpha: Float, beta: Float,
                     c: Tensor?) throws -> Tensor {
        try f32("gemm", a, b, c)
        if beta != 0, c == nil { throw PEAError.shapeMismatch("gemm: beta is \(beta) but no c was given") }
        let s = try ShapeRules.gemm(a.shape, b.shape, transposeA: transposeA, transposeB: transposeB, c: c?.shape)
        let outShape = (s.aBatched || s.bBatched) ? [s.batch, s.m, s.n] : [s.m, s.n]
        let y = try empty(outShape, .f32)
        if let c, beta != 0 { pointer(y).copyMemory(from: pointer(c), byteCount: y.byteCount) }
        let lda = transposeA ? s.m : s.k, ldb = transposeB ? s.k : s.n
        ck_sgemm_batched(transposeA ? 1 : 0, transposeB ? 1 : 0, Int64(s.m), Int64(s.n), Int64(s.k), alpha,
                         floats(a), Int64(lda), s.aBatched ? Int64(s.m * s.k) : 0,
                         floats(b), Int64(ldb), s.bBatched ? Int64(s.k * s.n) : 0,
                         beta, floats(y), Int64(s.n), Int64(s.m * s.n), Int64(s.batch))
        return y
    }

    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> Tensor {
        try f32("linear", x, weight, bias)
        try ShapeRules.requireRank(weight, 2...2, "linear", "weight")
        guard x.rank >= 1, x.shape.last == weight.shape[1] else {
            throw PEAError.shapeMismatch("linear: input \(x.shape) does not end in the weight's input width \(weight.shape[1])")
        }
        let (outFeatures, inFeatures) = (weight.shape[0], weight.shape[1])
        try ShapeRules.requireShape(bias, [outFeatures], "linear", "bias")
        let rows = x.count / max(inFeatures, 1)
        let y = try empty(Array(x.shape.dropLast()) + [outFeatures], .f32)
        if let bias {
            let out = floats(y), b = floats(bias)
            for r in 0..<rows { (out + r * outFeatures).update(from: b, count: outFeatures) }
        }
        ck_sgemm(0, 1, Int64(rows), Int64(outFeatures), Int64(inFeatures), 1, floats(x), Int64(inFeatures),
                 floats(weight), Int64(inFeatures), bias == nil ? 0 : 1, floats(y), Int64(outFeatures))
        return y
    }

    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D) throws -> Tensor {
        try f32("conv2d", x, weight, bias)
        let outShape = try ShapeRules.conv2dOutput(x.shape, weight: weight.shape, stride: stride, padding: padding)
        try ShapeRules.requireShape(bias, [weight.shape[0]], "conv2d", "bias")
        var params = ck_conv2d_params(
            B: Int64(x.shape[0]), Cin: Int64(x.shape[1]), H: Int64(x.shape[2]), W: Int64(x.shape[3]),
            Cout: Int64(weight.shape[0]), kh: Int64(weight.shape[2]), kw: Int64(weight.shape[3]),
            strideH: Int64(stride.0), strideW: Int64(stride.1),
            padTop: Int64(padding.top), padBottom: Int64(padding.bottom), padLeft: Int64(padding.left), padRight: Int64(padding.right))
        let y = try empty(outShape, .f32)
        let workspaceCount = Int(ck_conv2d_workspace_floats(&params))
        let workspace = workspaceCount > 0 ? try CPUStorage(byteCount: workspaceCount * 4) : nil
        ck_conv2d_f32(&params, floats(x), floats(weight), bias.map(floats), floats(y),
                      workspace?.pointer.assumingMemoryBound(to: Float.self))
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
        try ShapeRules.requireRank(x, 1...8, "softmax", "input")
        let width = x.shape[x.rank - 1]
        let y = try empty(x.shape, .f32)
        ck_softmax_f32(floats(x), floats(y), Int64(x.count / max(width, 1)), Int64(width))
        return y
    }

    public func attention(q: Tensor, k: Tensor, v: Tensor, heads: Int, mask: Tensor?, causal: Bool, scale: Float?) throws -> Tensor {
        try f32("attention", q, k, v, mask)
        let s = try ShapeRules.attention(q: q.shape, k: k.shape, v: v.shape, heads: heads, mask: mask?.shape)
        let y = try empty([s.batch, s.queries, heads * s.valueHeadDim], .f32)
        // Sequence layout [B, T, H·D]: head h of token t starts at t·H·D + h·D.
        var p = ck_attention_params()
        p.q = UnsafePointer(floats(q)); p.k = UnsafePointer(floats(k)); p.v = UnsafePointer(floats(v)); p.out = floats(y)
        p.B = Int64(s.batch); p.H = Int64(heads); p.Tq = Int64(s.queries); p.Tk = Int64(s.keys)
        p.D = Int64(s.headDim); p.Dv = Int64(s.valueHeadDim)
        (p.q_sb, p.q_sh, p.q_st) = (Int64(s.queries * q.shape[2]), Int64(s.headDim), Int64(q.shape[2]))
        (p.k_sb, p.k_sh, p.k_st) = (Int64(s.keys * k.shape[2]), Int64(s.headDim), Int64(k.shape[2]))
        (p.v_sb, p.v_sh, p.v_st) = (Int64(s.keys * v.shape[2]), Int64(s.valueHeadDim), Int64(v.shape[2]))
        (p.o_sb, p.o_sh, p.o_st) = (Int64(s.queries * y.shape[2]), Int64(s.valueHeadDim), Int64(y.shape[2]))
        if let mask {
            let strides = ShapeRules.broadcastStrides(mask.shape, to: [s.batch, heads, s.queries, s.keys])
            p.mask = UnsafePointer(floats(mask))
            (p.m_sb, p.m_sh, p.m_st) = (Int64(strides[0]), Int64(strides[1]), Int64(strides[2]))
        }
        p.scale = scale ?? 1 / Float(s.headDim).squareRoot()
        p.causal = causal ? 1 : 0
        ck_attention_f32(&p)
        return y
    }

    public func activation(_ x: Tensor, _ kind: Activation) throws -> Tensor {
        try f32("activation", x)
        let y = try empty(x.shape, .f32)
        let n = Int64(x.count)
        switch kind {
        case .gelu: ck_gelu_f32(floats(x), floats(y), n, Int32(CK_GELU_ERF))
        case .geluTanh: ck_gelu_f32(floats(x), floats(y), n, Int32(CK_GELU_TANH))
        case .quickGELU: ck_quick_gelu_f32(floats(x), floats(y), n)
        case .silu: ck_silu_f32(floats(x), floats(y), n)
        }
        return y
    }

    public func geglu(_ x: Tensor) throws -> Tensor {
        try f32("geglu", x)
        guard x.rank >= 1, x.shape[x.rank - 1] % 2 == 0 else {
            throw PEAError.shapeMismatch("geglu: the last dimension of \(x.shape) must be even")
        }
        let width = x.shape[x.rank - 1] / 2
        let y = try empty(Array(x.shape.dropLast()) + [width], .f32)
        ck_geglu_f32(floats(x), floats(y), Int64(y.count / max(width, 1)), Int64(width))
        return y
    }

    public func binary(_ op: BinaryOp, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        try f32("binary", a, b)
        let shape = try ShapeRules.broadcast(a.shape, b.shape, op: op.rawValue)
        guard shape.count <= Int(CK_MAX_RANK) else { throw PEAError.unsupported("\(op.rawValue): rank above \(CK_MAX_RANK)") }
        let y = try empty(shape, .f32)
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
        ck_binary_f32(code, floats(a), aStrides, floats(b), bStrides, floats(y), indexShape.map(Int64.init), Int32(indexShape.count))
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
        try ShapeRules.requireRank(x, 4...4, "upsampleNearest2x", "input")
        let y = try empty([x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3]], .f32)
        ck_upsample_nearest2x_f32(floats(x), floats(y), Int64(x.shape[0] * x.shape[1]), Int64(x.shape[2]), Int64(x.shape[3]))
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
            copyBlock(from: t, sourceOffset: 0, sourceShape: t.shape, to: y, destinationOffset: offset, axis: axis)
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
            copyBlock(from: x, sourceOffset: offset, sourceShape: x.shape, to: part, destinationOffset: 0, axis: axis, blockShape: shape)
            offset += size
            return part
        }
    }

    public func permute(_ x: Tensor, _ dims: [Int]) throws -> Tensor {
        try own(x, "permute")
        let axes = try ShapeRules.permute(x.shape, dims)
        let shape = axes.map { x.shape[$0] }
        let y = try empty(shape, x.dtype)
        if y.count == 0 || x.rank == 0 {
            if x.rank == 0 { pointer(y).copyMemory(from: pointer(x), byteCount: x.byteCount) }
            return y
        }
        let sourceStrides = ShapeRules.strides(x.shape)
        try stridedCopy(from: pointer(x), strides: axes.map { sourceStrides[$0] }, to: pointer(y),
                        strides: ShapeRules.strides(shape), shape: shape, elementSize: x.dtype.byteSize)
        return y
    }

    public func embedding(_ ids: Tensor, table: Tensor) throws -> Tensor {
        try own(ids, "embedding")
        try f32("embedding", table)
        guard ids.dtype == .i32 || ids.dtype == .i64 else {
            throw PEAError.shapeMismatch("embedding: ids must be i32 or i64, got \(ids.dtype)")
        }
        try ShapeRules.requireRank(table, 2...2, "embedding", "table")
        let y = try empty(ids.shape + [table.shape[1]], .f32)
        let status = ck_embedding_f32(pointer(ids), ids.dtype == .i64 ? 1 : 0, Int64(ids.count), floats(table),
                                      Int64(table.shape[0]), Int64(table.shape[1]), floats(y))
        guard status == CK_OK else {
            throw PEAError.backend("embedding: a token id is outside the vocabulary of \(table.shape[0]) entries")
        }
        return y
    }

    public func timestepEmbedding(_ t: Tensor, dim: Int, flipSinToCos: Bool, downscaleFreqShift: Float,
                                  scale: Float, maxPeriod: Float) throws -> Tensor {
        try own(t, "timestepEmbedding")
        try ShapeRules.requireRank(t, 1...1, "timestepEmbedding", "timesteps")
        guard dim > 0 else { throw PEAError.shapeMismatch("timestepEmbedding: dim must be positive, got \(dim)") }
        let times = t.dtype == .f32 ? t : try cast(t, to: .f32)
        let y = try empty([t.shape[0], dim], .f32)
        ck_timestep_embedding_f32(floats(times), Int64(t.shape[0]), Int64(dim), flipSinToCos ? 1 : 0,
                                  downscaleFreqShift, scale, maxPeriod, floats(y))
        return y
    }

    public func mean(_ x: Tensor, dim: Int, keepDim: Bool) throws -> Tensor {
        try f32("mean", x)
        let axis = try ShapeRules.axis(dim, rank: x.rank, op: "mean")
        var shape = x.shape
        if keepDim { shape[axis] = 1 } else { shape.remove(at: axis) }
        let y = try empty(shape, .f32)
        let outer = x.shape[..<axis].reduce(1, *), inner = x.shape[(axis + 1)...].reduce(1, *)
        ck_mean_f32(floats(x), floats(y), Int64(outer), Int64(x.shape[axis]), Int64(inner))
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

    func pointer(_ x: Tensor) -> UnsafeMutableRawPointer { (x.storage as! CPUStorage).pointer }
    func floats(_ x: Tensor) -> UnsafeMutablePointer<Float> { pointer(x).assumingMemoryBound(to: Float.self) }

    /// Copies the block of `source` that starts at `sourceOffset` along `axis` and has `blockShape` (default:
    /// the source's shape) into `destination` starting at `destinationOffset` along the same axis.
    private func copyBlock(from source: Tensor, sourceOffset: Int, sourceShape: [Int], to destination: Tensor,
                           destinationOffset: Int, axis: Int, blockShape: [Int]? = nil) {
        let shape = blockShape ?? sourceShape
        guard shape.reduce(1, *) > 0 else { return }
        let sourceStrides = ShapeRules.strides(sourceShape), destinationStrides = ShapeRules.strides(destination.shape)
        let size = source.dtype.byteSize
        let src = pointer(source) + sourceOffset * sourceStrides[axis] * size
        let dst = pointer(destination) + destinationOffset * destinationStrides[axis] * size
        try! stridedCopy(from: src, strides: sourceStrides, to: dst, strides: destinationStrides, shape: shape, elementSize: size)
    }

    private func stridedCopy(from source: UnsafeRawPointer, strides sourceStrides: [Int], to destination: UnsafeMutableRawPointer,
                             strides destinationStrides: [Int], shape: [Int], elementSize: Int) throws {
        guard shape.count <= Int(CK_MAX_RANK) else { throw PEAError.unsupported("strided copy: rank above \(CK_MAX_RANK)") }
        ck_copy_strided(source, sourceStrides.map(Int64.init), destination, destinationStrides.map(Int64.init),
                        shape.map(Int64.init), Int32(shape.count), Int64(elementSize))
    }
}
