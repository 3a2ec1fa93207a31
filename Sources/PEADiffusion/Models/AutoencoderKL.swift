// diffusers' AutoencoderKL (diffusers/models/autoencoders/autoencoder_kl.py and vae.py): the image ↔ latent
// codec of Stable Diffusion. The encoder gives the mean and log-variance of the latent distribution; the
// decoder turns a latent (already divided by `scaling_factor`) back into an image in about [-1, 1].

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

public struct AutoencoderKLConfig {
    public var inChannels: Int
    public var outChannels: Int
    public var latentChannels: Int
    public var blockOutChannels: [Int]
    public var layersPerBlock: Int
    public var normNumGroups: Int
    public var scalingFactor: Float
    public var useQuantConv: Bool
    public var usePostQuantConv: Bool
    public var midBlockAttention: Bool
    /// diffusers' `force_upcast` (default true): the SDXL pipeline runs such a VAE in f32 when the rest is f16,
    /// because SDXL's VAE overflows f16 (a fixed VAE such as sdxl-vae-fp16-fix sets it false).
    public var forceUpcast: Bool
    /// `sample_size` (default 32): the image side of one tile in tiled decoding (`decodeTiled`).
    public var sampleSize: Int

    public init(_ config: ConfigFile) throws {
        func fail(_ key: String, _ reason: String) -> PEAError {
            .invalidConfig(path: config.path, reason: "'\(key)': \(reason)")
        }
        inChannels = try config.int("in_channels", default: 3, range: .atLeast(1))
        outChannels = try config.int("out_channels", default: 3, range: .atLeast(1))
        latentChannels = try config.int("latent_channels", default: 4, range: .atLeast(1))
        blockOutChannels = try config.contains("block_out_channels") ? config.intList("block_out_channels", range: .atLeast(1)) : [64]
        guard !blockOutChannels.isEmpty else { throw fail("block_out_channels", "is empty") }
        layersPerBlock = try config.int("layers_per_block", default: 1, range: .layerCount)
        normNumGroups = try config.int("norm_num_groups", default: 32, range: .atLeast(1))
        scalingFactor = try config.float("scaling_factor", default: 0.18215, range: .invertible)   // the latents are divided by it
        useQuantConv = try config.bool("use_quant_conv", default: true)
        usePostQuantConv = try config.bool("use_post_quant_conv", default: true)
        midBlockAttention = try config.bool("mid_block_add_attention", default: true)
        forceUpcast = try config.bool("force_upcast", default: true)
        sampleSize = try config.int("sample_size", default: 32, range: .atLeast(1))

        let blocks = blockOutChannels.count
        for (key, expected) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] where config.contains(key) {
            let types = try config.stringList(key)
            guard types.count == blocks else { throw fail(key, "has \(types.count) entries for \(blocks) blocks") }
            if let other = types.first(where: { $0 != expected }) { throw fail(key, "block type \"\(other)\" is not supported (\(expected))") }
        }
        if let act = try config.optionalString("act_fn"), act != "silu" { throw fail("act_fn", "\"\(act)\" is not supported (silu)") }
        if let shift = try config.optionalDouble("shift_factor"), shift != 0 {
            throw fail("shift_factor", "\(shift) is not supported (SD3/Flux VAEs are not an SD1/SD2/SDXL VAE)")
        }
        for key in ["latents_mean", "latents_std"] where config.value(key).map({ $0 != .null }) ?? false {
            throw fail(key, "is set, which Pea does not support (SD1/SD2/SDXL VAEs leave it null)")
        }
        for (i, channels) in blockOutChannels.enumerated() where channels % normNumGroups != 0 {
            throw fail("block_out_channels", "\(channels) channels of block \(i) do not split into \(normNumGroups) groups")
        }
    }
}

/// diffusers' UNetMidBlock2D as the VAE uses it: resnet, spatial self-attention, resnet (no time embedding).
struct VAEMidBlock {
    let resnets: [ResnetBlock2D]
    let attention: SpatialSelfAttention?

    init(_ w: Weights, channels: Int, groups: Int, withAttention: Bool) throws {
        resnets = try (0..<2).map {
            try ResnetBlock2D(w["resnets.\($0)"], in: channels, out: channels, timeChannels: nil, groups: groups, eps: 1e-6)
        }
        attention = withAttention ? try SpatialSelfAttention(w["attentions.0"], channels: channels, groups: groups, eps: 1e-6) : nil
    }

    func callAsFunction(_ x: Tensor) throws -> Tensor {
        var h = try resnets[0](x)
        if let attention { h = try attention(h) }
        return try resnets[1](h)
    }
}

/// The encoder: conv_in, DownEncoderBlock2Ds (resnets, then a stride-2 convolution padded right and
/// bottom), the mid block, group norm + SiLU, conv_out to 2 × latent channels, then quant_conv.
public struct VAEEncoder {
    let convIn: Conv2d
    let downBlocks: [(resnets: [ResnetBlock2D], downsampler: Downsample2D?)]
    let midBlock: VAEMidBlock
    let normOut: GroupNorm
    let convOut: Conv2d
    let quantConv: Conv2d?

    init(_ w: Weights, quantConv qw: Weights, config c: AutoencoderKLConfig) throws {
        let channels = c.blockOutChannels, groups = c.normNumGroups
        convIn = try Conv2d(w["conv_in"], in: c.inChannels, out: channels[0], kernel: 3)
        downBlocks = try channels.indices.map { i in
            let bw = w["down_blocks.\(i)"]
            let input = i == 0 ? channels[0] : channels[i - 1], output = channels[i]
            let resnets = try (0..<c.layersPerBlock).map {
                try ResnetBlock2D(bw["resnets.\($0)"], in: $0 == 0 ? input : output, out: output, timeChannels: nil, groups: groups, eps: 1e-6)
            }
            let downsampler = i == channels.count - 1 ? nil
                : try Downsample2D(bw["downsamplers.0"], channels: output, padding: Padding2D(top: 0, bottom: 1, left: 0, right: 1))
            return (resnets, downsampler)
        }
        let last = channels[channels.count - 1]
        midBlock = try VAEMidBlock(w["mid_block"], channels: last, groups: groups, withAttention: c.midBlockAttention)
        normOut = try GroupNorm(w["conv_norm_out"], groups: groups, channels: last, eps: 1e-6)
        convOut = try Conv2d(w["conv_out"], in: last, out: 2 * c.latentChannels, kernel: 3)
        quantConv = c.useQuantConv ? try Conv2d(qw, in: 2 * c.latentChannels, out: 2 * c.latentChannels, kernel: 1) : nil
    }

    /// image [B, 3, H, W] in [-1, 1] → the latent distribution's moments [B, 2·latent, H/f, W/f].
    func callAsFunction(_ image: Tensor) throws -> Tensor {
        var h = try convIn(image)
        for block in downBlocks {
            for resnet in block.resnets { h = try resnet(h) }
            if let downsampler = block.downsampler { h = try downsampler(h) }
        }
        h = try convOut(normOut(midBlock(h), silu: true))
        return try quantConv?(h) ?? h
    }
}

/// The decoder: post_quant_conv, conv_in, the mid block, UpDecoderBlock2Ds (layers + 1 resnets, then
/// nearest 2× upsampling and a convolution), group norm + SiLU, conv_out.
public struct VAEDecoder {
    let postQuantConv: Conv2d?
    let convIn: Conv2d
    let midBlock: VAEMidBlock
    let upBlocks: [(resnets: [ResnetBlock2D], upsampler: Upsample2D?)]
    let normOut: GroupNorm
    let convOut: Conv2d

    init(_ w: Weights, postQuantConv pw: Weights, config c: AutoencoderKLConfig) throws {
        let channels = Array(c.blockOutChannels.reversed()), groups = c.normNumGroups
        postQuantConv = c.usePostQuantConv ? try Conv2d(pw, in: c.latentChannels, out: c.latentChannels, kernel: 1) : nil
        convIn = try Conv2d(w["conv_in"], in: c.latentChannels, out: channels[0], kernel: 3)
        midBlock = try VAEMidBlock(w["mid_block"], channels: channels[0], groups: groups, withAttention: c.midBlockAttention)
        upBlocks = try channels.indices.map { i in
            let bw = w["up_blocks.\(i)"]
            let input = i == 0 ? channels[0] : channels[i - 1], output = channels[i]
            let resnets = try (0...c.layersPerBlock).map {
                try ResnetBlock2D(bw["resnets.\($0)"], in: $0 == 0 ? input : output, out: output, timeChannels: nil, groups: groups, eps: 1e-6)
            }
            let upsampler = i == channels.count - 1 ? nil : try Upsample2D(bw["upsamplers.0"], channels: output)
            return (resnets, upsampler)
        }
        let first = c.blockOutChannels[0]
        normOut = try GroupNorm(w["conv_norm_out"], groups: groups, channels: first, eps: 1e-6)
        convOut = try Conv2d(w["conv_out"], in: first, out: c.outChannels, kernel: 3)
    }

    func callAsFunction(_ latents: Tensor) throws -> Tensor {
        var h = try convIn(postQuantConv?(latents) ?? latents)
        h = try midBlock(h)
        for block in upBlocks {
            for resnet in block.resnets { h = try resnet(h) }
            if let upsampler = block.upsampler { h = try upsampler(h) }
        }
        return try convOut(normOut(h, silu: true))
    }
}

public struct AutoencoderKL {
    public let config: AutoencoderKLConfig
    public let encoder: VAEEncoder
    public let decoder: VAEDecoder

    public init(config: AutoencoderKLConfig, weights w: Weights) throws {
        self.config = config
        encoder = try VAEEncoder(w["encoder"], quantConv: w["quant_conv"], config: config)
        decoder = try VAEDecoder(w["decoder"], postQuantConv: w["post_quant_conv"], config: config)
    }

    /// Loads a diffusers `vae/` folder (or a pipeline root holding one). Checkpoints saved before diffusers
    /// 0.14 name the mid-block attention `query`/`key`/`value`/`proj_attn`; they are read under today's names.
    /// `dtype` is the precision the parameters are stored and computed in. `force_upcast` is not applied here
    /// (diffusers' `from_pretrained(torch_dtype=…)` does not either); the SDXL pipeline applies it.
    public static func load(folder: String, backend: any ComputeBackend, variant: String? = nil,
                            dtype: DType = .f32) throws -> (model: AutoencoderKL, unusedWeights: [String]) {
        let component = try ModelFolder.component(folder, "vae")
        let config = try AutoencoderKLConfig(ConfigFile(path: joinPath(component, "config.json")))
        let file = try SafeTensorsCollection.open(folder: component, baseName: "diffusion_pytorch_model", variant: variant)
        let source = SafeTensorsWeights(file, backend: backend, dtype: dtype, rename: renameLegacyAttention)
        let model = try AutoencoderKL(config: config, weights: Weights(source))
        return (model, source.unusedNames)
    }

    /// The dtype the parameters were loaded in: inputs are cast to it, outputs are in it (a norm's scale: weight
    /// matrices may be held at half size, `ComputeBackend.halfWeights`).
    public var dtype: DType { decoder.normOut.weight.dtype }

    private func cast(_ x: Tensor) throws -> Tensor { x.dtype == dtype ? x : try x.backend.cast(x, to: dtype) }

    /// The image factor between pixels and latents (8 for SD).
    public var downsamplingFactor: Int { 1 << (config.blockOutChannels.count - 1) }

    /// image [B, C, H, W] in [-1, 1] → (mean, logvar), each [B, latent, H/f, W/f]. The log-variance is as the
    /// network gives it; diffusers' DiagonalGaussianDistribution clamps it to [-30, 20] before use.
    public func encode(_ image: Tensor) throws -> (mean: Tensor, logvar: Tensor) {
        let shape = image.shape, f = downsamplingFactor
        guard shape.count == 4, shape[1] == config.inChannels, shape[2] % f == 0, shape[3] % f == 0 else {
            throw PEAError.shapeMismatch("vae encode: image must be [B, \(config.inChannels), H, W] with H and W multiples of \(f), got \(shape)")
        }
        let moments = try image.backend.split(encoder(cast(image)), sizes: [config.latentChannels, config.latentChannels], dim: 1)
        return (moments[0], moments[1])
    }

    /// latents [B, latent, h, w] (already divided by `scaling_factor`) → image [B, C, h·f, w·f], unclamped.
    public func decode(_ latents: Tensor) throws -> Tensor {
        guard latents.shape.count == 4, latents.shape[1] == config.latentChannels else {
            throw PEAError.shapeMismatch("vae decode: latents must be [B, \(config.latentChannels), h, w], got \(latents.shape)")
        }
        return try decoder(cast(latents))
    }

    // MARK: Tiled decoding

    /// The latent side of one tile (diffusers' `tile_latent_min_size`: sample_size / 2^(levels − 1)).
    public var tileLatentSize: Int { config.sampleSize / downsamplingFactor }

    /// `decode` with diffusers' `enable_vae_tiling()`, so that memory is one tile's however large the image: a
    /// latent no larger than a tile is decoded whole; a larger one is cut into tiles of `tileLatentSize` starting
    /// every ¾ of a tile, each decoded on its own (post_quant_conv and decoder), then each decoded tile is
    /// blended with the one above over the first ¼ of a sample tile (rows) and with the one to its left
    /// (columns), linearly, and cropped to ¾ of a sample tile. As in diffusers the blends are made in place in
    /// reading order, so a tile's blended edges are what the next row and column blend with. The blending runs
    /// on the host: the decoded tiles have only the image's channels. Answers f32 [B, C, h·f, w·f].
    public func decodeTiled(_ latents: Tensor) throws -> Tensor {
        let backend = latents.backend, tile = tileLatentSize
        guard latents.shape.count == 4, latents.shape[1] == config.latentChannels else {
            throw PEAError.shapeMismatch("vae decode: latents must be [B, \(config.latentChannels), h, w], got \(latents.shape)")
        }
        let (batch, channels, height, width) = (latents.shape[0], latents.shape[1], latents.shape[2], latents.shape[3])
        guard height > tile || width > tile else { return try backend.cast(decode(latents), to: .f32) }
        let stride = Int(Double(tile) * (1 - Self.tileOverlap)), sampleTile = config.sampleSize
        let blend = Int(Double(sampleTile) * Self.tileOverlap), keep = sampleTile - blend
        guard stride > 0 else { throw PEAError.invalidConfig(path: "vae", reason: "'sample_size' \(sampleTile) is too small to tile") }
        let z = try backend.download(latents).floats()

        // Decode every tile: [B, C', th, tw] on the host.
        var rows: [[ImageTile]] = []
        for top in Swift.stride(from: 0, to: height, by: stride) {
            var row: [ImageTile] = []
            for left in Swift.stride(from: 0, to: width, by: stride) {
                let th = min(tile, height - top), tw = min(tile, width - left)
                var values = [Float](repeating: 0, count: batch * channels * th * tw)
                for plane in 0..<(batch * channels) {
                    for y in 0..<th {
                        let source = (plane * height + top + y) * width + left
                        values.replaceSubrange((plane * th + y) * tw ..< (plane * th + y + 1) * tw, with: z[source ..< source + tw])
                    }
                }
                let decoded = try decode(backend.upload(values, shape: [batch, channels, th, tw]))
                row.append(ImageTile(values: try backend.download(decoded).floats(), planes: decoded.shape[0] * decoded.shape[1],
                                     height: decoded.shape[2], width: decoded.shape[3]))
            }
            rows.append(row)
        }
        // Blend in place, in diffusers' order, then crop each tile to keep × keep and lay them out.
        for i in rows.indices {
            for j in rows[i].indices {
                if i > 0 { rows[i][j].blend(fromAbove: rows[i - 1][j], extent: blend) }
                if j > 0 { rows[i][j].blend(fromLeft: rows[i][j - 1], extent: blend) }
            }
        }
        let outHeight = rows.reduce(0) { $0 + min(keep, $1[0].height) }, outWidth = rows[0].reduce(0) { $0 + min(keep, $1.width) }
        let planes = rows[0][0].planes
        var image = [Float](repeating: 0, count: planes * outHeight * outWidth)
        var top = 0
        for row in rows {
            var left = 0
            for t in row {
                let h = min(keep, t.height), w = min(keep, t.width)
                for plane in 0..<planes {
                    for y in 0..<h {
                        let source = (plane * t.height + y) * t.width, target = (plane * outHeight + top + y) * outWidth + left
                        image.replaceSubrange(target ..< target + w, with: t.values[source ..< source + w])
                    }
                }
                left += w
            }
            top += min(keep, row[0].height)
        }
        return try backend.upload(image, shape: [batch, planes / batch, outHeight, outWidth])
    }

    /// diffusers' `tile_overlap_factor`.
    static let tileOverlap = 0.25
}

/// One decoded tile on the host, [planes, height, width] (planes = batch × channels).
struct ImageTile {
    var values: [Float]
    let planes, height, width: Int

    /// diffusers' blend_v: the first `extent` rows (at most both tiles' heights) become
    /// above[last rows] · (1 − y/extent) + self · (y/extent), the weights rounded to f32 as torch rounds a Python float.
    mutating func blend(fromAbove above: ImageTile, extent: Int) {
        let extent = min(above.height, height, extent)
        for plane in 0..<planes {
            for y in 0..<extent {
                let keep = Float(1 - Double(y) / Double(extent)), take = Float(Double(y) / Double(extent))
                let a = (plane * above.height + above.height - extent + y) * above.width, b = (plane * height + y) * width
                for x in 0..<width { values[b + x] = above.values[a + x] * keep + values[b + x] * take }
            }
        }
    }

    /// diffusers' blend_h: the same over the first `extent` columns with the tile to the left.
    mutating func blend(fromLeft left: ImageTile, extent: Int) {
        let extent = min(left.width, width, extent)
        for plane in 0..<planes {
            for y in 0..<height {
                let a = (plane * left.height + y) * left.width + left.width - extent, b = (plane * height + y) * width
                for x in 0..<extent {
                    let keep = Float(1 - Double(x) / Double(extent)), take = Float(Double(x) / Double(extent))
                    values[b + x] = left.values[a + x] * keep + values[b + x] * take
                }
            }
        }
    }
}

/// diffusers' old attention-block names → today's (`_convert_deprecated_attention_blocks`).
func renameLegacyAttention(_ name: String) -> String {
    let renamed = ["query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"]
    var parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
    guard parts.contains("attentions"), parts.count >= 2, let new = renamed[parts[parts.count - 2]] else { return name }
    parts[parts.count - 2] = new
    return parts.joined(separator: ".")
}

/// One value drawn from diffusers' DiagonalGaussianDistribution (`latent_dist.sample(generator)`):
/// mean + exp(0.5 · clamp(logvar, −30, 20)) · ε, in float32, with ε a standard normal draw.
func latentSample(mean: Float, logvar: Float, eps: Float) -> Float {
    mean + expf(0.5 * min(max(logvar, -30), 20)) * eps
}
