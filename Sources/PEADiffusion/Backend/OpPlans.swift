import CKernels

// Op plans: for each op with kernel parameters, the rule that validates its arguments also works out what the
// kernels need — the output shape and the C parameter struct or extents — so every backend executes the same
// plan and none builds kernel parameters of its own. A backend checks only what is its own business (where
// the tensors live, which dtypes it computes in), then runs the plan. Errors are `PEAError.shapeMismatch`
// naming the op, as in ShapeRules.

extension ShapeRules {
    // MARK: linear algebra

    /// alpha · op(a) · op(b) + beta · c as one batched GEMM over row-major buffers.
    public struct GEMMPlan {
        public var shape: GEMMShape
        public var outputShape: [Int]
        /// Leading dimensions of a, b and the output as stored.
        public var lda, ldb, ldc: Int
        /// Element distance between batch entries (0: the operand is shared by every entry).
        public var batchStrideA, batchStrideB, batchStrideC: Int
        /// beta ≠ 0 with a c: the output starts as a copy of c.
        public var readsC: Bool
    }

    public static func gemm(_ a: Tensor, _ b: Tensor, transposeA: Bool, transposeB: Bool, beta: Float, c: Tensor?) throws -> GEMMPlan {
        if beta != 0, c == nil { throw PEAError.shapeMismatch("gemm: beta is \(beta) but no c was given") }
        let s = try gemm(a.shape, b.shape, transposeA: transposeA, transposeB: transposeB, c: c?.shape)
        return GEMMPlan(shape: s, outputShape: (s.aBatched || s.bBatched) ? [s.batch, s.m, s.n] : [s.m, s.n],
                        lda: transposeA ? s.m : s.k, ldb: transposeB ? s.k : s.n, ldc: s.n,
                        batchStrideA: s.aBatched ? s.m * s.k : 0, batchStrideB: s.bBatched ? s.k * s.n : 0,
                        batchStrideC: s.m * s.n, readsC: c != nil && beta != 0)
    }

    /// torch.nn.Linear: x [..., in] · weightᵀ + bias as `rows` rows of `inFeatures`.
    public struct LinearPlan {
        public var outputShape: [Int]
        public var rows, inFeatures, outFeatures: Int
    }

    public static func linear(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> LinearPlan {
        try requireRank(weight, 2...2, "linear", "weight")
        guard x.rank >= 1, x.shape.last == weight.shape[1] else {
            throw PEAError.shapeMismatch("linear: input \(x.shape) does not end in the weight's input width \(weight.shape[1])")
        }
        let (outFeatures, inFeatures) = (weight.shape[0], weight.shape[1])
        try requireShape(bias, [outFeatures], "linear", "bias")
        return LinearPlan(outputShape: Array(x.shape.dropLast()) + [outFeatures], rows: x.count / max(inFeatures, 1),
                          inFeatures: inFeatures, outFeatures: outFeatures)
    }

    // MARK: convolution

    /// A convolution's kernel parameters and the shape of the tensor the kernel writes (the output for the
    /// forward op, the input gradient for the backward one).
    public struct Conv2DPlan {
        public var outputShape: [Int]
        public var params: ck_conv2d_params
    }

    static func conv2dParams(input x: [Int], weight: [Int], stride: (Int, Int), padding: Padding2D) -> ck_conv2d_params {
        ck_conv2d_params(
            B: Int64(x[0]), Cin: Int64(x[1]), H: Int64(x[2]), W: Int64(x[3]),
            Cout: Int64(weight[0]), kh: Int64(weight[2]), kw: Int64(weight[3]),
            strideH: Int64(stride.0), strideW: Int64(stride.1),
            padTop: Int64(padding.top), padBottom: Int64(padding.bottom), padLeft: Int64(padding.left), padRight: Int64(padding.right))
    }

    public static func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D) throws -> Conv2DPlan {
        let outputShape = try conv2dOutput(x.shape, weight: weight.shape, stride: stride, padding: padding)
        try requireShape(bias, [weight.shape[0]], "conv2d", "bias")
        return Conv2DPlan(outputShape: outputShape, params: conv2dParams(input: x.shape, weight: weight.shape, stride: stride, padding: padding))
    }

    /// The data gradient of a convolution whose input had `inputShape`: the kernel writes that shape.
    public static func conv2dBackwardData(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int], stride: (Int, Int),
                                          padding: Padding2D) throws -> Conv2DPlan {
        let op = "conv2dBackwardData"
        let outShape = try backward(op) { try conv2dOutput(inputShape, weight: weight.shape, stride: stride, padding: padding) }
        try requireGradOutput(gradOutput, outShape, op)
        return Conv2DPlan(outputShape: inputShape, params: conv2dParams(input: inputShape, weight: weight.shape, stride: stride, padding: padding))
    }

    // MARK: attention

    /// Attention's kernel parameters without the data pointers (the backend sets q, k, v, out and mask to its
    /// buffers): extents, the element strides of the [B, T, H·D] sequence layout (head h of token t starts at
    /// t·H·D + h·D), the mask's broadcast strides, the scale and causality.
    public struct AttentionPlan {
        public var shape: AttentionShape
        public var outputShape: [Int]
        public var params: ck_attention_params
    }

    public static func attention(q: Tensor, k: Tensor, v: Tensor, heads: Int, mask: Tensor?, causal: Bool, scale: Float?) throws -> AttentionPlan {
        let s = try attention(q: q.shape, k: k.shape, v: v.shape, heads: heads, mask: mask?.shape)
        let outWidth = heads * s.valueHeadDim
        var p = ck_attention_params()
        p.B = Int64(s.batch); p.H = Int64(heads); p.Tq = Int64(s.queries); p.Tk = Int64(s.keys)
        p.D = Int64(s.headDim); p.Dv = Int64(s.valueHeadDim)
        (p.q_sb, p.q_sh, p.q_st) = (Int64(s.queries * q.shape[2]), Int64(s.headDim), Int64(q.shape[2]))
        (p.k_sb, p.k_sh, p.k_st) = (Int64(s.keys * k.shape[2]), Int64(s.headDim), Int64(k.shape[2]))
        (p.v_sb, p.v_sh, p.v_st) = (Int64(s.keys * v.shape[2]), Int64(s.valueHeadDim), Int64(v.shape[2]))
        (p.o_sb, p.o_sh, p.o_st) = (Int64(s.queries * outWidth), Int64(s.valueHeadDim), Int64(outWidth))
        if let mask {
            let strides = broadcastStrides(mask.shape, to: [s.batch, heads, s.queries, s.keys])
            (p.m_sb, p.m_sh, p.m_st) = (Int64(strides[0]), Int64(strides[1]), Int64(strides[2]))
        }
        p.scale = scale ?? 1 / Float(s.headDim).squareRoot()
        p.causal = causal ? 1 : 0
        return AttentionPlan(shape: s, outputShape: [s.batch, s.queries, outWidth], params: p)
    }

    // MARK: row-wise ops

    /// An op over the last dimension of x: the number of rows and their width.
    public static func rows(_ x: Tensor, _ op: String, _ name: String) throws -> (rows: Int, width: Int) {
        try requireRank(x, 1...8, op, name)
        let width = x.shape[x.rank - 1]
        return (x.count / max(width, 1), width)
    }

    public static func softmaxBackward(_ gradOutput: Tensor, output y: Tensor) throws -> (rows: Int, width: Int) {
        let plan = try rows(y, "softmaxBackward", "output")
        try requireGradOutput(gradOutput, y.shape, "softmaxBackward")
        return plan
    }

    /// GEGLU halves the last dimension: x [..., 2D] → [..., D] as `rows` rows of width D.
    public struct GEGLUPlan {
        public var outputShape: [Int]
        public var rows, width: Int
    }

    public static func geglu(_ x: Tensor, op: String = "geglu") throws -> GEGLUPlan {
        guard x.rank >= 1, x.shape[x.rank - 1] % 2 == 0 else {
            throw PEAError.shapeMismatch("\(op): the last dimension of \(x.shape) must be even")
        }
        let width = x.shape[x.rank - 1] / 2
        let outputShape = Array(x.shape.dropLast()) + [width]
        return GEGLUPlan(outputShape: outputShape, rows: outputShape.reduce(1, *) / max(width, 1), width: width)
    }

    public static func gegluBackward(_ gradOutput: Tensor, input x: Tensor) throws -> GEGLUPlan {
        let plan = try geglu(x, op: "gegluBackward")
        try requireGradOutput(gradOutput, plan.outputShape, "gegluBackward")
        return plan
    }

    public static func groupNormBackward(_ gradOutput: Tensor, input x: Tensor, groups: Int, weight: Tensor?,
                                         bias: Tensor?) throws -> (batch: Int, channels: Int, spatial: Int) {
        let plan = try groupNorm(x, groups: groups, weight: weight, bias: bias, op: "groupNormBackward")
        try requireGradOutput(gradOutput, x.shape, "groupNormBackward")
        return plan
    }

    public static func layerNormBackward(_ gradOutput: Tensor, input x: Tensor, weight: Tensor?) throws -> (rows: Int, width: Int) {
        let plan = try layerNorm(x, weight: weight, bias: nil, op: "layerNormBackward")
        try requireGradOutput(gradOutput, x.shape, "layerNormBackward")
        return plan
    }

    // MARK: elementwise

    /// a ⊕ b broadcast: the kernel walks `indexShape` (the output's shape, [1] for a scalar) reading each
    /// operand through its broadcast strides.
    public struct BinaryPlan {
        public var outputShape: [Int]
        public var indexShape: [Int64]
        public var aStrides, bStrides: [Int64]
        /// The op's kernel code (`BinaryOp.kernelCode`: CK_ADD …; pea_cuda.h takes the same codes).
        public var code: Int32
    }

    public static func binary(_ op: BinaryOp, _ a: Tensor, _ b: Tensor) throws -> BinaryPlan {
        let shape = try broadcast(a.shape, b.shape, op: op.rawValue)
        guard shape.count <= Int(CK_MAX_RANK) else { throw PEAError.unsupported("\(op.rawValue): rank above \(CK_MAX_RANK)") }
        let indexShape = shape.isEmpty ? [1] : shape
        return BinaryPlan(outputShape: shape, indexShape: indexShape.map(Int64.init),
                          aStrides: broadcastStrides(a.shape, to: indexShape).map(Int64.init),
                          bStrides: broadcastStrides(b.shape, to: indexShape).map(Int64.init), code: op.kernelCode)
    }

    public static func activationBackward(_ gradOutput: Tensor, input x: Tensor, _ kind: Activation) throws {
        try requireGradOutput(gradOutput, x.shape, "activationBackward")
        guard kind.hasBackward else {
            throw PEAError.unsupported("activationBackward: \(kind.rawValue) has no backward (the UNet does not use it)")
        }
    }

    // MARK: resampling

    /// Nearest 2× upsampling of `planes` = B·C planes of height × width (the smaller side: the forward's input,
    /// the backward's output).
    public struct UpsamplePlan {
        public var outputShape: [Int]
        public var planes, height, width: Int
    }

    public static func upsampleNearest2x(_ x: Tensor) throws -> UpsamplePlan {
        try requireRank(x, 4...4, "upsampleNearest2x", "input")
        let s = x.shape
        return UpsamplePlan(outputShape: [s[0], s[1], 2 * s[2], 2 * s[3]], planes: s[0] * s[1], height: s[2], width: s[3])
    }

    public static func upsampleNearest2xBackward(_ gradOutput: Tensor) throws -> UpsamplePlan {
        let op = "upsampleNearest2xBackward"
        try requireRank(gradOutput, 4...4, op, "gradOutput")
        let s = gradOutput.shape
        guard s[2] % 2 == 0, s[3] % 2 == 0 else {
            throw PEAError.shapeMismatch("\(op): gradOutput \(s) is not the output of a 2× upsampling (odd height or width)")
        }
        return UpsamplePlan(outputShape: [s[0], s[1], s[2] / 2, s[3] / 2], planes: s[0] * s[1], height: s[2] / 2, width: s[3] / 2)
    }

    // MARK: lookups and reductions

    /// table [V, D] rows picked by ids → [ids.shape…, D].
    public static func embedding(_ ids: Tensor, table: Tensor) throws -> [Int] {
        guard ids.dtype == .i32 || ids.dtype == .i64 else {
            throw PEAError.shapeMismatch("embedding: ids must be i32 or i64, got \(ids.dtype)")
        }
        try requireRank(table, 2...2, "embedding", "table")
        return ids.shape + [table.shape[1]]
    }

    /// t [B] → [B, dim].
    public static func timestepEmbedding(_ t: Tensor, dim: Int) throws -> [Int] {
        try requireRank(t, 1...1, "timestepEmbedding", "timesteps")
        guard dim > 0 else { throw PEAError.shapeMismatch("timestepEmbedding: dim must be positive, got \(dim)") }
        return [t.shape[0], dim]
    }

    /// The mean over one axis as [outer, count, inner] (row-major around the axis).
    public struct MeanPlan {
        public var outputShape: [Int]
        public var outer, count, inner: Int
    }

    public static func mean(_ x: Tensor, dim: Int, keepDim: Bool) throws -> MeanPlan {
        let axis = try axis(dim, rank: x.rank, op: "mean")
        var shape = x.shape
        if keepDim { shape[axis] = 1 } else { shape.remove(at: axis) }
        return MeanPlan(outputShape: shape, outer: x.shape[..<axis].reduce(1, *), count: x.shape[axis],
                        inner: x.shape[(axis + 1)...].reduce(1, *))
    }

    // MARK: data movement

    /// One strided copy of a data-movement op: for every index i of `shape`, the element at
    /// sourceOffset + i·sourceStrides goes to destinationOffset + i·destinationStrides (in elements; a rank-0
    /// tensor is copied as shape [1]). ck_copy_strided / pea_cuda_copy_strided run it.
    public struct StridedCopy {
        public var shape: [Int]
        public var sourceOffset: Int
        public var sourceStrides: [Int]
        public var destinationOffset: Int
        public var destinationStrides: [Int]
        public var isEmpty: Bool { shape.contains(0) }

        init(_ op: String, shape: [Int], sourceOffset: Int = 0, sourceStrides: [Int], destinationOffset: Int = 0,
             destinationStrides: [Int]) throws {
            guard shape.count <= Int(CK_MAX_RANK) else { throw PEAError.unsupported("\(op): rank above \(CK_MAX_RANK)") }
            let scalar = shape.isEmpty
            self.shape = scalar ? [1] : shape
            self.sourceOffset = sourceOffset
            self.sourceStrides = scalar ? [1] : sourceStrides
            self.destinationOffset = destinationOffset
            self.destinationStrides = scalar ? [1] : destinationStrides
        }
    }

    /// concat: copy i puts input i in its slot of the output.
    public static func concat(_ tensors: [Tensor], dim: Int) throws -> (outputShape: [Int], copies: [StridedCopy]) {
        let (axis, shape) = try concat(tensors.map(\.shape), dim: dim)
        guard tensors.allSatisfy({ $0.dtype == tensors[0].dtype }) else { throw PEAError.shapeMismatch("concat: tensors of different dtypes") }
        let outputStrides = strides(shape)
        var offset = 0
        let copies = try tensors.map { t in
            defer { offset += t.shape[axis] }
            return try StridedCopy("concat", shape: t.shape, sourceStrides: strides(t.shape),
                                   destinationOffset: offset * outputStrides[axis], destinationStrides: outputStrides)
        }
        return (shape, copies)
    }

    /// split: copy i fills output i from its slot of the input.
    public static func split(_ x: Tensor, sizes: [Int], dim: Int) throws -> (outputShapes: [[Int]], copies: [StridedCopy]) {
        let axis = try split(x.shape, sizes: sizes, dim: dim)
        let inputStrides = strides(x.shape)
        var offset = 0
        var shapes: [[Int]] = [], copies: [StridedCopy] = []
        for size in sizes {
            var shape = x.shape
            shape[axis] = size
            shapes.append(shape)
            copies.append(try StridedCopy("split", shape: shape, sourceOffset: offset * inputStrides[axis], sourceStrides: inputStrides,
                                          destinationStrides: strides(shape)))
            offset += size
        }
        return (shapes, copies)
    }

    /// x.permute(dims).contiguous(): the input read with its strides permuted.
    public static func permute(_ x: Tensor, _ dims: [Int]) throws -> (outputShape: [Int], copy: StridedCopy) {
        let axes = try permute(x.shape, dims)
        let shape = axes.map { x.shape[$0] }
        let inputStrides = strides(x.shape)
        return (shape, try StridedCopy("permute", shape: shape, sourceStrides: axes.map { inputStrides[$0] }, destinationStrides: strides(shape)))
    }
}
