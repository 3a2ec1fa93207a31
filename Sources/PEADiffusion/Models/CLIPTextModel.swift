// transformers' CLIPTextModel and CLIPTextModelWithProjection (models/clip/modeling_clip.py): the English
// text encoders of SD1.x (OpenAI CLIP ViT-L/14), SD2.x (OpenCLIP ViT-H/14) and SDXL (both, the second with a
// projection). Pre-LN transformer layers with a causal mask, then a final layer norm; the pooled output is
// the final state at the end-of-text token.

public struct CLIPTextConfig {
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layers: Int
    public var heads: Int
    public var maxPositions: Int
    public var activation: Activation
    public var layerNormEps: Float
    public var projectionDim: Int?
    public var eosTokenId: Int

    /// Reads a transformers `config.json` (a text tower's own config, or the `text_config` of a full CLIP).
    /// `withProjection` comes from `architectures` (CLIPTextModelWithProjection).
    public init(_ config: ConfigFile) throws {
        vocabSize = try config.int("vocab_size", range: .atLeast(1))
        hiddenSize = try config.int("hidden_size", range: .atLeast(1))
        intermediateSize = try config.int("intermediate_size", range: .atLeast(1))
        layers = try config.int("num_hidden_layers", range: .layerCount)
        heads = try config.int("num_attention_heads", range: .atLeast(1))
        maxPositions = try config.int("max_position_embeddings", default: 77, range: .atLeast(2))   // start and end tokens
        layerNormEps = try config.float("layer_norm_eps", default: 1e-5, range: .positive)
        eosTokenId = try config.int("eos_token_id", default: 2, range: .atLeast(0))
        switch try config.string("hidden_act", default: "quick_gelu") {
        case "quick_gelu": activation = .quickGELU
        case "gelu": activation = .gelu
        case "gelu_new", "gelu_pytorch_tanh": activation = .geluTanh
        case let other: throw PEAError.invalidConfig(path: config.path, reason: "'hidden_act': \"\(other)\" is not supported (quick_gelu, gelu)")
        }
        let architectures = try config.contains("architectures") ? config.stringList("architectures") : []
        projectionDim = architectures.contains("CLIPTextModelWithProjection") ? try config.int("projection_dim", range: .atLeast(1)) : nil
        guard hiddenSize % heads == 0 else {
            throw PEAError.invalidConfig(path: config.path, reason: "'hidden_size' \(hiddenSize) does not split into \(heads) heads")
        }
    }
}

/// What the encoder gives for a batch of token ids.
public struct CLIPTextOutput {
    /// After the final layer norm, [B, L, D].
    public var lastHiddenState: Tensor
    /// The final state at each sequence's end-of-text token, [B, D].
    public var pooled: Tensor
    /// With a projection (SDXL's second encoder): pooled · text_projectionᵀ, [B, P].
    public var textEmbeds: Tensor?
    /// The input of every layer and the last layer's output (before the final norm): L + 1 tensors, as
    /// transformers' `hidden_states`. Empty unless asked for.
    public var hiddenStates: [Tensor]
}

/// One pre-LN encoder layer: x += attn(ln1(x)) (causal); x += fc2(act(fc1(ln2(x)))).
struct CLIPEncoderLayer {
    let norm1, norm2: LayerNorm
    let q, k, v, out, fc1, fc2: Linear
    let heads: Int
    let activation: Activation

    init(_ w: Weights, config c: CLIPTextConfig) throws {
        let d = c.hiddenSize
        norm1 = try LayerNorm(w["layer_norm1"], dim: d, eps: c.layerNormEps)
        q = try Linear(w["self_attn.q_proj"], in: d, out: d)
        k = try Linear(w["self_attn.k_proj"], in: d, out: d)
        v = try Linear(w["self_attn.v_proj"], in: d, out: d)
        out = try Linear(w["self_attn.out_proj"], in: d, out: d)
        norm2 = try LayerNorm(w["layer_norm2"], dim: d, eps: c.layerNormEps)
        fc1 = try Linear(w["mlp.fc1"], in: d, out: c.intermediateSize)
        fc2 = try Linear(w["mlp.fc2"], in: c.intermediateSize, out: d)
        heads = c.heads
        activation = c.activation
    }

    func callAsFunction(_ x: Tensor, paddingMask: Tensor?) throws -> Tensor {
        let b = x.backend
        let h = try norm1(x)
        let attended = try b.attention(q: q(h), k: k(h), v: v(h), heads: heads, mask: paddingMask, causal: true, scale: nil)
        let mid = try b.add(x, out(attended))
        return try b.add(mid, fc2(b.activation(fc1(norm2(mid)), activation)))
    }
}

public struct CLIPTextModel {
    public let config: CLIPTextConfig
    let tokenEmbedding: Tensor
    let positionEmbedding: Tensor
    let layers: [CLIPEncoderLayer]
    let finalNorm: LayerNorm
    let projection: Linear?

    public init(config c: CLIPTextConfig, weights w: Weights) throws {
        config = c
        let t = w["text_model"]
        tokenEmbedding = try t.tensor("embeddings.token_embedding.weight", [c.vocabSize, c.hiddenSize])
        positionEmbedding = try t.tensor("embeddings.position_embedding.weight", [c.maxPositions, c.hiddenSize])
        layers = try (0..<c.layers).map { try CLIPEncoderLayer(t["encoder.layers.\($0)"], config: c) }
        finalNorm = try LayerNorm(t["final_layer_norm"], dim: c.hiddenSize, eps: c.layerNormEps)
        projection = try c.projectionDim.map { try Linear(w["text_projection"], in: c.hiddenSize, out: $0, bias: false) }
    }

    /// Loads a transformers text-encoder folder (`config.json` + `model.safetensors`, sharded or an `.fp16`
    /// variant), or the `component` subfolder of a diffusers pipeline root.
    /// `dtype` is the precision the parameters are stored and computed in; the outputs are in it too. `wrap` may put
    /// a source in front of the file's (LoRA merging).
    public static func load(folder: String, component: String = "text_encoder", backend: any ComputeBackend,
                            variant: String? = nil, dtype: DType = .f32,
                            wrap: (any WeightSource) -> any WeightSource = { $0 }) throws -> (model: CLIPTextModel, unusedWeights: [String]) {
        let directory = try ModelFolder.component(folder, component)
        let config = try CLIPTextConfig(ConfigFile(path: joinPath(directory, "config.json")))
        let file = try SafeTensorsCollection.open(folder: directory, baseName: "model", variant: variant)
        // transformers ≤ 4 saves the tower under `text_model.`; transformers 5 saves CLIPTextModel without it.
        let source = SafeTensorsWeights(file, backend: backend, dtype: dtype) { name in
            name.hasPrefix("text_model.") || name.hasPrefix("text_projection.") ? name : "text_model." + name
        }
        let model = try CLIPTextModel(config: config, weights: Weights(wrap(source)))
        // Position ids are a buffer transformers sometimes saves; it is arange(maxPositions), nothing to load.
        return (model, source.unusedNames.filter { !$0.hasSuffix("position_ids") })
    }

    /// The dtype the parameters were loaded in, which the outputs are in.
    public var dtype: DType { tokenEmbedding.dtype }

    /// Encodes token ids [B, L] (i32 or i64, L ≤ max_position_embeddings). `attentionMask` [B, L] (1 keep,
    /// 0 padding), when given, hides padding keys as transformers does with `attention_mask`; SD pipelines pass
    /// none. `keepHiddenStates` fills `hiddenStates` (SDXL and --clip-skip use the penultimate one).
    public func callAsFunction(ids: HostTensor, attentionMask: [[Int]]? = nil, keepHiddenStates: Bool = false) throws -> CLIPTextOutput {
        let b = tokenEmbedding.backend
        guard ids.shape.count == 2, ids.shape[1] <= config.maxPositions, !ids.dtype.isFloatingPoint else {
            throw PEAError.shapeMismatch("clip text model: ids must be integer [B, L] with L ≤ \(config.maxPositions), got \(ids.dtype) \(ids.shape)")
        }
        let (batch, length) = (ids.shape[0], ids.shape[1])
        guard length > 0 else { throw PEAError.shapeMismatch("clip text model: empty token sequence") }
        let idValues = ids.integers()!
        var x = try b.embedding(b.upload(ids), table: tokenEmbedding)
        let positions = try b.embedding(b.upload(HostTensor(ids: Array(0..<length), shape: [length])), table: positionEmbedding)
        x = try b.add(x, positions)

        var mask: Tensor?
        if let attentionMask {
            guard attentionMask.count == batch, attentionMask.allSatisfy({ $0.count == length }) else {
                throw PEAError.shapeMismatch("clip text model: attention mask must be [\(batch), \(length)]")
            }
            // transformers fills masked scores with the dtype's lowest value; any value that underflows exp() to 0 is the same.
            // The mask is in the model's dtype (one dtype per kernel call), its lowest finite value as torch.finfo's min.
            let lowest = -dtype.greatestFiniteMagnitude
            mask = try b.upload(HostTensor(attentionMask.flatMap { $0.map { $0 == 0 ? lowest : 0 } }, shape: [batch, 1, 1, length], dtype: dtype))
        }

        var hiddenStates: [Tensor] = []
        for layer in layers {
            if keepHiddenStates { hiddenStates.append(x) }
            x = try layer(x, paddingMask: mask)
        }
        if keepHiddenStates { hiddenStates.append(x) }
        let last = try finalNorm(x)

        // The pooled state sits at the end-of-text token: the first position holding eos_token_id, or — for
        // configs from before transformers 4.30 whose eos_token_id is 2 — the position of the largest id
        // (the end-of-text token has the largest id of the CLIP vocabulary).
        let poolIndices: [Int] = (0..<batch).map { row in
            let rowIds = idValues[(row * length)..<((row + 1) * length)]
            if config.eosTokenId == 2 { return rowIds.firstIndex(of: rowIds.max()!)! }
            return rowIds.firstIndex(of: config.eosTokenId) ?? row * length  // argmax of all-false is 0
        }
        let pooled = try b.embedding(b.upload(HostTensor(ids: poolIndices, shape: [batch])), table: last.reshaped([batch * length, config.hiddenSize]))
        return CLIPTextOutput(lastHiddenState: last, pooled: pooled, textEmbeds: try projection?(pooled), hiddenStates: hiddenStates)
    }

    /// diffusers' prompt embeddings with `clip_skip` (SD1/SD2): hidden_states[-(clipSkip + 1)] through the final
    /// layer norm; clipSkip 0 is `last_hidden_state`.
    public func finalNormed(_ hidden: Tensor) throws -> Tensor { try finalNorm(hidden) }
}
