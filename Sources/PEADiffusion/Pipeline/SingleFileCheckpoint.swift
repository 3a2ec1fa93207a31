// Single-file checkpoints in the original LDM / A1111 layout (`model.diffusion_model.*`, `first_stage_model.*`,
// `cond_stage_model.*`), loaded as diffusers' `StableDiffusionPipeline.from_single_file` loads them: the family
// read from the tensors (its single_file_utils' `infer_diffusers_model_type`), the configs the family's
// defaults or a diffusers folder's (`config=`), and the names mapped onto diffusers' by the tables below. The
// tables are data: fixed prefix pairs, the per-block pairs their config implies, and the inner renames of a
// block; nothing else in the loader knows a name.
//
// SD1.x (CLIP under `cond_stage_model.transformer.*`), SD2.x (open_clip under `cond_stage_model.model.*`) and SDXL
// base (CLIP and open_clip under `conditioner.embedders.{0,1}.*`) are supported; SDXL refiners and inpainting
// checkpoints are recognised and refused.

/// A `.safetensors` or `.ckpt` (torch.save) file's tensors, opened by its contents (a zip archive is a torch.save
/// file, anything else safetensors), for loaders that map its names: single-file checkpoints, `--vae FILE`.
final class NamedTensorFile {
    let path: String
    let names: [String]
    private let backing: Backing
    private enum Backing {
        case safetensors(SafeTensorsCollection)
        case torch(TorchCheckpointFile)
    }

    init(path: String) throws {
        self.path = path
        guard isRegularFile(path) else { throw PEAError.invalidFile(path: path, reason: "no such file") }
        if TorchCheckpoint.looksLikeTorchSave(path: path) {
            let file = try TorchCheckpointFile(path: path)
            (backing, names) = (.torch(file), file.names)
        } else {
            let file = try SafeTensorsCollection(path: path)
            (backing, names) = (.safetensors(file), file.names)
        }
    }

    func shape(_ name: String) -> [Int]? {
        switch backing {
        case .safetensors(let file): return try? file.info(name).shape
        case .torch(let file): return try? file.info(name).shape
        }
    }

    func dtype(_ name: String) -> DType? {
        switch backing {
        case .safetensors(let file): return try? file.info(name).dtype
        case .torch(let file): return try? file.info(name).dtype
        }
    }

    var isTorch: Bool {
        if case .torch = backing { return true }
        return false
    }

    /// A safetensors file's `__metadata__` (a torch.save file has none).
    var metadata: [String: String] {
        switch backing {
        case .safetensors(let file): return file.metadata
        case .torch: return [:]
        }
    }

    /// The weights of one component: the file's tensors under `prefix`, named as diffusers names them by `rename`
    /// (given the name without the prefix); the file's other tensors are not this component's. Safetensors stay
    /// memory-mapped (`SafeTensorsWeights`).
    func weights(prefix: String, backend: any ComputeBackend, dtype: DType,
                 rename: @escaping (String) -> String?) throws -> (source: any WeightSource, unused: () -> [String]) {
        func mapped(_ name: String) -> String? { name.hasPrefix(prefix) ? rename(String(name.dropFirst(prefix.count))) : nil }
        switch backing {
        case .safetensors(let file):
            let source = SafeTensorsWeights(file, backend: backend, dtype: dtype, rename: mapped)
            return (source, { source.unusedNames })
        case .torch(let file):
            let source = try CheckpointWeights(torch: file, backend: backend, dtype: dtype, rename: mapped)
            return (source, { source.unusedNames })
        }
    }
}

/// A `.safetensors` or `.ckpt` (torch.save) file holding a whole pipeline in the LDM layout.
public final class SingleFileCheckpoint {
    public let path: String
    public let family: ModelFamily
    let file: NamedTensorFile

    /// The LDM prefix of each component.
    static let unetPrefix = "model.diffusion_model."
    static let vaePrefix = "first_stage_model."
    /// SD1's text encoder: transformers' CLIPTextModel as it is.
    static let clipPrefix = "cond_stage_model.transformer."
    /// SD2's text encoder: open_clip's text tower.
    static let openCLIPPrefix = "cond_stage_model.model."

    /// How a text encoder is stored: transformers' CLIP as it is, or open_clip's tower (with its projection, which
    /// SDXL's second encoder uses).
    enum TextLayout {
        case clip(prefix: String)
        case openCLIP(prefix: String, projection: Bool)
    }

    /// The family's text encoders in the file, in `ModelFamily.textComponents` order.
    static func textLayouts(_ family: ModelFamily) -> [TextLayout] {
        switch family {
        case .sd1: return [.clip(prefix: clipPrefix)]
        case .sd2: return [.openCLIP(prefix: openCLIPPrefix, projection: false)]
        case .sdxl: return [.clip(prefix: "conditioner.embedders.0.transformer."),
                            .openCLIP(prefix: "conditioner.embedders.1.model.", projection: true)]
        }
    }

    /// Opens `path` (`NamedTensorFile`) and infers the family from its tensors.
    public init(path: String) throws {
        self.path = path
        file = try NamedTensorFile(path: path)
        family = try Self.inferFamily(path: path, names: Set(file.names), shape: file.shape)
    }

    /// What a file's tensors say it is, before the loader decides whether it runs it (`pea inspect` reports all
    /// of it): nil without `model.diffusion_model.*` tensors.
    struct Layout: Equatable {
        let family: ModelFamily
        /// An SDXL refiner (open_clip as `conditioner.embedders.0`).
        let refiner: Bool
        /// A 9-channel conv_in (latents, mask, masked-image latents).
        let inpainting: Bool
    }

    /// As diffusers' `infer_diffusers_model_type` (and, for the text encoder, its `is_open_clip_model`) for the
    /// families Pea runs: SDXL by its second text encoder (or a refiner's one), SD2 by a 1024-wide cross-attention
    /// context or OpenCLIP's tower, SD1 otherwise. Whether a model predicts v cannot be told from the tensors
    /// (`--prediction-type`).
    static func layout(names: Set<String>, shape: (String) -> [Int]?) -> Layout? {
        guard names.contains(where: { $0.hasPrefix(unetPrefix) }) else { return nil }
        let refiner = names.contains(where: { $0.hasPrefix("conditioner.embedders.0.model.") })
        let inpainting = shape(unetPrefix + "input_blocks.0.0.weight").map({ $0.count == 4 && $0[1] == 9 }) == true
        let family: ModelFamily
        if names.contains(where: { $0.hasPrefix("conditioner.embedders.") }) {
            family = .sdxl
        } else {
            let context = shape(unetPrefix + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight")?.last
            family = context == 1024 || names.contains(where: { $0.hasPrefix(openCLIPPrefix) }) ? .sd2 : .sd1
        }
        return Layout(family: family, refiner: refiner, inpainting: inpainting)
    }

    /// `layout`'s family, refusing what Pea does not run: files without a UNet, SDXL refiners, inpainting.
    static func inferFamily(path: String, names: Set<String>, shape: (String) -> [Int]?) throws -> ModelFamily {
        guard let layout = layout(names: names, shape: shape) else {
            throw PEAError.invalidFile(path: path, reason: "cannot tell the model family: no \(unetPrefix)* tensors "
                                       + "(not a single-file Stable Diffusion checkpoint in the LDM / A1111 layout)")
        }
        if layout.refiner {
            throw PEAError.unsupported("\(path): an SDXL refiner (open_clip as conditioner.embedders.0): Pea runs base models")
        }
        if layout.inpainting {
            throw PEAError.unsupported("\(path): an inpainting checkpoint (a 9-channel conv_in): Pea runs text-to-image and "
                                       + "image-to-image models")
        }
        return layout.family
    }

    func weights(prefix: String, backend: any ComputeBackend, dtype: DType,
                 rename: @escaping (String) -> String?) throws -> (source: any WeightSource, unused: () -> [String]) {
        try file.weights(prefix: prefix, backend: backend, dtype: dtype, rename: rename)
    }
}

// MARK: - Name tables

/// LDM → diffusers names. A table maps LDM prefixes to diffusers prefixes; the longest LDM prefix (at a dot) that
/// a name starts with is replaced, then the block's inner table applies to the rest the same way.
struct LDMNameTable {
    struct Entry {
        /// nil: tensors the diffusers model has no place for, which diffusers' conversion drops too.
        let diffusers: String?
        let inner: [String: String]
    }
    var entries: [String: Entry] = [:]

    mutating func add(_ ldm: String, _ diffusers: String?, inner: [String: String] = [:]) {
        entries[ldm] = Entry(diffusers: diffusers, inner: inner)
    }

    /// `name` under diffusers' names; nil for a tensor the table drops; unchanged when no entry applies (it is
    /// then reported as unused or missing by the weight source, never silently taken).
    func rename(_ name: String) -> String? {
        guard let (ldm, entry) = Self.longestPrefix(of: name, in: entries) else { return name }
        guard let diffusers = entry.diffusers else { return nil }
        var rest = String(name.dropFirst(ldm.count))   // "" or ".…"
        if rest.hasPrefix("."), let (inner, replacement) = Self.longestPrefix(of: String(rest.dropFirst()), in: entry.inner) {
            rest = "." + replacement + rest.dropFirst(1 + inner.count)
        }
        return diffusers + rest
    }

    /// `rename` for a module name written with `_` for every `.` (kohya's LoRA keys in the LDM layout,
    /// `input_blocks_1_1_transformer_blocks_0_attn1_to_q`), answered in the same form; nil when no entry applies.
    /// The table's LDM prefixes are matched in that form, longest first, at an `_` boundary.
    func renameUnderscored(_ name: String) -> String? {
        func flat(_ s: String) -> String { String(s.map { $0 == "." ? "_" : $0 }) }
        func longest<V>(_ table: [String: V], _ name: String) -> (String, V)? {
            table.filter { name == flat($0.key) || name.hasPrefix(flat($0.key) + "_") }
                .max { $0.key.count < $1.key.count }.map { (flat($0.key), $0.value) }
        }
        guard let (ldm, entry) = longest(entries, name), let diffusers = entry.diffusers else { return nil }
        var rest = String(name.dropFirst(ldm.count))   // "" or "_…"
        if rest.hasPrefix("_"), let (inner, replacement) = longest(entry.inner, String(rest.dropFirst())) {
            rest = "_" + flat(replacement) + rest.dropFirst(1 + inner.count)
        }
        return flat(diffusers) + rest
    }

    private static func longestPrefix<V>(of name: String, in table: [String: V]) -> (String, V)? {
        var candidate = Substring(name)
        while true {
            if let value = table[String(candidate)] { return (String(candidate), value) }
            guard let dot = candidate.lastIndex(of: ".") else { return nil }
            candidate = candidate[..<dot]
        }
    }

    // The LDM ResBlock's layers (Sequential indices) under diffusers' ResnetBlock2D names.
    static let unetResnet = ["in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"]
    static let vaeResnet = ["nin_shortcut": "conv_shortcut"]
    static let vaeAttention = ["norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"]

    /// The LDM UNet (`openaimodel.UNetModel`): `input_blocks` numbers every down resnet (with its attention) and
    /// downsampler in one list after `conv_in`; `output_blocks` numbers the up blocks' layers, the upsampler
    /// riding in the last layer of its block after the attention when there is one.
    static func unet(_ c: UNetConfig) -> LDMNameTable {
        var t = LDMNameTable()
        t.add("input_blocks.0.0", "conv_in")
        t.add("time_embed.0", "time_embedding.linear_1")
        t.add("time_embed.2", "time_embedding.linear_2")
        t.add("middle_block.0", "mid_block.resnets.0", inner: unetResnet)
        t.add("middle_block.1", "mid_block.attentions.0")
        t.add("middle_block.2", "mid_block.resnets.1", inner: unetResnet)
        t.add("out.0", "conv_norm_out")
        t.add("out.2", "conv_out")
        t.add("label_emb.0.0", "add_embedding.linear_1")   // SDXL's text-time embedding
        t.add("label_emb.0.2", "add_embedding.linear_2")
        let blocks = c.blockOutChannels.count
        var index = 1
        for b in 0..<blocks {
            for j in 0..<c.layersPerBlock[b] {
                t.add("input_blocks.\(index).0", "down_blocks.\(b).resnets.\(j)", inner: unetResnet)
                t.add("input_blocks.\(index).1", "down_blocks.\(b).attentions.\(j)")
                index += 1
            }
            if b < blocks - 1 {
                t.add("input_blocks.\(index).0.op", "down_blocks.\(b).downsamplers.0.conv")
                index += 1
            }
        }
        index = 0
        let upLayers = c.layersPerBlock.reversed().map { $0 + 1 }
        for b in 0..<blocks {
            for j in 0..<upLayers[b] {
                t.add("output_blocks.\(index).0", "up_blocks.\(b).resnets.\(j)", inner: unetResnet)
                t.add("output_blocks.\(index).1", "up_blocks.\(b).attentions.\(j)")
                index += 1
            }
            if b < blocks - 1 {
                let slot = c.upBlockHasAttention[b] ? 2 : 1
                t.add("output_blocks.\(index - 1).\(slot).conv", "up_blocks.\(b).upsamplers.0.conv")
            }
        }
        return t
    }

    /// The LDM autoencoder (`ldm.modules.diffusionmodules.model`): `down.{i}.block.{j}` / `up.{i}.block.{j}`
    /// resnets, `mid.block_{1,2}` and `mid.attn_1`; its `up` list is numbered from the lowest resolution's end.
    static func vae(_ c: AutoencoderKLConfig) -> LDMNameTable {
        var t = LDMNameTable()
        let blocks = c.blockOutChannels.count
        for side in ["encoder", "decoder"] {
            t.add("\(side).mid.block_1", "\(side).mid_block.resnets.0", inner: vaeResnet)
            t.add("\(side).mid.block_2", "\(side).mid_block.resnets.1", inner: vaeResnet)
            t.add("\(side).mid.attn_1", "\(side).mid_block.attentions.0", inner: vaeAttention)
            t.add("\(side).norm_out", "\(side).conv_norm_out")
        }
        for b in 0..<blocks {
            for j in 0..<c.layersPerBlock {
                t.add("encoder.down.\(b).block.\(j)", "encoder.down_blocks.\(b).resnets.\(j)", inner: vaeResnet)
            }
            t.add("encoder.down.\(b).downsample.conv", "encoder.down_blocks.\(b).downsamplers.0.conv")
            let ldm = blocks - 1 - b
            for j in 0...c.layersPerBlock {
                t.add("decoder.up.\(ldm).block.\(j)", "decoder.up_blocks.\(b).resnets.\(j)", inner: vaeResnet)
            }
            t.add("decoder.up.\(ldm).upsample.conv", "decoder.up_blocks.\(b).upsamplers.0.conv")
        }
        return t
    }

    /// SD1's text encoder is transformers' CLIPTextModel saved under `cond_stage_model.transformer.`, with or
    /// without its `text_model.` level.
    static func clipText(_ name: String) -> String? { name.hasPrefix("text_model.") ? name : "text_model." + name }

    static let openCLIPLayer = ["ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                                "attn.out_proj": "self_attn.out_proj", "attn.in_proj_weight": "self_attn.in_proj.weight",
                                "attn.in_proj_bias": "self_attn.in_proj.bias"]
    /// The diffusers name of open_clip's text projection, which is stored transposed.
    static let openCLIPProjection = "text_projection.weight"
    /// open_clip's fused attention input projection and the rows it holds, in order (`RowSplitWeights`).
    static let openCLIPFused = (name: "in_proj", parts: ["q_proj", "k_proj", "v_proj"])

    /// open_clip's text tower onto transformers' CLIPTextModel(WithProjection): the layers the config has (SD2
    /// drops the last of open_clip's 24, as diffusers' SD2 text encoder has 23); the projection only with
    /// `projection` (SDXL's second encoder; SD2 conditions on the hidden states), stored transposed
    /// (`TransposedWeights`: open_clip computes x @ text_projection).
    static func openCLIPText(_ c: CLIPTextConfig, projection: Bool) -> LDMNameTable {
        var t = LDMNameTable()
        t.add("token_embedding", "text_model.embeddings.token_embedding")
        t.add("positional_embedding", "text_model.embeddings.position_embedding.weight")
        t.add("ln_final", "text_model.final_layer_norm")
        t.add("text_projection", projection ? openCLIPProjection : nil)
        t.add("logit_scale", nil)
        t.add("transformer.resblocks", nil)   // beyond the config's layers
        for i in 0..<c.layers {
            t.add("transformer.resblocks.\(i)", "text_model.encoder.layers.\(i)", inner: openCLIPLayer)
        }
        return t
    }
}

/// Weights some of which are stored transposed (2-D): asked for one of `names` of shape [a, b], it reads [b, a] and
/// transposes it on the backend.
final class TransposedWeights: WeightSource {
    let base: any WeightSource
    let names: Set<String>

    init(_ base: any WeightSource, names: Set<String>) {
        self.base = base
        self.names = names
    }

    var backend: any ComputeBackend { base.backend }
    func contains(_ name: String) -> Bool { base.contains(name) }

    func tensor(_ name: String, shape: [Int]) throws -> Tensor {
        guard names.contains(name), shape.count == 2 else { return try base.tensor(name, shape: shape) }
        return try backend.permute(base.tensor(name, shape: shape.reversed()), [1, 0])
    }

    func matrix(_ name: String, shape: [Int]) throws -> Tensor {
        guard names.contains(name), shape.count == 2 else { return try base.matrix(name, shape: shape) }
        return try backend.permute(base.matrix(name, shape: shape.reversed()), [1, 0])
    }
}

/// Weights whose file fuses several parameters into one tensor, row blocks in order (open_clip's attention
/// `in_proj` holds q, k and v): asked for a part, it loads the fused tensor once and splits it on the backend.
final class RowSplitWeights: WeightSource {
    let base: any WeightSource
    let fused: String
    let parts: [String]
    private var pending: [String: Tensor] = [:]   // split parts not asked for yet

    init(_ base: any WeightSource, fused: String, parts: [String]) {
        self.base = base
        self.fused = fused
        self.parts = parts
    }

    var backend: any ComputeBackend { base.backend }

    /// `a.b.q_proj.weight` → (`a.b.in_proj.weight`, the names of every part), when the name is a part's.
    private func fusedName(_ name: String) -> (fused: String, parts: [String])? {
        var components = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard components.count >= 2, parts.contains(components[components.count - 2]) else { return nil }
        let names = parts.map { part -> String in
            components[components.count - 2] = part
            return components.joined(separator: ".")
        }
        components[components.count - 2] = fused
        return (components.joined(separator: "."), names)
    }

    func contains(_ name: String) -> Bool {
        base.contains(name) || fusedName(name).map { base.contains($0.fused) } == true
    }

    func tensor(_ name: String, shape: [Int]) throws -> Tensor {
        try load(name, shape: shape) { try base.tensor($0, shape: $1) }
    }

    func matrix(_ name: String, shape: [Int]) throws -> Tensor {
        try load(name, shape: shape) { try base.matrix($0, shape: $1) }
    }

    private func load(_ name: String, shape: [Int], _ read: (String, [Int]) throws -> Tensor) throws -> Tensor {
        if let part = pending.removeValue(forKey: name) { return part }
        guard !base.contains(name), let (fusedName, names) = fusedName(name), !shape.isEmpty else { return try read(name, shape) }
        let whole = try read(fusedName, [shape[0] * names.count] + shape.dropFirst())
        let split = try backend.split(whole, sizes: Array(repeating: shape[0], count: names.count), dim: 0)
        for (partName, part) in zip(names, split) where partName != name { pending[partName] = part }
        return split[names.firstIndex(of: name)!]
    }
}

// MARK: - Built-in configs

extension SingleFileCheckpoint {
    /// The configs from_single_file takes when no `config=` is given: the family's reference diffusers pipeline
    /// (SD1: stable-diffusion-v1-5/stable-diffusion-v1-5; SD2: stabilityai/stable-diffusion-2-1, a v-prediction
    /// model: SD2 base 512 models need `--prediction-type epsilon`; SDXL: stabilityai/stable-diffusion-xl-base-1.0).
    static func defaultConfig(_ family: ModelFamily, _ component: String) throws -> ConfigFile {
        let text: String
        switch (family, component) {
        case (.sd1, "unet"):
            text = """
                {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
                 "center_input_sample": false, "cross_attention_dim": 768,
                 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
                """
        case (.sd2, "unet"):
            text = """
                {"act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
                 "center_input_sample": false, "cross_attention_dim": 1024,
                 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 96,
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 "upcast_attention": true, "use_linear_projection": true}
                """
        case (.sdxl, "unet"):
            text = """
                {"act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
                 "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                 "center_input_sample": false, "cross_attention_dim": 2048,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                 "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
                 "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": true}
                """
        case (.sdxl, "vae"):
            text = """
                {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                 "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                 "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
                 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}
                """
        case (.sdxl, "text_encoder_2"):
            text = """
                {"architectures": ["CLIPTextModelWithProjection"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
                 "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
                 "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280,
                 "vocab_size": 49408}
                """
        case (.sdxl, "scheduler"):
            text = """
                {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
                 "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true,
                 "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false}
                """
        case (.sd1, "vae"), (.sd2, "vae"):
            text = """
                {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                 "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
                 "sample_size": 512, "scaling_factor": 0.18215,
                 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}
                """
        case (.sd1, "text_encoder"), (.sdxl, "text_encoder"):
            text = """
                {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
                 "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
                 "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
                 "vocab_size": 49408}
                """
        case (.sd2, "text_encoder"):
            text = """
                {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu",
                 "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
                 "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512,
                 "vocab_size": 49408}
                """
        case (.sd2, "scheduler"):
            text = """
                {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                 "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading",
                 "trained_betas": null}
                """
        case (.sd1, "scheduler"):
            text = """
                {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": false,
                 "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null}
                """
        default:
            throw PEAError.unsupported("no built-in \(component) config for \(family.rawValue) single files")
        }
        guard case .object(let values) = try JSONValue.parse(text) else { preconditionFailure("built-in config is an object") }
        return ConfigFile(path: "<built-in \(family.rawValue) \(component) config>", values: values)
    }
}

// MARK: - Loading

/// Where a single file's configs and tokenizer come from, as from_single_file's `config=` and its defaults.
public struct SingleFileOptions {
    /// A diffusers pipeline folder whose configs (and tokenizer) replace the family's defaults.
    public var configFolder: String?
    /// A CLIP tokenizer folder (vocab.json + merges.txt); needed without `configFolder`, since no CLIP vocabulary
    /// ships with Pea.
    public var tokenizerFolder: String?
    /// "epsilon" or "v_prediction": overrides the scheduler config's (the tensors cannot tell).
    public var predictionType: String?

    public init(configFolder: String? = nil, tokenizerFolder: String? = nil, predictionType: String? = nil) {
        self.configFolder = configFolder
        self.tokenizerFolder = tokenizerFolder
        self.predictionType = predictionType
    }
}

extension StableDiffusionPipeline {
    /// Loads a single-file checkpoint (`SingleFileCheckpoint`) as diffusers' `from_single_file(path, config=…)`
    /// does. Also returns the file's tensors under a component's prefix that no layer read (empty for a file in
    /// the layout; tensors outside the three components — EMA copies, schedules — are not looked at).
    public static func load(checkpoint path: String, options: SingleFileOptions = SingleFileOptions(),
                            backend: any ComputeBackend, scheduler: String? = nil, clipSkip: Int = 0,
                            conditioner: (any TextConditioner)? = nil, dtype: DType = .f32,
                            lora: LoRASet? = nil) throws -> (pipeline: StableDiffusionPipeline, unusedWeights: [String]) {
        if let predictionType = options.predictionType, !["epsilon", "v_prediction"].contains(predictionType) {
            throw PEAError.usage("prediction type must be epsilon or v_prediction, got '\(predictionType)'")
        }
        if let folder = options.configFolder { try requirePipelineFolder(folder) }
        let file = try SingleFileCheckpoint(path: path)
        let family = file.family
        func config(_ component: String, _ name: String) throws -> ConfigFile {
            guard let folder = options.configFolder else { return try SingleFileCheckpoint.defaultConfig(family, component) }
            return try ConfigFile(path: joinPath(joinPath(folder, component), name))
        }
        // The tokenizers are read first: without them nothing else is worth loading. --tokenizer DIR is the
        // tokenizer folder itself, or (SDXL: two tokenizers) a folder holding tokenizer/ and tokenizer_2/.
        let components = family.textComponents
        func tokenizerFolder(_ name: String) -> String? {
            if let folder = options.tokenizerFolder {
                return components.count == 1 && !isDirectory(joinPath(folder, name)) ? folder : joinPath(folder, name)
            }
            return options.configFolder.map { joinPath($0, name) }
        }
        guard conditioner != nil || options.tokenizerFolder != nil || options.configFolder != nil else {
            let what = components.count == 1 ? "a folder with vocab.json + merges.txt, e.g. a diffusers pipeline's tokenizer/"
                : "a diffusers pipeline folder with " + components.map { $0.tokenizer + "/" }.joined(separator: " and ")
            throw PEAError.usage("\(path): a single-file checkpoint holds no tokenizer and Pea ships no CLIP vocabulary: give "
                                 + "--tokenizer DIR (\(what)) or --config DIR")
        }
        let tokenizers = try conditioner == nil ? components.map { try CLIPTokenizer(folder: tokenizerFolder($0.tokenizer)!) } : []

        let unetConfig = try UNetConfig(config("unet", "config.json"))
        let vaeConfig = try AutoencoderKLConfig(config("vae", "config.json"))
        var schedulerValues = try config("scheduler", "scheduler_config.json")
        if let predictionType = options.predictionType {
            schedulerValues = ConfigFile(path: schedulerValues.path,
                                         values: schedulerValues.values.merging(["prediction_type": .string(predictionType)]) { $1 })
        }

        var unused: [() -> [String]] = []
        let unetTable = LDMNameTable.unet(unetConfig)
        let unetWeights = try file.weights(prefix: SingleFileCheckpoint.unetPrefix, backend: backend, dtype: dtype, rename: unetTable.rename)
        let unet = try UNet2DConditionModel(config: unetConfig, weights: Weights(lora?.weights(unetWeights.source, component: "unet", unet: unetConfig)
                                                                                 ?? unetWeights.source))
        unused.append(unetWeights.unused)

        let vaeTable = LDMNameTable.vae(vaeConfig)
        let vaeWeights = try file.weights(prefix: SingleFileCheckpoint.vaePrefix, backend: backend,
                                          dtype: family.vaeDType(dtype, config: vaeConfig), rename: vaeTable.rename)
        let vae = try AutoencoderKL(config: vaeConfig, weights: Weights(vaeWeights.source))
        unused.append(vaeWeights.unused)

        let text: any TextConditioner
        if let conditioner {
            text = conditioner
        } else {
            var stacks: [CLIPTextStack] = []
            for (component, layout) in zip(components, SingleFileCheckpoint.textLayouts(family)) {
                let encoderConfig = try CLIPTextConfig(config(component.encoder, "config.json"))
                let encoderWeights: (source: any WeightSource, unused: () -> [String])
                switch layout {
                case .clip(let prefix):
                    encoderWeights = try file.weights(prefix: prefix, backend: backend, dtype: dtype, rename: LDMNameTable.clipText)
                case .openCLIP(let prefix, let projection):
                    let table = LDMNameTable.openCLIPText(encoderConfig, projection: projection), fused = LDMNameTable.openCLIPFused
                    let tower = try file.weights(prefix: prefix, backend: backend, dtype: dtype, rename: table.rename)
                    let split = RowSplitWeights(tower.source, fused: fused.name, parts: fused.parts)
                    encoderWeights = (TransposedWeights(split, names: [LDMNameTable.openCLIPProjection]), tower.unused)
                }
                let source = lora?.weights(encoderWeights.source, component: component.encoder) ?? encoderWeights.source
                let encoder = try CLIPTextModel(config: encoderConfig, weights: Weights(source))
                // Position ids are a buffer (arange), not a parameter.
                unused.append { encoderWeights.unused().filter { !$0.hasSuffix("position_ids") } }
                stacks.append(CLIPTextStack(tokenizer: tokenizers[stacks.count], encoder: encoder))
            }
            let forceZeros = try options.configFolder.map(ModelFamily.forceZerosForEmptyPrompt(folder:)) ?? true
            text = try family.conditioner(stacks, clipSkip: clipSkip, forceZerosForEmptyPrompt: forceZeros)
        }

        try lora?.requireAllUsed(components: ["unet"] + (conditioner == nil ? components.map(\.encoder) : []))

        let schedulerConfig = family.schedulerConfig(schedulerValues)
        let pipeline = StableDiffusionPipeline(family: family, denoiser: unet, vae: vae, conditioner: text,
                                               scheduler: try makeScheduler(name: scheduler, config: schedulerConfig),
                                               schedulerConfig: schedulerConfig, backend: backend)
        return (pipeline, unused.flatMap { $0() })
    }
}

extension AutoencoderKL {
    /// A VAE from one file (`--vae FILE`), as diffusers' `AutoencoderKL.from_single_file(path, config=…)`: its
    /// tensors in the LDM names (as VAEs are released, or under `first_stage_model.` as in a whole checkpoint) or in
    /// diffusers' names; `config` is the architecture (the pipeline's VAE config, whose scaling factor applies).
    public static func load(file path: String, config: AutoencoderKLConfig, backend: any ComputeBackend,
                            dtype: DType = .f32) throws -> (model: AutoencoderKL, unusedWeights: [String]) {
        let file = try NamedTensorFile(path: path)
        let prefix = file.names.contains { $0.hasPrefix(SingleFileCheckpoint.vaePrefix) } ? SingleFileCheckpoint.vaePrefix : ""
        let diffusersNames = file.names.contains { $0.hasPrefix(prefix + "decoder.up_blocks.") }
        guard diffusersNames || file.names.contains(where: { $0.hasPrefix(prefix + "decoder.up.") }) else {
            throw PEAError.invalidFile(path: path, reason: "not a VAE: no decoder.up.* (LDM) or decoder.up_blocks.* (diffusers) tensors")
        }
        let table = LDMNameTable.vae(config)
        let weights = try file.weights(prefix: prefix, backend: backend, dtype: dtype,
                                       rename: diffusersNames ? { renameLegacyAttention($0) } : table.rename)
        let model = try AutoencoderKL(config: config, weights: Weights(weights.source))
        return (model, weights.unused())
    }
}
