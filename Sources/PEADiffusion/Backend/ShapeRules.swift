/// What each op accepts and what shape it returns, shared by every backend so that they agree on what is
/// legal and fail with the same message. Each rule throws `PEAError.shapeMismatch` naming the op. The op
/// plans built on these rules (what the kernels are called with) are in OpPlans.swift.
public enum ShapeRules {
    /// Row-major element strides of a contiguous tensor.
    public static func strides(_ shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        var running = 1
        for axis in stride(from: shape.count - 1, through: 0, by: -1) {
            strides[axis] = running
            running *= shape[axis]
        }
        return strides
    }

    /// A torch-style dimension (negative counts from the end) as an index in 0..<rank.
    public static func axis(_ dim: Int, rank: Int, op: String) throws -> Int {
        let axis = dim < 0 ? dim + rank : dim
        guard axis >= 0, axis < rank else {
            throw PEAError.shapeMismatch("\(op): dimension \(dim) out of range for a tensor of rank \(rank)")
        }
        return axis
    }

    public static func requireRank(_ x: Tensor, _ ranks: ClosedRange<Int>, _ op: String, _ name: String) throws {
        guard ranks.contains(x.rank) else {
            let expected = ranks.lowerBound == ranks.upperBound ? "\(ranks.lowerBound)" : "\(ranks.lowerBound)...\(ranks.upperBound)"
            throw PEAError.shapeMismatch("\(op): \(name) must have rank \(expected), got \(x.shape)")
        }
    }

    public static func requireShape(_ x: Tensor?, _ shape: [Int], _ op: String, _ name: String) throws {
        guard let x else { return }
        guard x.shape == shape else {
            throw PEAError.shapeMismatch("\(op): \(name) must have shape \(shape), got \(x.shape)")
        }
    }

    /// An AdamW step: the moments and the gradient shaped like the parameter.
    public static func adamw(parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor, gradient: Tensor) throws {
        for (tensor, name) in [(firstMoment, "firstMoment"), (secondMoment, "secondMoment"), (gradient, "gradient")] {
            try requireShape(tensor, parameter.shape, "adamw", name)
        }
    }

    /// Group norm of x [B, C, …] in `groups` groups of channels with optional per-channel weight and bias
    /// (forward and backward alike): B, C and the product of the dimensions after C.
    public static func groupNorm(_ x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?, op: String) throws
        -> (batch: Int, channels: Int, spatial: Int) {
        try requireRank(x, 2...8, op, "input")
        let channels = x.shape[1]
        guard groups > 0, channels % groups == 0 else {
            throw PEAError.shapeMismatch("\(op): \(channels) channels cannot be split into \(groups) groups")
        }
        try requireShape(weight, [channels], op, "weight")
        try requireShape(bias, [channels], op, "bias")
        return (x.shape[0], channels, x.shape.dropFirst(2).reduce(1, *))
    }

    /// Layer norm of x over its last dimension with optional weight and bias of that width (forward and
    /// backward alike): the number of rows and the width.
    public static func layerNorm(_ x: Tensor, weight: Tensor?, bias: Tensor?, op: String) throws -> (rows: Int, width: Int) {
        try requireRank(x, 1...8, op, "input")
        let width = x.shape[x.rank - 1]
        try requireShape(weight, [width], op, "weight")
        try requireShape(bias, [width], op, "bias")
        return (x.count / max(width, 1), width)
    }

    /// torch broadcasting: shapes aligned at the right, each pair of sizes equal or one of them 1.
    public static func broadcast(_ a: [Int], _ b: [Int], op: String) throws -> [Int] {
        let rank = max(a.count, b.count)
        let pa = [Int](repeating: 1, count: rank - a.count) + a
        let pb = [Int](repeating: 1, count: rank - b.count) + b
        return try zip(pa, pb).map { x, y in
            if x == y || y == 1 { return x }
            if x == 1 { return y }
            throw PEAError.shapeMismatch("\(op): shapes \(a) and \(b) do not broadcast")
        }
    }

    /// Element strides that read a contiguous tensor of `shape` as if broadcast to `target` (0 on broadcast axes).
    public static func broadcastStrides(_ shape: [Int], to target: [Int]) -> [Int] {
        let padded = [Int](repeating: 1, count: target.count - shape.count) + shape
        let own = strides(padded)
        return padded.indices.map { padded[$0] == 1 ? 0 : own[$0] }
    }

    public struct GEMMShape: Equatable {
        public var batch, m, n, k: Int
        public var aBatched, bBatched: Bool
    }

    public static func gemm(_ a: [Int], _ b: [Int], transposeA: Bool, transposeB: Bool, c: [Int]?) throws -> GEMMShape {
        let op = "gemm"
        guard (2...3).contains(a.count), (2...3).contains(b.count) else {
            throw PEAError.shapeMismatch("\(op): operands must have rank 2 or 3, got \(a) and \(b)")
        }
        let batchA = a.count == 3 ? a[0] : nil, batchB = b.count == 3 ? b[0] : nil
        if let batchA, let batchB, batchA != batchB {
            throw PEAError.shapeMismatch("\(op): batch sizes differ, \(a) and \(b)")
        }
        let ra = Array(a.suffix(2)), rb = Array(b.suffix(2))
        let (m, ka) = transposeA ? (ra[1], ra[0]) : (ra[0], ra[1])
        let (kb, n) = transposeB ? (rb[1], rb[0]) : (rb[0], rb[1])
        guard ka == kb else {
            throw PEAError.shapeMismatch("\(op): inner dimensions differ, op(a) is \(m)×\(ka) and op(b) is \(kb)×\(n)")
        }
        let batch = batchA ?? batchB ?? 1
        let shape = GEMMShape(batch: batch, m: m, n: n, k: ka, aBatched: batchA != nil, bBatched: batchB != nil)
        if let c {
            let expected = (batchA != nil || batchB != nil) ? [batch, m, n] : [m, n]
            guard c == expected else { throw PEAError.shapeMismatch("\(op): c must have shape \(expected), got \(c)") }
        }
        return shape
    }

    public static func conv2dOutput(_ x: [Int], weight: [Int], stride: (Int, Int), padding: Padding2D) throws -> [Int] {
        let op = "conv2d"
        guard x.count == 4, weight.count == 4 else {
            throw PEAError.shapeMismatch("\(op): input must be [B, C, H, W] and weight [Cout, Cin, kh, kw], got \(x) and \(weight)")
        }
        guard x[1] == weight[1] else {
            throw PEAError.shapeMismatch("\(op): input has \(x[1]) channels but weight \(weight) expects \(weight[1])")
        }
        guard stride.0 > 0, stride.1 > 0, [padding.top, padding.bottom, padding.left, padding.right].allSatisfy({ $0 >= 0 }) else {
            throw PEAError.shapeMismatch("\(op): stride must be positive and padding non-negative")
        }
        let paddedH = x[2] + padding.top + padding.bottom, paddedW = x[3] + padding.left + padding.right
        guard weight[2] >= 1, weight[3] >= 1, paddedH >= weight[2], paddedW >= weight[3] else {
            throw PEAError.shapeMismatch("\(op): kernel \(weight[2])×\(weight[3]) larger than the padded input \(paddedH)×\(paddedW)")
        }
        return [x[0], weight[0], (paddedH - weight[2]) / stride.0 + 1, (paddedW - weight[3]) / stride.1 + 1]
    }

    public struct AttentionShape: Equatable {
        public var batch, heads, queries, keys, headDim, valueHeadDim: Int
    }

    public static func attention(q: [Int], k: [Int], v: [Int], heads: Int, mask: [Int]?) throws -> AttentionShape {
        let op = "attention"
        guard q.count == 3, k.count == 3, v.count == 3 else {
            throw PEAError.shapeMismatch("\(op): q, k, v must be [B, T, H·D], got \(q), \(k), \(v)")
        }
        guard heads > 0, q[2] % heads == 0, v[2] % heads == 0 else {
            throw PEAError.shapeMismatch("\(op): widths \(q[2]) and \(v[2]) are not divisible by \(heads) heads")
        }
        guard k[0] == q[0], v[0] == q[0], k[2] == q[2], v[1] == k[1] else {
            throw PEAError.shapeMismatch("\(op): q \(q), k \(k), v \(v) do not agree")
        }
        let shape = AttentionShape(batch: q[0], heads: heads, queries: q[1], keys: k[1], headDim: q[2] / heads, valueHeadDim: v[2] / heads)
        if let mask {
            let full = [shape.batch, heads, shape.queries, shape.keys]
            let padded = [Int](repeating: 1, count: max(0, 4 - mask.count)) + mask
            guard mask.count <= 4, padded[3] == shape.keys,
                  zip(padded.prefix(3), full.prefix(3)).allSatisfy({ $0 == $1 || $0 == 1 }) else {
                throw PEAError.shapeMismatch("\(op): mask \(mask) does not broadcast to [B, H, Tq, Tk] = \(full)")
            }
        }
        return shape
    }

    public static func concat(_ shapes: [[Int]], dim: Int) throws -> (axis: Int, shape: [Int]) {
        let op = "concat"
        guard let first = shapes.first else { throw PEAError.shapeMismatch("\(op): no tensors") }
        let axis = try Self.axis(dim, rank: first.count, op: op)
        var total = 0
        for shape in shapes {
            guard shape.count == first.count,
                  shape.indices.allSatisfy({ $0 == axis || shape[$0] == first[$0] }) else {
                throw PEAError.shapeMismatch("\(op): shapes \(shapes) differ outside dimension \(dim)")
            }
            total += shape[axis]
        }
        var result = first
        result[axis] = total
        return (axis, result)
    }

    public static func split(_ shape: [Int], sizes: [Int], dim: Int) throws -> Int {
        let op = "split"
        let axis = try Self.axis(dim, rank: shape.count, op: op)
        guard sizes.allSatisfy({ $0 >= 0 }), sizes.reduce(0, +) == shape[axis] else {
            throw PEAError.shapeMismatch("\(op): sizes \(sizes) do not add up to \(shape[axis]) (dimension \(dim) of \(shape))")
        }
        return axis
    }

    public static func permute(_ shape: [Int], _ dims: [Int]) throws -> [Int] {
        let op = "permute"
        let axes = try dims.map { try axis($0, rank: shape.count, op: op) }
        guard axes.count == shape.count, Set(axes).count == axes.count else {
            throw PEAError.shapeMismatch("\(op): \(dims) is not a permutation of the \(shape.count) dimensions of \(shape)")
        }
        return axes
    }

    /// The residual of `linear`/`conv2d` must have the output's shape: it is added element for element, in
    /// the fused epilogues as in the composed default (no broadcasting).
    public static func requireResidual(_ residual: Tensor?, _ shape: [Int], _ op: String) throws {
        if let residual, residual.shape != shape {
            throw PEAError.shapeMismatch("\(op): residual \(residual.shape) does not match the output \(shape)")
        }
    }

    // MARK: backward ops

    /// A backward op's gradOutput must have the shape the forward op returns.
    public static func requireGradOutput(_ gradOutput: Tensor, _ shape: [Int], _ op: String) throws {
        guard gradOutput.shape == shape else {
            throw PEAError.shapeMismatch("\(op): gradOutput must have the forward output's shape \(shape), got \(gradOutput.shape)")
        }
    }

    /// Runs a forward op's shape rule for a backward op, naming the backward op in its error.
    public static func backward<T>(_ op: String, _ rule: () throws -> T) throws -> T {
        do {
            return try rule()
        } catch PEAError.shapeMismatch(let message) {
            throw PEAError.shapeMismatch("\(op): \(message)")
        }
    }
}
