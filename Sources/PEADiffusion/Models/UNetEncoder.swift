// The encoder half of diffusers' UNet2DConditionModel: conv_in, the time embedding (with LCM's cond_proj and
// SDXL's text_time add_embedding), the down blocks and the mid block. The UNet (UNet2DConditionModel.swift) and
// the ControlNet (ControlNetModel.swift) are both built on it, under the same parameter names, as diffusers'
// ControlNetModel copies those modules from the UNet.

struct UNetEncoder {
    let config: UNetConfig
    let convIn: Conv2d
    let timeProjection: SinusoidalProjection
    let timeConditionProjection: Linear?
    let timeEmbedding: TimestepEmbedding
    let addTimeProjection: SinusoidalProjection?
    let addEmbedding: TimestepEmbedding?
    let downBlocks: [UNetDownBlock]
    let midBlock: UNetMidBlock?

    init(config c: UNetConfig, weights w: Weights) throws {
        config = c
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

        var down: [UNetDownBlock] = []
        for i in 0..<blocks {
            let bw = w["down_blocks.\(i)"]
            let input = i == 0 ? channels[0] : channels[i - 1], output = channels[i]
            let resnets = try (0..<c.layersPerBlock[i]).map {
                try ResnetBlock2D(bw["resnets.\($0)"], in: $0 == 0 ? input : output, out: output, timeChannels: temb, groups: groups, eps: eps)
            }
            let attentions = c.downBlockHasAttention[i]
                ? try Self.transformers(bw, config: c, count: resnets.count, channels: output, heads: c.attentionHeads[i],
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
            let attentions = try Self.transformers(mw, config: c, count: 1, channels: last, heads: c.attentionHeads[blocks - 1],
                                                   layers: c.transformerLayersPerBlock[blocks - 1], contextDim: c.crossAttentionDim[blocks - 1])
            midBlock = UNetMidBlock(resnets: resnets, attentions: attentions)
        } else {
            midBlock = nil
        }
    }

    /// A block's `attentions.{i}` transformers.
    static func transformers(_ w: Weights, config c: UNetConfig, count: Int, channels: Int, heads: Int, layers: Int,
                             contextDim: Int) throws -> [Transformer2D] {
        try (0..<count).map {
            try Transformer2D(w["attentions.\($0)"], channels: channels, heads: heads, contextDim: contextDim, layers: layers,
                              groups: c.normNumGroups, linearProjection: c.useLinearProjection)
        }
    }

    /// Inputs in another precision than the parameters are cast at the boundary (the kernels take one dtype per call).
    static func cast(_ x: Tensor, to dtype: DType) throws -> Tensor { x.dtype == dtype ? x : try x.backend.cast(x, to: dtype) }

    /// The time embedding every resnet takes, after the SiLU each applies first (done once here).
    func embedTime(_ inputs: DenoisingInputs, dtype: DType) throws -> Tensor {
        let b = inputs.sample.backend, batch = inputs.sample.shape[0]
        func cast(_ x: Tensor) throws -> Tensor { try Self.cast(x, to: dtype) }
        // A single timestep is shared by the batch, as diffusers expands it.
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
        return try b.activation(temb, .silu)
    }

    /// conv_in(sample) (+ `inputResidual`: a ControlNet's conditioning embedding), the down blocks and the mid
    /// block: the mid block's output (or the down blocks' without one), every skip connection in order, and
    /// with `keepFeatures` each down block's output. `sample` and `context` are in the model's dtype.
    func callAsFunction(_ sample: Tensor, temb: Tensor, context: Tensor, inputResidual: Tensor? = nil,
                        keepFeatures: Bool) throws -> (hidden: Tensor, skips: [Tensor], features: UNetFeatures) {
        var features = UNetFeatures()
        var h = try convIn(sample)
        if let inputResidual { h = try h.backend.add(h, inputResidual) }
        var skips = [h]
        for block in downBlocks {
            h = try block(h, temb: temb, context: context, skips: &skips)
            if keepFeatures { features.down.append(h) }
        }
        if let midBlock {
            h = try midBlock(h, temb: temb, context: context)
        }
        return (h, skips, features)
    }

    /// Each skip connection's channels and how many downsamplers come before it, in order: conv_in's output, then
    /// every down block's resnets' and downsampler's.
    var skips: [(channels: Int, level: Int)] {
        let channels = config.blockOutChannels
        var skips = [(channels: channels[0], level: 0)]
        for (i, layers) in config.layersPerBlock.enumerated() {
            skips += Array(repeating: (channels: channels[i], level: i), count: layers)
            if i < channels.count - 1 { skips.append((channels: channels[i], level: i + 1)) }
        }
        return skips
    }

    /// The shapes of the skip connections and of the mid block's output for a sample of `shape` [B, C, H, W]:
    /// each downsampler halves the latent, rounding up (stride-2 convs).
    func residualShapes(sample shape: [Int]) -> (down: [[Int]], mid: [Int]) {
        func halved(_ size: Int, _ times: Int) -> Int { (0..<times).reduce(size) { size, _ in (size + 1) / 2 } }
        let down = skips.map { [shape[0], $0.channels, halved(shape[2], $0.level), halved(shape[3], $0.level)] }
        let channels = config.blockOutChannels, levels = channels.count - 1
        return (down, [shape[0], channels[levels], halved(shape[2], levels), halved(shape[3], levels)])
    }

    /// Refuses inputs this model cannot take, naming `model` in the message ("unet", "controlnet") and `noun`
    /// for the kind of model ("UNet", "ControlNet").
    func checkInputs(_ inputs: DenoisingInputs, model: String, noun: String) throws {
        let c = config, shape = inputs.sample.shape
        guard shape.count == 4, shape[1] == c.inChannels else {
            throw PEAError.shapeMismatch("\(model): sample must be [B, \(c.inChannels), H, W], got \(shape)")
        }
        guard shape[2] > 0, shape[3] > 0 else {
            throw PEAError.shapeMismatch("\(model): latent height and width must be positive, got \(shape[2])×\(shape[3])")
        }
        let batch = shape[0], context = inputs.encoderHiddenStates.shape
        guard inputs.timestep.count == batch || inputs.timestep.count == 1 else {
            throw PEAError.shapeMismatch("\(model): timestep must have 1 or \(batch) values, got shape \(inputs.timestep.shape)")
        }
        guard context.count == 3, context[0] == batch, context[2] == c.crossAttentionDim[0] else {
            throw PEAError.shapeMismatch("\(model): encoder_hidden_states must be [\(batch), T, \(c.crossAttentionDim[0])], got \(context)")
        }
        if let textTime = c.textTime {
            guard let (textEmbeds, timeIds) = inputs.textTime else {
                throw PEAError.shapeMismatch("\(model): this \(noun) (addition_embed_type \"text_time\") needs text_embeds and time_ids")
            }
            guard timeIds.shape.count == 2, timeIds.shape[0] == batch, textEmbeds.shape.count == 2, textEmbeds.shape[0] == batch,
                  textEmbeds.shape[1] + timeIds.shape[1] * textTime.timeEmbedDim == textTime.projectionInputDim else {
                throw PEAError.shapeMismatch("\(model): text_embeds \(textEmbeds.shape) and time_ids \(timeIds.shape) do not give projection_class_embeddings_input_dim \(textTime.projectionInputDim) for batch \(batch)")
            }
        } else if inputs.textEmbeds != nil || inputs.timeIds != nil {
            throw PEAError.unsupported("\(model): this \(noun) takes no text_embeds or time_ids (its config has no addition_embed_type \"text_time\"; SDXL's UNets do)")
        }
        if let dim = c.timeCondProjDim {
            guard let condition = inputs.timestepCondition, condition.shape == [batch, dim] else {
                throw PEAError.shapeMismatch("\(model): this \(noun) (time_cond_proj_dim \(dim)) needs timestep_cond [\(batch), \(dim)]")
            }
        } else if inputs.timestepCondition != nil {
            throw PEAError.unsupported("\(model): this \(noun) takes no timestep_cond (its config has no time_cond_proj_dim; LCM's UNets do)")
        }
    }
}
