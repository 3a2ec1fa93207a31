// diffusers' ControlNetModel (diffusers/models/controlnets/controlnet.py) for the SD1.x/SD2.x and SDXL families,
// read from a diffusers ControlNet folder. It is a copy of its UNet's encoder half (UNetEncoder: conv_in, time
// and SDXL text_time embeddings, down blocks, mid block) whose input also gets a small conv net's embedding of
// the control image, and whose every skip connection and mid output goes through a 1×1 conv: those are the
// residuals the UNet adds to its own (ControlResiduals). Not supported: guess mode, global_pool_conditions
// (refused by the config), class embeddings and LCM's timestep_cond (a ControlNet has none).

/// The fields of a ControlNet's `config.json`: the encoder half's (UNetConfig, encoderOnly) and the control
/// image's embedding.
public struct ControlNetConfig {
    public var unet: UNetConfig
    /// Channels of the control image (`conditioning_channels`, 3).
    public var conditioningChannels: Int
    /// `conditioning_embedding_out_channels`: the embedding's widths, each after the first one step of 2× downsampling.
    public var conditioningEmbeddingChannels: [Int]
    /// `controlnet_conditioning_channel_order` "bgr": the image's channels are reversed before the embedding.
    public var bgr: Bool

    /// How many pixels of the control image make one latent cell: 2^(stride-2 convs) of the embedding.
    public var conditioningDownsampling: Int { 1 << (conditioningEmbeddingChannels.count - 1) }

    public init(_ config: ConfigFile) throws {
        unet = try UNetConfig(config, encoderOnly: true)
        func fail(_ key: String, _ reason: String) -> PEAError { .invalidConfig(path: config.path, reason: "'\(key)': \(reason)") }
        conditioningChannels = try config.int("conditioning_channels", default: 3, range: .atLeast(1))
        conditioningEmbeddingChannels = try config.contains("conditioning_embedding_out_channels") && config.value("conditioning_embedding_out_channels") != .null
            ? config.intList("conditioning_embedding_out_channels", range: .atLeast(1)) : [16, 32, 96, 256]
        guard !conditioningEmbeddingChannels.isEmpty else { throw fail("conditioning_embedding_out_channels", "is empty") }
        switch try config.string("controlnet_conditioning_channel_order", default: "rgb") {
        case "rgb": bgr = false
        case "bgr": bgr = true
        case let other: throw fail("controlnet_conditioning_channel_order", "\"\(other)\" is not supported (\"rgb\", \"bgr\")")
        }
        if try config.bool("global_pool_conditions", default: false) {
            throw fail("global_pool_conditions", "true is not supported (shuffle-type ControlNets)")
        }
    }
}

/// ControlNetConditioningEmbedding: conv_in, SiLU, then per width step a 3×3 conv and a stride-2 3×3 conv each
/// followed by SiLU, then conv_out to the UNet's first width.
struct ControlNetConditioningEmbedding {
    let convIn: Conv2d
    let blocks: [Conv2d]
    let convOut: Conv2d

    init(_ w: Weights, conditioningChannels: Int, channels: [Int], outChannels: Int) throws {
        convIn = try Conv2d(w["conv_in"], in: conditioningChannels, out: channels[0], kernel: 3)
        var blocks: [Conv2d] = []
        for (i, (input, output)) in zip(channels, channels.dropFirst()).enumerated() {
            blocks.append(try Conv2d(w["blocks.\(2 * i)"], in: input, out: input, kernel: 3))
            blocks.append(try Conv2d(w["blocks.\(2 * i + 1)"], in: input, out: output, kernel: 3, stride: 2))
        }
        self.blocks = blocks
        convOut = try Conv2d(w["conv_out"], in: channels[channels.count - 1], out: outChannels, kernel: 3)
    }

    func callAsFunction(_ x: Tensor) throws -> Tensor {
        let b = x.backend
        var h = try b.activation(convIn(x), .silu)
        for conv in blocks { h = try b.activation(conv(h), .silu) }
        return try convOut(h)
    }
}

public final class ControlNetModel {
    public let config: ControlNetConfig
    /// The folder it was loaded from (for messages), or a description.
    public let path: String
    let encoder: UNetEncoder
    let conditioningEmbedding: ControlNetConditioningEmbedding
    /// `controlnet_down_blocks.{i}`: one 1×1 conv per skip connection.
    let downProjections: [Conv2d]
    let midProjection: Conv2d

    public init(config: ControlNetConfig, weights w: Weights, path: String) throws {
        self.config = config
        self.path = path
        let c = config.unet
        let encoder = try UNetEncoder(config: c, weights: w)
        self.encoder = encoder
        conditioningEmbedding = try ControlNetConditioningEmbedding(w["controlnet_cond_embedding"], conditioningChannels: config.conditioningChannels,
                                                                    channels: config.conditioningEmbeddingChannels, outChannels: c.blockOutChannels[0])
        downProjections = try encoder.skips.enumerated().map { i, skip in
            try Conv2d(w["controlnet_down_blocks.\(i)"], in: skip.channels, out: skip.channels, kernel: 1)
        }
        let last = c.blockOutChannels[c.blockOutChannels.count - 1]
        midProjection = try Conv2d(w["controlnet_mid_block"], in: last, out: last, kernel: 1)
    }

    /// Loads `config.json` and `diffusion_pytorch_model[.variant].safetensors` (or a sharded index) from a
    /// diffusers ControlNet folder, in `dtype` as UNet2DConditionModel.load does (the backend's halfWeights apply).
    public static func load(folder: String, backend: any ComputeBackend, variant: String? = nil,
                            dtype: DType = .f32) throws -> (model: ControlNetModel, unusedWeights: [String]) {
        guard isRegularFile(joinPath(folder, "config.json")) else {
            throw PEAError.invalidFile(path: folder, reason: "not a diffusers ControlNet folder (no config.json)")
        }
        let configFile = try ConfigFile(path: joinPath(folder, "config.json"))
        if let name = try configFile.optionalString("_class_name"), name != "ControlNetModel" {
            throw PEAError.invalidFile(path: folder, reason: "config.json describes a \(name), not a ControlNetModel")
        }
        let config = try ControlNetConfig(configFile)
        let file = try SafeTensorsCollection.open(folder: folder, baseName: "diffusion_pytorch_model", variant: variant)
        let source = SafeTensorsWeights(file, backend: backend, dtype: dtype)
        let model = try ControlNetModel(config: config, weights: Weights(source), path: folder)
        return (model, source.unusedNames)
    }

    /// The dtype it computes and answers in (a vector parameter's: matrices may be held at half size).
    public var dtype: DType { encoder.timeEmbedding.linear1.bias?.dtype ?? .f32 }

    /// diffusers' `controlnet(sample, t, encoder_hidden_states, controlnet_cond=condition, conditioning_scale=scale,
    /// added_cond_kwargs)`: `condition` is the control image [B, conditioning_channels, H, W] in [0, 1], H×W the
    /// latent's × `conditioningDownsampling`. The residuals, × `scale`, are in the model's dtype.
    public func callAsFunction(_ inputs: DenoisingInputs, condition: Tensor, scale: Float) throws -> ControlResiduals {
        try encoder.checkInputs(inputs, model: "controlnet", noun: "ControlNet")
        let sample = inputs.sample.shape, factor = config.conditioningDownsampling
        let expected = [sample[0], config.conditioningChannels, sample[2] * factor, sample[3] * factor]
        guard condition.shape == expected else {
            throw PEAError.shapeMismatch("controlnet: the control image must be \(expected) for a latent of \(sample), got \(condition.shape)")
        }
        let b = inputs.sample.backend, dtype = self.dtype
        func cast(_ x: Tensor) throws -> Tensor { try UNetEncoder.cast(x, to: dtype) }
        var image = try cast(condition)
        if config.bgr {
            image = try b.concat(b.split(image, sizes: Array(repeating: 1, count: expected[1]), dim: 1).reversed(), dim: 1)
        }
        let temb = try encoder.embedTime(inputs, dtype: dtype)
        let (hidden, skips, _) = try encoder(cast(inputs.sample), temb: temb, context: cast(inputs.encoderHiddenStates),
                                             inputResidual: conditioningEmbedding(image), keepFeatures: false)
        let down = try zip(skips, downProjections).map { try b.scale($1($0), by: scale) }
        return ControlResiduals(down: down, mid: try b.scale(midProjection(hidden), by: scale))
    }

    /// Refuses a ControlNet that does not fit `unet`: its residuals must match the UNet's skips (widths and
    /// layers), it must attend to the same text width, and take SDXL's added conditioning exactly when the UNet does.
    public func checkCompatible(with unet: UNetConfig) throws {
        let c = config.unet
        func refuse(_ what: String) -> PEAError {
            .invalidFile(path: path, reason: "this ControlNet does not fit the pipeline's UNet: \(what) (a ControlNet for another model family?)")
        }
        guard c.crossAttentionDim[0] == unet.crossAttentionDim[0] else {
            throw refuse("cross_attention_dim \(c.crossAttentionDim[0]), the UNet's \(unet.crossAttentionDim[0])")
        }
        guard (c.textTime == nil) == (unet.textTime == nil), c.pooledTextDim == unet.pooledTextDim else {
            let describe = { (config: UNetConfig) in config.textTime == nil ? "no SDXL text_time embedding" : "SDXL text_time embedding (pooled width \(config.pooledTextDim!))" }
            throw refuse("\(describe(c)), the UNet has \(describe(unet))")
        }
        guard c.blockOutChannels == unet.blockOutChannels, c.layersPerBlock == unet.layersPerBlock, c.inChannels == unet.inChannels else {
            throw refuse("block_out_channels \(c.blockOutChannels), layers_per_block \(c.layersPerBlock), in_channels \(c.inChannels); the UNet's \(unet.blockOutChannels), \(unet.layersPerBlock), \(unet.inChannels)")
        }
    }
}
