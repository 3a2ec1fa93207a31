// diffusers' UNet2DConditionModel for the SD1.x, SD2.x and SDXL families (and LCM's `time_cond_proj_dim`),
// read from a diffusers `unet/` folder. The structure follows diffusers/models/unets/unet_2d_condition.py and
// unet_2d_blocks.py; its config is UNetConfig (UNetConfig.swift). It is the DenoisingModel of those families.

/// The hidden states leaving each block, for feature distillation: `down[i]` after down block i's
/// downsampler, `mid`, and `up[i]` after up block i's upsampler.
public struct UNetFeatures {
    public var down: [Tensor] = []
    public var mid: Tensor?
    public var up: [Tensor] = []
}

/// A down block: resnets, each followed by a transformer in CrossAttnDownBlock2D, then a downsampler unless
/// it is the last block. Every intermediate output is a skip connection for the matching up block.
struct UNetDownBlock {
    let resnets: [ResnetBlock2D]
    let attentions: [Transformer2D]
    let downsampler: Downsample2D?

    func callAsFunction(_ x: Tensor, temb: Tensor, context: Tensor, skips: inout [Tensor]) throws -> Tensor {
        var h = x
        for (i, resnet) in resnets.enumerated() {
            h = try resnet(h, timeEmbedding: temb)
            if !attentions.isEmpty { h = try attentions[i](h, context: context) }
            skips.append(h)
        }
        if let downsampler {
            h = try downsampler(h)
            skips.append(h)
        }
        return h
    }
}

/// UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs.
struct UNetMidBlock {
    let resnets: [ResnetBlock2D]
    let attentions: [Transformer2D]

    func callAsFunction(_ x: Tensor, temb: Tensor, context: Tensor) throws -> Tensor {
        var h = try resnets[0](x, timeEmbedding: temb)
        for (attention, resnet) in zip(attentions, resnets.dropFirst()) {
            h = try resnet(attention(h, context: context), timeEmbedding: temb)
        }
        return h
    }
}

/// An up block: each resnet takes the hidden state concatenated (on channels) with the latest unused skip,
/// followed by a transformer in CrossAttnUpBlock2D; then an upsampler unless it is the last block.
struct UNetUpBlock {
    let resnets: [ResnetBlock2D]
    let attentions: [Transformer2D]
    let upsampler: Upsample2D?

    func callAsFunction(_ x: Tensor, temb: Tensor, context: Tensor, skips: inout [Tensor]) throws -> Tensor {
        var h = x
        for (i, resnet) in resnets.enumerated() {
            let skip = skips.removeLast()
            h = try resnet(h.backend.concat([h, skip], dim: 1), timeEmbedding: temb)
            if !attentions.isEmpty { h = try attentions[i](h, context: context) }
        }
        if let upsampler {
            // to the size of the skip the next block takes: 2× unless the latent was not a multiple of
            // 2^upsamplers (diffusers' forward_upsample_size)
            h = try skips.last.map { try upsampler(h, size: ($0.shape[2], $0.shape[3])) } ?? upsampler(h)
        }
        return h
    }
}

public struct UNet2DConditionModel: DenoisingModel {
    public let config: UNetConfig
    /// conv_in, the time embeddings, the down blocks and the mid block: the half a ControlNet copies.
    let encoder: UNetEncoder
    let upBlocks: [UNetUpBlock]
    let normOut: GroupNorm
    let convOut: Conv2d

    public init(config: UNetConfig, weights w: Weights) throws {
        self.config = config
        let c = config
        let channels = c.blockOutChannels, blocks = channels.count
        let groups = c.normNumGroups, eps = c.normEps, temb = c.timeEmbedDim
        encoder = try UNetEncoder(config: c, weights: w)

        let reversedChannels = Array(channels.reversed()), reversedHeads = Array(c.attentionHeads.reversed())
        let reversedLayers = Array(c.layersPerBlock.reversed()), reversedContext = Array(c.crossAttentionDim.reversed())
        var up: [UNetUpBlock] = []
        for i in 0..<blocks {
            let uw = w["up_blocks.\(i)"]
            let previousOutput = reversedChannels[max(i - 1, 0)], output = reversedChannels[i]
            let input = reversedChannels[min(i + 1, blocks - 1)]
            let count = reversedLayers[i] + 1
            let resnets = try (0..<count).map { j in
                let skipChannels = j == count - 1 ? input : output
                return try ResnetBlock2D(uw["resnets.\(j)"], in: (j == 0 ? previousOutput : output) + skipChannels, out: output,
                                         timeChannels: temb, groups: groups, eps: eps)
            }
            let attentions = c.upBlockHasAttention[i]
                ? try UNetEncoder.transformers(uw, config: c, count: count, channels: output, heads: reversedHeads[i],
                                               layers: c.upTransformerLayersPerBlock[i], contextDim: reversedContext[i]) : []
            let upsampler = i == blocks - 1 ? nil : try Upsample2D(uw["upsamplers.0"], channels: output)
            up.append(UNetUpBlock(resnets: resnets, attentions: attentions, upsampler: upsampler))
        }
        upBlocks = up

        normOut = try GroupNorm(w["conv_norm_out"], groups: groups, channels: channels[0], eps: eps)
        convOut = try Conv2d(w["conv_out"], in: channels[0], out: c.outChannels, kernel: 3)
    }

    /// Loads `config.json` and the weights (`diffusion_pytorch_model[.variant].safetensors`, or a sharded
    /// index) from a diffusers `unet/` folder, or from a pipeline root holding one. `dtype` is the precision the
    /// parameters are stored and computed in (f16/bf16 only on a backend that supports them, i.e. CUDA). `wrap`
    /// may put a source in front of the file's (LoRA merging).
    public static func load(folder: String, backend: any ComputeBackend, variant: String? = nil, dtype: DType = .f32,
                            wrap: (any WeightSource, UNetConfig) -> any WeightSource = { source, _ in source }) throws -> (model: UNet2DConditionModel, unusedWeights: [String]) {
        let component = try ModelFolder.component(folder, "unet")
        let config = try UNetConfig(ConfigFile(path: joinPath(component, "config.json")))
        let file = try SafeTensorsCollection.open(folder: component, baseName: "diffusion_pytorch_model", variant: variant)
        let source = SafeTensorsWeights(file, backend: backend, dtype: dtype)
        let model = try UNet2DConditionModel(config: config, weights: Weights(wrap(source, config)))
        return (model, source.unusedNames)
    }

    /// The dtype the parameters were loaded in, which is the dtype the model computes and answers in (a norm's
    /// scale: weight matrices may be held at half size, `ComputeBackend.halfWeights`).
    public var dtype: DType { normOut.weight.dtype }

    /// 2^(the number of times the latent is halved). A latent whose size is not a multiple of it is halved
    /// rounding up (stride-2 convs), and each upsampler then matches the skip it meets, as diffusers does.
    public var downsamplingFactor: Int { 1 << (config.blockOutChannels.count - 1) }

    public var latentChannels: Int { config.inChannels }
    public var sampleSize: Int? { config.sampleSize }
    public var contextDim: Int { config.crossAttentionDim[0] }
    public var takesTextTime: Bool { config.textTime != nil }
    public var timestepConditionDim: Int? { config.timeCondProjDim }

    /// ε (or v, by the scheduler's `prediction_type`) for `inputs`.
    public func callAsFunction(_ inputs: DenoisingInputs) throws -> Tensor {
        try evaluate(inputs, keepFeatures: false).sample
    }

    /// The prediction and, with `keepFeatures`, every block's output (the feature-distillation targets).
    public func evaluate(_ inputs: DenoisingInputs, keepFeatures: Bool) throws -> (sample: Tensor, features: UNetFeatures) {
        try encoder.checkInputs(inputs, model: "unet", noun: "UNet")
        if let control = inputs.controlResiduals { try checkControlResiduals(control, sample: inputs.sample.shape) }
        let b = inputs.sample.backend, dtype = self.dtype
        // Inputs in another precision than the parameters are cast at the boundary (the kernels take one dtype
        // per call); the output is in the model's dtype.
        func cast(_ x: Tensor) throws -> Tensor { try UNetEncoder.cast(x, to: dtype) }
        let temb = try encoder.embedTime(inputs, dtype: dtype)
        let context = try cast(inputs.encoderHiddenStates)
        var (h, skips, features) = try encoder(cast(inputs.sample), temb: temb, context: context, keepFeatures: keepFeatures)
        // ControlNet: the residuals go into the skips only; the mid block took the down blocks' output as it is.
        if let control = inputs.controlResiduals {
            skips = try zip(skips, control.down).map { try b.add($0, cast($1)) }
        }
        if let mid = inputs.controlResiduals?.mid { h = try b.add(h, cast(mid)) }
        if keepFeatures, encoder.midBlock != nil { features.mid = h }
        for block in upBlocks {
            h = try block(h, temb: temb, context: context, skips: &skips)
            if keepFeatures { features.up.append(h) }
        }
        return (try convOut(normOut(h, silu: true)), features)
    }

    /// The residuals must match the skips one for one, and the mid residual the mid block's output: their
    /// shapes follow from the sample's (each downsampler halves the latent, rounding up).
    private func checkControlResiduals(_ control: ControlResiduals, sample: [Int]) throws {
        let (expected, mid) = encoder.residualShapes(sample: sample)
        guard control.down.count == expected.count else {
            throw PEAError.shapeMismatch("unet: ControlNet gave \(control.down.count) down residuals, this UNet has \(expected.count) skip connections")
        }
        for (i, (residual, shape)) in zip(control.down, expected).enumerated() where residual.shape != shape {
            throw PEAError.shapeMismatch("unet: ControlNet down residual \(i) must be \(shape), got \(residual.shape)")
        }
        guard control.mid.shape == mid else {
            throw PEAError.shapeMismatch("unet: ControlNet mid residual must be \(mid), got \(control.mid.shape)")
        }
    }
}
