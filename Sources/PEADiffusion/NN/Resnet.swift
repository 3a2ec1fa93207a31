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

    /// x [B, C, H, W]; `timeEmbedding` [B, T] (already through SiLU, see `UNet2DConditionModel`) or nil. A
    /// gradient checkpoint when training asks for one (`checkpointedLayer`).
    public func callAsFunction(_ x: Tensor, timeEmbedding: Tensor? = nil) throws -> Tensor {
        try checkpointedLayer("resnet", [x] + (timeEmbedding.map { [$0] } ?? [])) { inputs in
            try self.forward(inputs[0], timeEmbedding: inputs.count > 1 ? inputs[1] : nil)
        }
    }

    private func forward(_ x: Tensor, timeEmbedding: Tensor?) throws -> Tensor {
        let b = x.backend
        var h = try conv1(norm1(x, silu: true))
        if let timeProjection, let timeEmbedding {
            let t = try timeProjection(timeEmbedding)
            h = try b.add(h, t.reshaped([t.shape[0], t.shape[1], 1, 1]))
        }
        let skip = try shortcut?(x) ?? x
        // the skip rides in conv2's epilogue, unless the sum is then divided by an output scale
        if outputScale == 1 { return try conv2(norm2(h, silu: true), residual: skip) }
        h = try conv2(norm2(h, silu: true))
        return try b.scale(b.add(skip, h), by: 1 / outputScale)
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

    /// diffusers' `Upsample2D(x, output_size)`: nearest interpolation to `size` (F.interpolate(size=…)), then
    /// the conv. The UNet asks for the size of the skip the next block concatenates, which a stride-2 conv made
    /// from it: 2h or 2h − 1 for an input of height h. Nearest interpolation from h to 2h − 1 picks source row
    /// ⌊i·h/(2h − 1)⌋ = ⌊i/2⌋ for every i < 2h − 1, so both are the 2× upsampling, the second cut to 2h − 1.
    public func callAsFunction(_ x: Tensor, size: (height: Int, width: Int)) throws -> Tensor {
        let h = x.shape[2], w = x.shape[3]
        guard (size.height == 2 * h || size.height == 2 * h - 1) && (size.width == 2 * w || size.width == 2 * w - 1) else {
            throw PEAError.shapeMismatch("upsample: \(h)×\(w) cannot be brought to \(size.height)×\(size.width) by nearest 2× upsampling (the skip must be \(2 * h) or \(2 * h - 1) high, \(2 * w) or \(2 * w - 1) wide)")
        }
        let b = x.backend
        var y = try b.upsampleNearest2x(x)
        if size.height < 2 * h { y = try b.split(y, sizes: [size.height, 1], dim: 2)[0] }
        if size.width < 2 * w { y = try b.split(y, sizes: [size.width, 1], dim: 3)[0] }
        return try conv(y)
    }
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
