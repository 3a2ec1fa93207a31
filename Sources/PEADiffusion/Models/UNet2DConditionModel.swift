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
    let convIn: Conv2d
    let timeProjection: SinusoidalProjection
    let timeConditionProjection: Linear?
    let timeEmbedding: TimestepEmbedding
    let addTimeProjection: SinusoidalProjection?
    let addEmbedding: TimestepEmbedding?
    let downBlocks: [UNetDownBlock]
    let midBlock: UNetMidBlock?
    let upBlocks: [UNetUpBlock]
    let normOut: GroupNorm
    let convOut: Conv2d

    public init(config: UNetConfig, weights w: Weights) throws {
        self.config = config
        let c = config
        let channels = c.blockOutChannels, blocks = channels.count
        let groups = c.normNumGroups, eps = c.normEps, temb = c.timeEmbedDim

        convIn = try Conv2d(w["conv_in"], in: c.inChannels, out: channels[0], kernel: 3)
        timeProjection = SinusoidalProjection(dim: channels[0], flipSinToCos: c.flipSinToCos, downscaleFreqShift: c.freqShift)
        timeConditionProjection = try c.timeCondProjDim.map { try Linear(w["time_embedding.cond_proj"], in: $0, out: channels[0], bias: false) }
        timeEmbedding = try TimestepEmbedding(w["time_embedding"], in: channels[0], out: temb)
        if let textTime = c.textTime {
            addTimeProjection = SinusoidalProjection(dim: textTime.timeEmbedDim, flipSinToCos: c.flipSinToCos, downscaleFreqShift: c.freqShift)
            addEmbedding = try TimestepEmbedding(w["add_embedding"], in: textTime.projectionInputDim, out: temb)
        } else {
            addTimeProjection = nil
            addEmbedding = nil
        }

        func transformers(_ w: Weights, count: Int, channels: Int, heads: Int, layers: Int, contextDim: Int) throws -> [Transformer2D] {
            try (0..<count).map {
                try Transformer2D(w["attentions.\($0)"], channels: channels, heads: heads, contextDim: contextDim, layers: layers,
                                  groups: groups, linearProjection: c.useLinearProjection)
            }
        }

        var down: [UNetDownBlock] = []
        for i in 0..<blocks {
            let bw = w["down_blocks.\(i)"]
            let input = i == 0 ? channels[0] : channels[i - 1], output = channels[i]
            let resnets = try (0..<c.layersPerBlock[i]).map {
                try ResnetBlock2D(bw["resnets.\($0)"], in: $0 == 0 ? input : output, out: output, timeChannels: temb, groups: groups, eps: eps)
            }
            let attentions = c.downBlockHasAttention[i]
                ? try transformers(bw, count: resnets.count, channels: output, heads: c.attentionHeads[i],
                                   layers: c.transformerLayersPerBlock[i], contextDim: c.crossAttentionDim[i]) : []
            let downsampler = i == blocks - 1 ? nil : try Downsample2D(bw["downsamplers.0"], channels: output, padding: .uniform(1))
            down.append(UNetDownBlock(resnets: resnets, attentions: attentions, downsampler: downsampler))
        }
        downBlocks = down

        if c.hasMidBlock {
            let mw = w["mid_block"], last = channels[blocks - 1]
            let resnets = try (0..<2).map {
                try ResnetBlock2D(mw["resnets.\($0)"], in: last, out: last, timeChannels: temb, groups: groups, eps: eps,
                                  outputScale: c.midBlockScaleFactor)
            }
            let attentions = try transformers(mw, count: 1, channels: last, heads: c.attentionHeads[blocks - 1],
                                              layers: c.transformerLayersPerBlock[blocks - 1], contextDim: c.crossAttentionDim[blocks - 1])
            midBlock = UNetMidBlock(resnets: resnets, attentions: attentions)
        } else {
            midBlock = nil
        }

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
                ? try transformers(uw, count: count, channels: output, heads: reversedHeads[i],
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
        try checkInputs(inputs)
        let b = inputs.sample.backend, batch = inputs.sample.shape[0], dtype = self.dtype
        // Inputs in another precision than the parameters are cast at the boundary (the kernels take one dtype
        // per call); the output is in the model's dtype.
        func cast(_ x: Tensor) throws -> Tensor { x.dtype == dtype ? x : try b.cast(x, to: dtype) }
        let sample = try cast(inputs.sample)

        // Time embedding (a single timestep is shared by the batch, as diffusers expands it).
        var timestep = try inputs.timestep.reshaped([-1])
        if timestep.count == 1 && batch > 1 {
            timestep = try b.concat(Array(repeating: timestep, count: batch), dim: 0)
        }
        // timestepEmbedding answers in f32; diffusers casts it to the model dtype (`t_emb.to(dtype=sample.dtype)`).
        var t = try cast(timeProjection(timestep))
        if let timeConditionProjection, let condition = inputs.timestepCondition {
            t = try b.add(t, timeConditionProjection(cast(condition)))
        }
        var temb = try timeEmbedding(t)
        if let addTimeProjection, let addEmbedding, let textEmbeds = inputs.textEmbeds, let timeIds = inputs.timeIds {
            // SDXL: each of the six size/crop numbers gets its own sinusoidal embedding, concatenated after
            // the pooled text embedding.
            // The sizes go through the projection as they come (f32); its f32 answer is cast like `time_proj`'s.
            let timeFeatures = try cast(addTimeProjection(timeIds.reshaped([-1]))).reshaped([batch, -1])
            temb = try b.add(temb, addEmbedding(b.concat([cast(textEmbeds), timeFeatures], dim: 1)))
        }
        // Every resnet applies SiLU to the embedding before its projection; do it once here.
        temb = try b.activation(temb, .silu)

        var features = UNetFeatures()
        let context = try cast(inputs.encoderHiddenStates)
        var h = try convIn(sample)
        var skips = [h]
        for block in downBlocks {
            h = try block(h, temb: temb, context: context, skips: &skips)
            if keepFeatures { features.down.append(h) }
        }
        // ControlNet: the residuals go into the skips only; the mid block takes the down blocks' output as it is.
        if let control = inputs.controlResiduals {
            skips = try zip(skips, control.down).map { try b.add($0, cast($1)) }
        }
        if let midBlock {
            h = try midBlock(h, temb: temb, context: context)
        }
        if let mid = inputs.controlResiduals?.mid { h = try b.add(h, cast(mid)) }
        if keepFeatures, midBlock != nil { features.mid = h }
        for block in upBlocks {
            h = try block(h, temb: temb, context: context, skips: &skips)
            if keepFeatures { features.up.append(h) }
        }
        return (try convOut(normOut(h, silu: true)), features)
    }

    private func checkInputs(_ inputs: DenoisingInputs) throws {
        let c = config, shape = inputs.sample.shape
        guard shape.count == 4, shape[1] == c.inChannels else {
            throw PEAError.shapeMismatch("unet: sample must be [B, \(c.inChannels), H, W], got \(shape)")
        }
        guard shape[2] > 0, shape[3] > 0 else {
            throw PEAError.shapeMismatch("unet: latent height and width must be positive, got \(shape[2])×\(shape[3])")
        }
        let batch = shape[0], context = inputs.encoderHiddenStates.shape
        guard inputs.timestep.count == batch || inputs.timestep.count == 1 else {
            throw PEAError.shapeMismatch("unet: timestep must have 1 or \(batch) values, got shape \(inputs.timestep.shape)")
        }
        guard context.count == 3, context[0] == batch, context[2] == c.crossAttentionDim[0] else {
            throw PEAError.shapeMismatch("unet: encoder_hidden_states must be [\(batch), T, \(c.crossAttentionDim[0])], got \(context)")
        }
        if let textTime = c.textTime {
            guard let (textEmbeds, timeIds) = inputs.textTime else {
                throw PEAError.shapeMismatch("unet: this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids")
            }
            guard timeIds.shape.count == 2, timeIds.shape[0] == batch, textEmbeds.shape.count == 2, textEmbeds.shape[0] == batch,
                  textEmbeds.shape[1] + timeIds.shape[1] * textTime.timeEmbedDim == textTime.projectionInputDim else {
                throw PEAError.shapeMismatch("unet: text_embeds \(textEmbeds.shape) and time_ids \(timeIds.shape) do not give projection_class_embeddings_input_dim \(textTime.projectionInputDim) for batch \(batch)")
            }
        } else if inputs.textEmbeds != nil || inputs.timeIds != nil {
            throw PEAError.unsupported("unet: this UNet takes no text_embeds or time_ids (its config has no addition_embed_type \"text_time\"; SDXL's UNets do)")
        }
        if let dim = c.timeCondProjDim {
            guard let condition = inputs.timestepCondition, condition.shape == [batch, dim] else {
                throw PEAError.shapeMismatch("unet: this UNet (time_cond_proj_dim \(dim)) needs timestep_cond [\(batch), \(dim)]")
            }
        } else if inputs.timestepCondition != nil {
            throw PEAError.unsupported("unet: this UNet takes no timestep_cond (its config has no time_cond_proj_dim; LCM's UNets do)")
        }
        if let control = inputs.controlResiduals { try checkControlResiduals(control, sample: shape) }
    }

    /// The residuals must match the skips one for one, and the mid residual the mid block's output: their
    /// shapes follow from the sample's (each downsampler halves the latent, rounding up).
    private func checkControlResiduals(_ control: ControlResiduals, sample: [Int]) throws {
        let channels = config.blockOutChannels
        var height = sample[2], width = sample[3]
        var expected = [[sample[0], channels[0], height, width]]
        for (i, layers) in config.layersPerBlock.enumerated() {
            expected += Array(repeating: [sample[0], channels[i], height, width], count: layers)
            if i < channels.count - 1 {
                (height, width) = ((height + 1) / 2, (width + 1) / 2)
                expected.append([sample[0], channels[i], height, width])
            }
        }
        guard control.down.count == expected.count else {
            throw PEAError.shapeMismatch("unet: ControlNet gave \(control.down.count) down residuals, this UNet has \(expected.count) skip connections")
        }
        for (i, (residual, shape)) in zip(control.down, expected).enumerated() where residual.shape != shape {
            throw PEAError.shapeMismatch("unet: ControlNet down residual \(i) must be \(shape), got \(residual.shape)")
        }
        let mid = [sample[0], channels[channels.count - 1], height, width]
        guard control.mid.shape == mid else {
            throw PEAError.shapeMismatch("unet: ControlNet mid residual must be \(mid), got \(control.mid.shape)")
        }
    }
}
