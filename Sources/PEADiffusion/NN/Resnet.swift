// The convolutional pieces of the UNet and the VAE (diffusers/models/resnet.py, downsampling.py,
// upsampling.py, embeddings.py).

/// diffusers' ResnetBlock2D ("default" time-embedding norm, output scale 1 unless the config says otherwise):
///   h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb)) per channel]
///   h = conv2(silu(norm2(h)))
///   out = (shortcut(x) + h) / outputScale, shortcut a 1×1 convolution when the channel count changes.
public struct ResnetBlock2D {
    public let norm1, norm2: GroupNorm
    public let conv1, conv2: Conv2d
    public let timeProjection: Linear?
    public let shortcut: Conv2d?
    public let outputScale: Float

    public init(_ w: Weights, in inChannels: Int, out outChannels: Int, timeChannels: Int?, groups: Int, eps: Float,
                outputScale: Float = 1) throws {
        norm1 = try GroupNorm(w["norm1"], groups: groups, channels: inChannels, eps: eps)
        conv1 = try Conv2d(w["conv1"], in: inChannels, out: outChannels, kernel: 3)
        timeProjection = try timeChannels.map { try Linear(w["time_emb_proj"], in: $0, out: outChannels) }
        norm2 = try GroupNorm(w["norm2"], groups: groups, channels: outChannels, eps: eps)
        conv2 = try Conv2d(w["conv2"], in: outChannels, out: outChannels, kernel: 3)
        shortcut = inChannels == outChannels ? nil : try Conv2d(w["conv_shortcut"], in: inChannels, out: outChannels, kernel: 1)
        self.outputScale = outputScale
    }

    /// x [B, C, H, W]; `timeEmbedding` [B, T] (already through SiLU, see `UNet2DConditionModel`) or nil.
    public func callAsFunction(_ x: Tensor, timeEmbedding: Tensor? = nil) throws -> Tensor {
        let b = x.backend
        var h = try conv1(norm1(x, silu: true))
        if let timeProjection, let timeEmbedding {
            let t = try timeProjection(timeEmbedding)
            h = try b.add(h, t.reshaped([t.shape[0], t.shape[1], 1, 1]))
        }
        h = try conv2(norm2(h, silu: true))
        let out = try b.add(shortcut?(x) ?? x, h)
        return outputScale == 1 ? out : try b.scale(out, by: 1 / outputScale)
    }
}

/// diffusers' Downsample2D with a convolution: a 3×3, stride-2 convolution. The UNet pads 1 on every side;
/// the VAE pads only right and bottom (diffusers' `padding=0` case, F.pad(x, (0, 1, 0, 1))).
public struct Downsample2D {
    public let conv: Conv2d

    public init(_ w: Weights, channels: Int, padding: Padding2D) throws {
        conv = try Conv2d(w["conv"], in: channels, out: channels, kernel: 3, stride: 2, padding: padding)
    }

    public func callAsFunction(_ x: Tensor) throws -> Tensor { try conv(x) }
}

/// diffusers' Upsample2D with a convolution: nearest-neighbour 2× upsampling, then a 3×3 convolution.
public struct Upsample2D {
    public let conv: Conv2d

    public init(_ w: Weights, channels: Int) throws {
        conv = try Conv2d(w["conv"], in: channels, out: channels, kernel: 3)
    }

    public func callAsFunction(_ x: Tensor) throws -> Tensor { try conv(x.backend.upsampleNearest2x(x)) }
}

/// diffusers' `Timesteps` + `TimestepEmbedding`: the sinusoidal embedding of a value per sample, then
/// Linear → SiLU → Linear. Also used for SDXL's `add_embedding` over [text_embeds, time_ids features].
public struct TimestepEmbedding {
    public let linear1, linear2: Linear

    public init(_ w: Weights, in inChannels: Int, out outChannels: Int) throws {
        linear1 = try Linear(w["linear_1"], in: inChannels, out: outChannels)
        linear2 = try Linear(w["linear_2"], in: outChannels, out: outChannels)
    }

    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        try linear2(x.backend.activation(linear1(x), .silu))
    }
}

/// diffusers' `Timesteps`: the parameters of the sinusoidal projection.
public struct SinusoidalProjection {
    public let dim: Int
    public let flipSinToCos: Bool
    public let downscaleFreqShift: Float

    public func callAsFunction(_ t: Tensor) throws -> Tensor {
        try t.backend.timestepEmbedding(t, dim: dim, flipSinToCos: flipSinToCos, downscaleFreqShift: downscaleFreqShift,
                                        scale: 1, maxPeriod: 10000)
    }
}
