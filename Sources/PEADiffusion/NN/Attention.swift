// Attention and the transformer blocks of the diffusers UNet and VAE (diffusers/models/attention*.py,
// transformers/transformer_2d.py), in the [B, T, C] layout of sequences.

/// diffusers' `Attention` (the default AttnProcessor): q from x, k and v from the context (x itself for
/// self-attention), multi-head scaled dot-product attention, then the output projection `to_out.0`.
/// In f32 `upcast_attention`/`upcast_softmax` change nothing. In f16/bf16 they need nothing either: the CUDA
/// attention kernel computes q·kᵀ, the softmax and the weighted sum of v with f32 accumulation whatever the
/// storage dtype (what diffusers' upcast does), rounding only the output. So the flag is not taken here.
public struct Attention {
    public let heads: Int
    public let toQ, toK, toV, toOut: Linear

    /// `queryDim` is x's width, `contextDim` the context's; the inner width is heads × headDim.
    public init(_ w: Weights, queryDim: Int, contextDim: Int? = nil, heads: Int, headDim: Int,
                projectionBias: Bool = false) throws {
        let inner = heads * headDim
        self.heads = heads
        toQ = try Linear(w["to_q"], in: queryDim, out: inner, bias: projectionBias)
        toK = try Linear(w["to_k"], in: contextDim ?? queryDim, out: inner, bias: projectionBias)
        toV = try Linear(w["to_v"], in: contextDim ?? queryDim, out: inner, bias: projectionBias)
        toOut = try Linear(w["to_out.0"], in: inner, out: queryDim)
    }

    /// x [B, T, queryDim], context [B, S, contextDim] or nil → [B, T, queryDim], plus `residual` [B, T,
    /// queryDim] when given (added in the output projection).
    public func callAsFunction(_ x: Tensor, context: Tensor? = nil, residual: Tensor? = nil) throws -> Tensor {
        let source = context ?? x
        let attended = try x.backend.attention(q: toQ(x), k: toK(source), v: toV(source), heads: heads,
                                               mask: nil, causal: false, scale: nil)
        return try toOut(attended, residual: residual)
    }
}

/// diffusers' FeedForward with the GEGLU activation: Linear(dim → 2·inner) → GEGLU → Linear(inner → dim).
public struct FeedForward {
    public let projectIn, projectOut: Linear

    public init(_ w: Weights, dim: Int, multiplier: Int = 4) throws {
        let inner = dim * multiplier
        projectIn = try Linear(w["net.0.proj"], in: dim, out: inner * 2)
        projectOut = try Linear(w["net.2"], in: inner, out: dim)
    }

    /// `residual` (x's shape) is added in the second linear layer.
    public func callAsFunction(_ x: Tensor, residual: Tensor? = nil) throws -> Tensor {
        try projectOut(x.backend.geglu(projectIn(x)), residual: residual)
    }
}

/// diffusers' BasicTransformerBlock as the SD UNets use it (layer norm, pre-norm residuals):
/// x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).
public struct BasicTransformerBlock {
    public let norm1, norm2, norm3: LayerNorm
    public let selfAttention, crossAttention: Attention
    public let feedForward: FeedForward

    public init(_ w: Weights, dim: Int, heads: Int, headDim: Int, contextDim: Int) throws {
        norm1 = try LayerNorm(w["norm1"], dim: dim)
        selfAttention = try Attention(w["attn1"], queryDim: dim, heads: heads, headDim: headDim)
        norm2 = try LayerNorm(w["norm2"], dim: dim)
        crossAttention = try Attention(w["attn2"], queryDim: dim, contextDim: contextDim, heads: heads, headDim: headDim)
        norm3 = try LayerNorm(w["norm3"], dim: dim)
        feedForward = try FeedForward(w["ff"], dim: dim)
    }

    /// A gradient checkpoint when training asks for one (`checkpointedLayer`).
    public func callAsFunction(_ x: Tensor, context: Tensor) throws -> Tensor {
        try checkpointedLayer("transformer block", [x, context]) { inputs in try self.forward(inputs[0], context: inputs[1]) }
    }

    private func forward(_ x: Tensor, context: Tensor) throws -> Tensor {
        // each residual rides in the epilogue of the sub-layer's last linear
        var h = try selfAttention(norm1(x), residual: x)
        h = try crossAttention(norm2(h), context: context, residual: h)
        return try feedForward(norm3(h), residual: h)
    }
}

/// diffusers' Transformer2DModel for continuous inputs: group norm, project in (a 1×1 convolution, or a
/// linear layer with `use_linear_projection`), a stack of transformer blocks over the H·W tokens, project
/// out, plus the input as a residual.
public struct Transformer2D {
    public let norm: GroupNorm
    public let projectIn, projectOut: Projection
    public let blocks: [BasicTransformerBlock]

    public init(_ w: Weights, channels: Int, heads: Int, contextDim: Int, layers: Int, groups: Int,
                linearProjection: Bool) throws {
        guard heads > 0, channels % heads == 0 else {
            throw PEAError.shapeMismatch("\(w.prefix): \(channels) channels do not split into \(heads) attention heads")
        }
        norm = try GroupNorm(w["norm"], groups: groups, channels: channels, eps: 1e-6)
        if linearProjection {
            projectIn = .linear(try Linear(w["proj_in"], in: channels, out: channels))
            projectOut = .linear(try Linear(w["proj_out"], in: channels, out: channels))
        } else {
            projectIn = .conv1x1(try Conv2d(w["proj_in"], in: channels, out: channels, kernel: 1))
            projectOut = .conv1x1(try Conv2d(w["proj_out"], in: channels, out: channels, kernel: 1))
        }
        blocks = try (0..<layers).map {
            try BasicTransformerBlock(w["transformer_blocks.\($0)"], dim: channels, heads: heads,
                                      headDim: channels / heads, contextDim: contextDim)
        }
    }

    /// x [B, C, H, W], context [B, S, contextDim] → [B, C, H, W].
    public func callAsFunction(_ x: Tensor, context: Tensor) throws -> Tensor {
        let b = x.backend
        let (batch, channels, height, width) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        var h = try norm(x)
        if case .conv1x1(let conv) = projectIn { h = try conv(h) }
        h = try b.permute(h.reshaped([batch, channels, height * width]), [0, 2, 1])
        if case .linear(let linear) = projectIn { h = try linear(h) }
        for block in blocks { h = try block(h, context: context) }
        if case .linear(let linear) = projectOut { h = try linear(h) }
        h = try b.permute(h, [0, 2, 1]).reshaped([batch, channels, height, width])
        // the 1×1 projection takes x in its epilogue; the linear one runs in [B, HW, C], where x is not laid out
        if case .conv1x1(let conv) = projectOut { return try conv(h, residual: x) }
        return try b.add(h, x)
    }
}

/// The VAE's mid-block attention: diffusers' `Attention` with a group norm on the input, one head as wide
/// as the channels, biased projections, and the input added back — over the H·W positions of an image.
public struct SpatialSelfAttention {
    public let norm: GroupNorm
    public let attention: Attention

    public init(_ w: Weights, channels: Int, groups: Int, eps: Float) throws {
        norm = try GroupNorm(w["group_norm"], groups: groups, channels: channels, eps: eps)
        attention = try Attention(w, queryDim: channels, heads: 1, headDim: channels, projectionBias: true)
    }

    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        let b = x.backend
        let (batch, channels, height, width) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        var h = try b.permute(norm(x).reshaped([batch, channels, height * width]), [0, 2, 1])
        h = try attention(h)
        h = try b.permute(h, [0, 2, 1]).reshaped([batch, channels, height, width])
        return try b.add(h, x)
    }
}

/// Transformer2D's projections: the same channel map, as a 1×1 convolution (SD1) or a linear layer
/// (`use_linear_projection`, SD2 and SDXL); the two differ in which side of the NCHW → [B, HW, C] transpose
/// they run.
public enum Projection {
    case conv1x1(Conv2d)
    case linear(Linear)
}
