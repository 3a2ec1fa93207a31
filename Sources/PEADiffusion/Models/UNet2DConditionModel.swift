// diffusers' UNet2DConditionModel for the SD1.x, SD2.x and SDXL families (and LCM's `time_cond_proj_dim`),
// read from a diffusers `unet/` folder. The structure follows diffusers/models/unets/unet_2d_condition.py and
// unet_2d_blocks.py; every config field those families use is honoured, and any other value is an error
// naming the field rather than a silently different model.

/// The fields of a UNet's `config.json` that shape the model, resolved as diffusers resolves them.
public struct UNetConfig {
    public var inChannels: Int
    public var outChannels: Int
    public var blockOutChannels: [Int]
    public var downBlockHasAttention: [Bool]
    public var upBlockHasAttention: [Bool]
    public var layersPerBlock: [Int]
    /// Heads per down block (diffusers: `num_attention_heads`, or the legacy `attention_head_dim` when that is null).
    public var attentionHeads: [Int]
    public var transformerLayersPerBlock: [Int]
    /// Per up block, in up-block order (diffusers' `reverse_transformer_layers_per_block`, or the down list reversed).
    public var upTransformerLayersPerBlock: [Int]
    public var crossAttentionDim: [Int]
    public var useLinearProjection: Bool
    /// `upcast_attention`, read for the record: the attention kernels accumulate in f32 whatever it says (Attention).
    public var upcastAttention: Bool
    public var normNumGroups: Int
    public var normEps: Float
    public var flipSinToCos: Bool
    public var freqShift: Float
    public var midBlockScaleFactor: Float
    public var hasMidBlock: Bool
    /// SDXL: `addition_embed_type: "text_time"`.
    public var textTime: (timeEmbedDim: Int, projectionInputDim: Int)?
    /// LCM: a guidance embedding added to the timestep before `time_embedding`.
    public var timeCondProjDim: Int?
    public var sampleSize: Int?

    public var timeEmbedDim: Int { blockOutChannels[0] * 4 }

    /// Reads and checks `config.json`; unsupported values throw, naming the field.
    public init(_ config: ConfigFile) throws {
        func fail(_ key: String, _ reason: String) -> PEAError {
            .invalidConfig(path: config.path, reason: "'\(key)': \(reason)")
        }
        func requireValue(_ key: String, _ allowed: [String?], default defaultValue: String?) throws {
            let value = try config.optionalString(key) ?? defaultValue
            guard allowed.contains(value) else {
                throw fail(key, "\(value.map { "\"\($0)\"" } ?? "null") is not supported (Pea supports \(allowed.map { $0 ?? "null" }.joined(separator: ", ")))")
            }
        }

        inChannels = try config.int("in_channels", default: 4)
        outChannels = try config.int("out_channels", default: 4)
        blockOutChannels = try config.contains("block_out_channels") ? config.intList("block_out_channels") : [320, 640, 1280, 1280]
        let blocks = blockOutChannels.count
        guard blocks > 0 else { throw fail("block_out_channels", "is empty") }

        let downTypes = try config.contains("down_block_types") ? config.stringList("down_block_types")
            : ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        let upTypes = try config.contains("up_block_types") ? config.stringList("up_block_types")
            : ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        guard downTypes.count == blocks else { throw fail("down_block_types", "has \(downTypes.count) entries for \(blocks) blocks") }
        guard upTypes.count == blocks else { throw fail("up_block_types", "has \(upTypes.count) entries for \(blocks) blocks") }
        downBlockHasAttention = try downTypes.map {
            switch $0 {
            case "CrossAttnDownBlock2D": return true
            case "DownBlock2D": return false
            default: throw fail("down_block_types", "block type \"\($0)\" is not supported (CrossAttnDownBlock2D, DownBlock2D)")
            }
        }
        upBlockHasAttention = try upTypes.map {
            switch $0 {
            case "CrossAttnUpBlock2D": return true
            case "UpBlock2D": return false
            default: throw fail("up_block_types", "block type \"\($0)\" is not supported (CrossAttnUpBlock2D, UpBlock2D)")
            }
        }
        switch config.value("mid_block_type") {
        case nil, .string("UNetMidBlock2DCrossAttn"): hasMidBlock = true
        case .null: hasMidBlock = false
        default: throw fail("mid_block_type", "only UNetMidBlock2DCrossAttn (or null) is supported")
        }

        layersPerBlock = try config.contains("layers_per_block") ? config.intOrList("layers_per_block", count: blocks) : Array(repeating: 2, count: blocks)
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` — the legacy config field
        // `attention_head_dim` has always meant the number of heads when `num_attention_heads` is not given.
        if config.value("num_attention_heads").map({ $0 != .null }) ?? false {
            attentionHeads = try config.intOrList("num_attention_heads", count: blocks)
        } else {
            attentionHeads = try config.contains("attention_head_dim") && config.value("attention_head_dim") != .null
                ? config.intOrList("attention_head_dim", count: blocks) : Array(repeating: 8, count: blocks)
        }
        transformerLayersPerBlock = try config.contains("transformer_layers_per_block")
            ? config.intOrList("transformer_layers_per_block", count: blocks) : Array(repeating: 1, count: blocks)
        if config.value("reverse_transformer_layers_per_block").map({ $0 != .null }) ?? false {
            // Per up block, each entry an int or a list per layer; only one count per block is supported.
            guard case .array(let rows) = config.value("reverse_transformer_layers_per_block")!, rows.count == blocks else {
                throw fail("reverse_transformer_layers_per_block", "expected a list of \(blocks) entries")
            }
            upTransformerLayersPerBlock = try rows.map { row in
                let counts: [Double]
                switch row {
                case .number(let n): counts = [n]
                case .array(let items): counts = try items.map { if case .number(let n) = $0 { return n }; throw fail("reverse_transformer_layers_per_block", "entries must be integers") }
                default: throw fail("reverse_transformer_layers_per_block", "entries must be integers or lists")
                }
                guard let first = counts.first, counts.allSatisfy({ $0 == first }), let n = Int(exactly: first) else {
                    throw fail("reverse_transformer_layers_per_block", "different transformer depths within one block are not supported")
                }
                return n
            }
        } else {
            upTransformerLayersPerBlock = transformerLayersPerBlock.reversed()
        }
        crossAttentionDim = try config.contains("cross_attention_dim") ? config.intOrList("cross_attention_dim", count: blocks) : Array(repeating: 1280, count: blocks)
        useLinearProjection = try config.bool("use_linear_projection", default: false)
        upcastAttention = try config.bool("upcast_attention", default: false)
        normNumGroups = try config.int("norm_num_groups", default: 32)
        normEps = Float(try config.double("norm_eps", default: 1e-5))
        flipSinToCos = try config.bool("flip_sin_to_cos", default: true)
        freqShift = Float(try config.double("freq_shift", default: 0))
        midBlockScaleFactor = Float(try config.double("mid_block_scale_factor", default: 1))
        sampleSize = try config.optionalInt("sample_size")
        timeCondProjDim = try config.optionalInt("time_cond_proj_dim")

        switch try config.optionalString("addition_embed_type") {
        case nil: textTime = nil
        case "text_time":
            textTime = (try config.int("addition_time_embed_dim"), try config.int("projection_class_embeddings_input_dim"))
        case let other?: throw fail("addition_embed_type", "\"\(other)\" is not supported (null, \"text_time\")")
        }

        // Fields whose other values would change the model in ways Pea does not implement.
        try requireValue("act_fn", ["silu"], default: "silu")
        try requireValue("resnet_time_scale_shift", ["default"], default: "default")
        try requireValue("time_embedding_type", ["positional"], default: "positional")
        try requireValue("class_embed_type", [nil], default: nil)
        try requireValue("encoder_hid_dim_type", [nil], default: nil)
        try requireValue("timestep_post_act", [nil], default: nil)
        try requireValue("time_embedding_act_fn", [nil], default: nil)
        try requireValue("attention_type", ["default"], default: "default")
        try requireValue("cross_attention_norm", [nil], default: nil)
        for flag in ["dual_cross_attention", "center_input_sample", "resnet_skip_time_act", "mid_block_only_cross_attention", "class_embeddings_concat"] {
            if try config.bool(flag, default: false) { throw fail(flag, "true is not supported") }
        }
        if case .array(let values)? = config.value("only_cross_attention") {
            if values.contains(.bool(true)) { throw fail("only_cross_attention", "true is not supported") }
        } else if try config.bool("only_cross_attention", default: false) {
            throw fail("only_cross_attention", "true is not supported")
        }
        for key in ["num_class_embeds", "encoder_hid_dim", "time_embedding_dim"] {
            if try config.optionalInt(key) != nil { throw fail(key, "is set, which Pea does not support") }
        }
        if try config.int("conv_in_kernel", default: 3) != 3 { throw fail("conv_in_kernel", "only 3 is supported") }
        if try config.int("conv_out_kernel", default: 3) != 3 { throw fail("conv_out_kernel", "only 3 is supported") }
        if try config.double("resnet_out_scale_factor", default: 1) != 1 { throw fail("resnet_out_scale_factor", "only 1.0 is supported") }
        if try config.double("downsample_padding", default: 1) != 1 { throw fail("downsample_padding", "only 1 is supported") }
        for (i, channels) in blockOutChannels.enumerated() where channels % normNumGroups != 0 || channels % attentionHeads[i] != 0 {
            throw fail("block_out_channels", "\(channels) channels of block \(i) do not split into \(normNumGroups) groups and \(attentionHeads[i]) heads")
        }
    }
}

/// The inputs of one UNet evaluation. `textEmbeds` and `timeIds` are SDXL's added conditions;
/// `timestepCondition` LCM's guidance embedding.
public struct UNetInputs {
    public var sample: Tensor
    public var timestep: Tensor
    public var encoderHiddenStates: Tensor
    public var textEmbeds: Tensor?
    public var timeIds: Tensor?
    public var timestepCondition: Tensor?

    public init(sample: Tensor, timestep: Tensor, encoderHiddenStates: Tensor, textEmbeds: Tensor? = nil,
                timeIds: Tensor? = nil, timestepCondition: Tensor? = nil) {
        self.sample = sample
        self.timestep = timestep
        self.encoderHiddenStates = encoderHiddenStates
        self.textEmbeds = textEmbeds
        self.timeIds = timeIds
        self.timestepCondition = timestepCondition
    }
}

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

public struct UNet2DConditionModel {
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
    /// parameters are stored and computed in (f16/bf16 only on a backend that supports them, i.e. CUDA).
    public static func load(folder: String, backend: any ComputeBackend, variant: String? = nil,
                            dtype: DType = .f32) throws -> (model: UNet2DConditionModel, unusedWeights: [String]) {
        let component = try ModelFolder.component(folder, "unet")
        let config = try UNetConfig(ConfigFile(path: joinPath(component, "config.json")))
        let file = try SafeTensorsCollection.open(folder: component, baseName: "diffusion_pytorch_model", variant: variant)
        let source = SafeTensorsWeights(file, backend: backend, dtype: dtype)
        let model = try UNet2DConditionModel(config: config, weights: Weights(source))
        return (model, source.unusedNames)
    }

    /// The dtype the parameters were loaded in, which is the dtype the model computes and answers in.
    public var dtype: DType { convIn.weight.dtype }

    /// 2^(the number of times the latent is halved). A latent whose size is not a multiple of it is halved
    /// rounding up (stride-2 convs), and each upsampler then matches the skip it meets, as diffusers does.
    public var downsamplingFactor: Int { 1 << (config.blockOutChannels.count - 1) }

    /// ε (or v, by the scheduler's `prediction_type`) for `inputs`.
    public func callAsFunction(_ inputs: UNetInputs) throws -> Tensor {
        try evaluate(inputs, keepFeatures: false).sample
    }

    /// The prediction and, with `keepFeatures`, every block's output (the feature-distillation targets).
    public func evaluate(_ inputs: UNetInputs, keepFeatures: Bool) throws -> (sample: Tensor, features: UNetFeatures) {
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
        if let midBlock {
            h = try midBlock(h, temb: temb, context: context)
            if keepFeatures { features.mid = h }
        }
        for block in upBlocks {
            h = try block(h, temb: temb, context: context, skips: &skips)
            if keepFeatures { features.up.append(h) }
        }
        return (try convOut(normOut(h, silu: true)), features)
    }

    private func checkInputs(_ inputs: UNetInputs) throws {
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
            guard let textEmbeds = inputs.textEmbeds, let timeIds = inputs.timeIds else {
                throw PEAError.shapeMismatch("unet: this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids")
            }
            guard timeIds.shape.count == 2, timeIds.shape[0] == batch, textEmbeds.shape.count == 2, textEmbeds.shape[0] == batch,
                  textEmbeds.shape[1] + timeIds.shape[1] * textTime.timeEmbedDim == textTime.projectionInputDim else {
                throw PEAError.shapeMismatch("unet: text_embeds \(textEmbeds.shape) and time_ids \(timeIds.shape) do not give projection_class_embeddings_input_dim \(textTime.projectionInputDim) for batch \(batch)")
            }
        }
        if let dim = c.timeCondProjDim {
            guard let condition = inputs.timestepCondition, condition.shape == [batch, dim] else {
                throw PEAError.shapeMismatch("unet: this UNet (time_cond_proj_dim \(dim)) needs timestep_cond [\(batch), \(dim)]")
            }
        }
    }
}
