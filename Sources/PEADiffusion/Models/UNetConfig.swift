// The UNet's `config.json` as diffusers' UNet2DConditionModel reads it, for the SD1.x, SD2.x and SDXL families (and
// LCM's `time_cond_proj_dim`). Every config field those families use is honoured, and any other value is an error
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
    /// SDXL: the width of the pooled text embedding the add-embedding expects beside the six time ids (1280 for
    /// SDXL base); nil without text_time.
    public var pooledTextDim: Int? { textTime.map { $0.projectionInputDim - 6 * $0.timeEmbedDim } }
    /// LCM: a guidance embedding added to the timestep before `time_embedding`.
    public var timeCondProjDim: Int?
    public var sampleSize: Int?

    public var timeEmbedDim: Int { blockOutChannels[0] * 4 }

    /// Reads and checks `config.json`; unsupported values throw, naming the field. `encoderOnly`: a ControlNet's
    /// config, which describes the encoder half alone (no up blocks or out_channels; UNetEncoder): the up-block
    /// fields are then the down blocks' mirror, unused.
    public init(_ config: ConfigFile, encoderOnly: Bool = false) throws {
        func fail(_ key: String, _ reason: String) -> PEAError {
            .invalidConfig(path: config.path, reason: "'\(key)': \(reason)")
        }
        func requireValue(_ key: String, _ allowed: [String?], default defaultValue: String?) throws {
            let value = try config.optionalString(key) ?? defaultValue
            guard allowed.contains(value) else {
                throw fail(key, "\(value.map { "\"\($0)\"" } ?? "null") is not supported (Pea supports \(allowed.map { $0 ?? "null" }.joined(separator: ", ")))")
            }
        }

        inChannels = try config.int("in_channels", default: 4, range: .atLeast(1))
        outChannels = try encoderOnly ? inChannels : config.int("out_channels", default: 4, range: .atLeast(1))
        blockOutChannels = try config.contains("block_out_channels") ? config.intList("block_out_channels", range: .atLeast(1)) : [320, 640, 1280, 1280]
        let blocks = blockOutChannels.count
        guard blocks > 0 else { throw fail("block_out_channels", "is empty") }

        let downTypes = try config.contains("down_block_types") ? config.stringList("down_block_types")
            : ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        let upTypes = try encoderOnly ? downTypes.reversed().map { $0 == "CrossAttnDownBlock2D" ? "CrossAttnUpBlock2D" : "UpBlock2D" }
            : config.contains("up_block_types") ? config.stringList("up_block_types")
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

        layersPerBlock = try config.contains("layers_per_block") ? config.intOrList("layers_per_block", count: blocks, range: .layerCount) : Array(repeating: 2, count: blocks)
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` — the legacy config field
        // `attention_head_dim` has always meant the number of heads when `num_attention_heads` is not given.
        if config.value("num_attention_heads").map({ $0 != .null }) ?? false {
            attentionHeads = try config.intOrList("num_attention_heads", count: blocks, range: .atLeast(1))
        } else {
            attentionHeads = try config.contains("attention_head_dim") && config.value("attention_head_dim") != .null
                ? config.intOrList("attention_head_dim", count: blocks, range: .atLeast(1)) : Array(repeating: 8, count: blocks)
        }
        transformerLayersPerBlock = try config.contains("transformer_layers_per_block")
            ? config.intOrList("transformer_layers_per_block", count: blocks, range: .layerCount) : Array(repeating: 1, count: blocks)
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
                guard let first = counts.first, counts.allSatisfy({ $0 == first }), let n = Int(exactly: first),
                      ConfigRange<Int>.layerCount.contains(n) else {
                    throw fail("reverse_transformer_layers_per_block", "each entry must be a whole number \(ConfigRange<Int>.layerCount.description), the same for every layer of a block (different transformer depths within one block are not supported)")
                }
                return n
            }
        } else {
            upTransformerLayersPerBlock = transformerLayersPerBlock.reversed()
        }
        crossAttentionDim = try config.contains("cross_attention_dim") ? config.intOrList("cross_attention_dim", count: blocks, range: .atLeast(1)) : Array(repeating: 1280, count: blocks)
        useLinearProjection = try config.bool("use_linear_projection", default: false)
        upcastAttention = try config.bool("upcast_attention", default: false)
        normNumGroups = try config.int("norm_num_groups", default: 32, range: .atLeast(1))
        normEps = try config.float("norm_eps", default: 1e-5, range: .positive)
        flipSinToCos = try config.bool("flip_sin_to_cos", default: true)
        freqShift = try config.float("freq_shift", default: 0)
        midBlockScaleFactor = try config.float("mid_block_scale_factor", default: 1)
        sampleSize = try config.optionalInt("sample_size", range: .atLeast(1))
        timeCondProjDim = try config.optionalInt("time_cond_proj_dim", range: .atLeast(1))

        switch try config.optionalString("addition_embed_type") {
        case nil: textTime = nil
        case "text_time":
            textTime = (try config.int("addition_time_embed_dim", range: .atLeast(1)), try config.int("projection_class_embeddings_input_dim", range: .atLeast(1)))
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
