/// Backward passes composed of the protocol's ops, so that they run unchanged on every backend.
extension ComputeBackend {
    /// The default `attentionBackward`: the composed one. Layout as the forward: q [B, Tq, H·D],
    /// k [B, Tk, H·D], v [B, Tk, H·Dv], gradOutput [B, Tq, H·Dv].
    ///
    /// With the heads as a batch axis (Q [B·H, Tq, D], …), S = scale·Q·Kᵀ, P = softmax(S), O = P·V:
    ///   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = softmaxBackward(dP, P),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
    /// The score matrices are formed here (unlike the forward), so the B·H heads are processed in chunks
    /// whose Tq×Tk score matrix stays under 256 MB: a 4096-token self-attention never holds all heads at once.
    public func attentionBackward(_ gradOutput: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: Int,
                                  scale: Float?) throws -> (q: Tensor, k: Tensor, v: Tensor) {
        try composedAttentionBackward(gradOutput, q: q, k: k, v: v, heads: heads, scale: scale)
    }

    /// The composed attention backward, whatever `attentionBackward` this backend has (a backend whose own
    /// version cannot take some shapes falls back to it), with the chunk budget as a parameter (tests use a
    /// small one to exercise chunking). Public for `pea bench kernels`, which times it beside the backend's own.
    public func composedAttentionBackward(_ gradOutput: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: Int, scale: Float?,
                                          scoreBytesPerChunk: Int = 256 << 20) throws -> (q: Tensor, k: Tensor, v: Tensor) {
        let op = "attentionBackward"
        let s = try ShapeRules.backward(op) {
            try ShapeRules.attention(q: q.shape, k: k.shape, v: v.shape, heads: heads, mask: nil)
        }
        try ShapeRules.requireGradOutput(gradOutput, [s.batch, s.queries, heads * s.valueHeadDim], op)
        let alpha = scale ?? 1 / Float(s.headDim).squareRoot()
        let batchHeads = s.batch * heads
        if batchHeads == 0 || s.queries == 0 || s.keys == 0 {
            return (try zeros(q.shape, dtype: q.dtype), try zeros(k.shape, dtype: k.dtype), try zeros(v.shape, dtype: v.dtype))
        }

        // [B, T, H·d] → [B·H, T, d]
        func headsFirst(_ x: Tensor, _ tokens: Int, _ d: Int) throws -> Tensor {
            try permute(x.reshaped([s.batch, tokens, heads, d]), [0, 2, 1, 3]).reshaped([batchHeads, tokens, d])
        }
        // [B·H, T, d] → [B, T, H·d]
        func tokensFirst(_ x: Tensor, _ tokens: Int, _ d: Int) throws -> Tensor {
            try permute(x.reshaped([s.batch, heads, tokens, d]), [0, 2, 1, 3]).reshaped([s.batch, tokens, heads * d])
        }
        let Q = try headsFirst(q, s.queries, s.headDim), K = try headsFirst(k, s.keys, s.headDim)
        let V = try headsFirst(v, s.keys, s.valueHeadDim), dO = try headsFirst(gradOutput, s.queries, s.valueHeadDim)

        let scoreBytes = max(1, s.queries * s.keys * MemoryLayout<Float>.size)
        let chunk = max(1, min(batchHeads, scoreBytesPerChunk / scoreBytes))
        var sizes = [Int](repeating: chunk, count: batchHeads / chunk)
        if batchHeads % chunk != 0 { sizes.append(batchHeads % chunk) }

        func parts(_ x: Tensor) throws -> [Tensor] { sizes.count == 1 ? [x] : try split(x, sizes: sizes, dim: 0) }
        let (Qs, Ks, Vs, dOs) = (try parts(Q), try parts(K), try parts(V), try parts(dO))
        var dQs: [Tensor] = [], dKs: [Tensor] = [], dVs: [Tensor] = []
        for i in sizes.indices {
            let scores = try gemm(Qs[i], Ks[i], transposeA: false, transposeB: true, alpha: alpha, beta: 0, c: nil)
            let P = try softmax(scores)
            dVs.append(try gemm(P, dOs[i], transposeA: true, transposeB: false, alpha: 1, beta: 0, c: nil))
            let dP = try gemm(dOs[i], Vs[i], transposeA: false, transposeB: true, alpha: 1, beta: 0, c: nil)
            let dS = try softmaxBackward(dP, output: P)
            dQs.append(try gemm(dS, Ks[i], transposeA: false, transposeB: false, alpha: alpha, beta: 0, c: nil))
            dKs.append(try gemm(dS, Qs[i], transposeA: true, transposeB: false, alpha: alpha, beta: 0, c: nil))
        }
        func joined(_ xs: [Tensor]) throws -> Tensor { xs.count == 1 ? xs[0] : try concat(xs, dim: 0) }
        return (try tokensFirst(joined(dQs), s.queries, s.headDim),
                try tokensFirst(joined(dKs), s.keys, s.headDim),
                try tokensFirst(joined(dVs), s.keys, s.valueHeadDim))
    }

    /// The gradient of a torch broadcast from `shape` to x's shape: x summed over the axes where `shape`
    /// (right-aligned against x's shape) has size 1 or no axis at all, returned with `shape`.
    public func sumToShape(_ x: Tensor, _ shape: [Int]) throws -> Tensor {
        let op = "sumToShape"
        guard shape.count <= x.rank else {
            throw PEAError.shapeMismatch("\(op): \(shape) has more dimensions than \(x.shape)")
        }
        let padded = [Int](repeating: 1, count: x.rank - shape.count) + shape
        guard zip(padded, x.shape).allSatisfy({ $0 == $1 || $0 == 1 }) else {
            throw PEAError.shapeMismatch("\(op): \(shape) does not broadcast to \(x.shape)")
        }
        var y = x
        var count = 1
        for axis in 0..<x.rank where padded[axis] == 1 && x.shape[axis] != 1 {
            y = try mean(y, dim: axis, keepDim: true)
            count *= x.shape[axis]
        }
        if count > 1 { y = try self.scale(y, by: Float(count)) }
        return try y.reshaped(shape)
    }
}
