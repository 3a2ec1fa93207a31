// transformers' BertModel and ChineseCLIPTextModel (models/bert/modeling_bert.py,
// models/chinese_clip/modeling_chinese_clip.py): the text tower of Chinese-CLIP (RoBERTa-wwm-ext, a BERT
// architecture), whose last hidden state is what PEA's adapter reads. Word + position + token-type
// embeddings through a layer norm, then post-LN encoder layers (attention → add → LayerNorm, GELU MLP → add →
// LayerNorm), a padding mask from the attention mask. No pooler: PEA uses the whole sequence.
//
// The same encoder with RoBERTa's embeddings is XLMRobertaModel (XLMRobertaTextModel.swift): position ids count
// only non-padding tokens and start after the padding index.

public struct BertTextConfig: Sendable {
    /// How position ids are made from the token ids.
    public enum PositionIDs: Equatable, Sendable {
        /// BERT: 0, 1, …, L − 1 for every sequence.
        case absolute
        /// RoBERTa / XLM-R (fairseq's make_positions): padding tokens get `paddingIndex`, the others
        /// paddingIndex + their 1-based count among the non-padding tokens.
        case paddingAware(paddingIndex: Int)
    }

    public var modelType: String
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layers: Int
    public var heads: Int
    public var maxPositions: Int
    public var typeVocabSize: Int
    public var layerNormEps: Float
    public var activation: Activation
    public var padTokenId: Int
    public var positionIDs: PositionIDs

    /// The model types read: BERT-style ones (absolute positions) and RoBERTa-style ones (padding-aware).
    public static let bertModelTypes: Set<String> = ["bert", "chinese_clip_text_model"]
    public static let robertaModelTypes: Set<String> = ["roberta", "xlm-roberta"]

    /// Reads a transformers `config.json`: a BertModel / ChineseCLIPTextModel / XLMRobertaModel config, or a
    /// full ChineseCLIPModel's (its `text_config`); also cn_clip's own model configs
    /// (`cn_clip/clip/model_configs/RoBERTa-wwm-ext-*.json`: `vocab_size` and `text_*` keys, eps 1e-12 in its
    /// code). Missing optional keys take the transformers defaults of BertConfig (a config without `model_type`
    /// is BERT).
    public init(_ file: ConfigFile) throws {
        var config = file
        if try file.string("model_type", default: "") == "chinese_clip" || file.contains("text_config") {
            config = ConfigFile(path: file.path + " (text_config)", values: try file.object("text_config"))
        }
        // cn_clip names the text tower's keys `text_hidden_size`, … (vocab_size has no prefix).
        let cnClip = !config.contains("hidden_size") && config.contains("text_hidden_size")
        func key(_ name: String) -> String { cnClip ? "text_" + name : name }
        modelType = try config.string("model_type", default: "bert")
        let roberta = BertTextConfig.robertaModelTypes.contains(modelType)
        guard roberta || BertTextConfig.bertModelTypes.contains(modelType) else {
            throw PEAError.invalidConfig(path: config.path, reason: "'model_type': \"\(modelType)\" is not a BERT or XLM-R text encoder (\((BertTextConfig.bertModelTypes.union(BertTextConfig.robertaModelTypes)).sorted().joined(separator: ", ")))")
        }
        vocabSize = try config.int("vocab_size", range: .atLeast(1))
        hiddenSize = try config.int(key("hidden_size"), range: .atLeast(1))
        intermediateSize = try config.int(key("intermediate_size"), range: .atLeast(1))
        layers = try config.int(key("num_hidden_layers"), range: .layerCount)
        heads = try config.int(key("num_attention_heads"), range: .atLeast(1))
        maxPositions = try config.int(key("max_position_embeddings"), default: 512, range: .atLeast(2))
        typeVocabSize = try config.int(key("type_vocab_size"), default: 2, range: .atLeast(1))   // token type 0 is added to every token
        layerNormEps = try config.float(key("layer_norm_eps"), default: 1e-12, range: .positive)
        padTokenId = try config.int("pad_token_id", default: roberta ? 1 : 0, range: .atLeast(0))
        positionIDs = roberta ? .paddingAware(paddingIndex: padTokenId) : .absolute
        switch try config.string(key("hidden_act"), default: "gelu") {
        case "gelu": activation = .gelu
        case "gelu_new", "gelu_pytorch_tanh": activation = .geluTanh
        case let other:
            throw PEAError.invalidConfig(path: config.path, reason: "'hidden_act': \"\(other)\" is not supported (gelu, gelu_new, gelu_pytorch_tanh)")
        }
        let positionType = try config.string("position_embedding_type", default: "absolute")
        guard positionType == "absolute" else {
            throw PEAError.invalidConfig(path: config.path, reason: "'position_embedding_type': \"\(positionType)\" is not supported (absolute)")
        }
        guard maxSequenceLength >= 2 else {
            throw PEAError.invalidConfig(path: config.path, reason: "'\(key("max_position_embeddings"))' \(maxPositions) leaves \(maxSequenceLength) positions after the padding index \(padTokenId); at least 2 are needed (the start and end tokens)")
        }
        guard hiddenSize % heads == 0 else {
            throw PEAError.invalidConfig(path: config.path, reason: "'hidden_size' \(hiddenSize) does not split into \(heads) heads")
        }
    }

    /// The longest sequence the position table allows: max_position_embeddings, less the padding index and
    /// the one after it for padding-aware positions (XLM-R's 514 → 512).
    public var maxSequenceLength: Int {
        switch positionIDs {
        case .absolute: return maxPositions
        case .paddingAware(let paddingIndex): return maxPositions - paddingIndex - 1
        }
    }
}

/// One post-LN encoder layer (BertLayer):
/// h = LayerNorm(x + attention.output.dense(attn(x))); y = LayerNorm(h + output.dense(act(intermediate.dense(h)))).
struct BertEncoderLayer {
    let query, key, value, attentionOutput, intermediate, output: Linear
    let attentionNorm, outputNorm: LayerNorm
    let heads: Int
    let activation: Activation

    init(_ w: Weights, config c: BertTextConfig) throws {
        let d = c.hiddenSize
        query = try Linear(w["attention.self.query"], in: d, out: d)
        key = try Linear(w["attention.self.key"], in: d, out: d)
        value = try Linear(w["attention.self.value"], in: d, out: d)
        attentionOutput = try Linear(w["attention.output.dense"], in: d, out: d)
        attentionNorm = try LayerNorm(w["attention.output.LayerNorm"], dim: d, eps: c.layerNormEps)
        intermediate = try Linear(w["intermediate.dense"], in: d, out: c.intermediateSize)
        output = try Linear(w["output.dense"], in: c.intermediateSize, out: d)
        outputNorm = try LayerNorm(w["output.LayerNorm"], dim: d, eps: c.layerNormEps)
        heads = c.heads
        activation = c.activation
    }

    /// x [B, L, D], paddingMask additive [B, 1, 1, L] or nil → [B, L, D].
    func callAsFunction(_ x: Tensor, paddingMask: Tensor?) throws -> Tensor {
        let b = x.backend
        let attended = try b.attention(q: query(x), k: key(x), v: value(x), heads: heads, mask: paddingMask, causal: false, scale: nil)
        let h = try attentionNorm(b.add(x, attentionOutput(attended)))                         // [B, L, D]
        return try outputNorm(b.add(h, output(b.activation(intermediate(h), activation))))   // [B, L, D]
    }
}

/// The BERT (or, with padding-aware positions, RoBERTa/XLM-R) text encoder; its output is the last hidden state.
public struct BertTextModel {
    public let config: BertTextConfig
    let wordEmbeddings: Tensor        // [V, D]
    let positionEmbeddings: Tensor    // [P, D]
    let tokenTypeEmbeddings: Tensor   // [T, D]
    let embeddingNorm: LayerNorm
    let layers: [BertEncoderLayer]

    /// `w` is the tower itself: it holds `embeddings.*` and `encoder.layer.N.*`.
    public init(config c: BertTextConfig, weights w: Weights) throws {
        config = c
        wordEmbeddings = try w.tensor("embeddings.word_embeddings.weight", [c.vocabSize, c.hiddenSize])
        positionEmbeddings = try w.tensor("embeddings.position_embeddings.weight", [c.maxPositions, c.hiddenSize])
        tokenTypeEmbeddings = try w.tensor("embeddings.token_type_embeddings.weight", [c.typeVocabSize, c.hiddenSize])
        embeddingNorm = try LayerNorm(w["embeddings.LayerNorm"], dim: c.hiddenSize, eps: c.layerNormEps)
        layers = try (0..<c.layers).map { try BertEncoderLayer(w["encoder.layer.\($0)"], config: c) }
    }

    /// Loads a transformers folder (`config.json` + `model.safetensors`, sharded, or a `pytorch_model.bin`), or the
    /// `component` subfolder of a pipeline root. The tower's weights are found wherever they sit — unprefixed
    /// (BertModel, ChineseCLIPTextModel, XLMRobertaModel), under `bert.`/`roberta.` (pre-training heads beside
    /// them), or under `text_model.` (a full ChineseCLIPModel, vision tower beside it); TF-era `LayerNorm.gamma`/
    /// `beta` names are read as `weight`/`bias`. Every value comes from the file as it is (transformers 5 zeroes
    /// the padding row of the word embeddings when it loads; cn_clip and open_clip keep the trained values).
    /// `unusedWeights`: the tower's tensors nothing read (the pooler and position-id buffers are expected and
    /// not listed).
    /// `dtype`: the precision the parameters are stored and computed in (the output is in it).
    public static func load(folder: String, component: String = "text_encoder", backend: any ComputeBackend,
                            dtype: DType = .f32) throws -> (model: BertTextModel, unusedWeights: [String]) {
        let directory = try ModelFolder.component(folder, component)
        let config = try BertTextConfig(ConfigFile(path: joinPath(directory, "config.json")))
        let source = try openTransformersWeights(directory, backend: backend, dtype: dtype, rename: renameTFLayerNorm)
        return try load(config: config, source: source)
    }

    /// Loads a config file and a weights file given separately: e.g. cn_clip's own layout, a model config
    /// (`RoBERTa-wwm-ext-large-chinese.json`) and its training checkpoint (`clip_cn_vit-h-14.pt`, a torch.save of
    /// {"epoch", "step", "name", "state_dict": {"module.bert.…", "module.visual.…", …}}). The weights file may be
    /// safetensors or torch.save; the tower is found under whatever prefix it has. `unusedWeights` as `load(folder:)`.
    public static func load(config configPath: String, weights weightsPath: String, backend: any ComputeBackend,
                            dtype: DType = .f32) throws -> (model: BertTextModel, unusedWeights: [String]) {
        let config = try BertTextConfig(ConfigFile(path: configPath))
        let source = try CheckpointWeights(path: weightsPath, backend: backend, dtype: dtype, rename: renameTFLayerNorm)
        return try load(config: config, source: source)
    }

    static func load(config: BertTextConfig, source: CheckpointWeights) throws -> (model: BertTextModel, unusedWeights: [String]) {
        let prefix = try towerPrefix(source, marker: "embeddings.word_embeddings.weight")
        let model = try BertTextModel(config: config, weights: Weights(source, prefix: prefix.isEmpty ? "" : String(prefix.dropLast())))
        let ignored = ["pooler.", "embeddings.position_ids", "embeddings.token_type_ids"]
        let unused = source.names.filter { name in
            name.hasPrefix(prefix) && !ignored.contains { name.dropFirst(prefix.count).hasPrefix($0) } && !source.wasRead(name)
        }
        return (model, unused.compactMap { source.storedName(of: $0) })
    }

    /// TF-era BERT checkpoints name the layer norms' parameters `gamma` and `beta`.
    static func renameTFLayerNorm(_ name: String) -> String {
        if name.hasSuffix("LayerNorm.gamma") { return String(name.dropLast("gamma".count)) + "weight" }
        if name.hasSuffix("LayerNorm.beta") { return String(name.dropLast("beta".count)) + "bias" }
        return name
    }

    /// The encoder's states for token ids [B, L] (i32 or i64). `attentionMask` [B][L] (1 keep, 0 padding) hides
    /// padding keys as transformers' `attention_mask` does; nil attends everywhere. Token type 0 everywhere.
    /// Returns the last hidden state [B, L, D].
    public func callAsFunction(ids: HostTensor, attentionMask: [[Int]]? = nil) throws -> Tensor {
        let b = wordEmbeddings.backend
        guard ids.shape.count == 2, !ids.dtype.isFloatingPoint, let idValues = ids.integers() else {
            throw PEAError.shapeMismatch("\(config.modelType) text model: ids must be integer [B, L], got \(ids.dtype) \(ids.shape)")
        }
        let (batch, length) = (ids.shape[0], ids.shape[1])
        guard length > 0, batch > 0 else { throw PEAError.shapeMismatch("\(config.modelType) text model: empty batch or sequence \(ids.shape)") }
        guard length <= config.maxSequenceLength else {
            throw PEAError.shapeMismatch("\(config.modelType) text model: \(length) tokens, more than the \(config.maxSequenceLength) its position table allows")
        }
        if let bad = idValues.first(where: { $0 < 0 || $0 >= config.vocabSize }) {
            throw PEAError.shapeMismatch("\(config.modelType) text model: token id \(bad) is outside the vocabulary of \(config.vocabSize)")
        }

        var x = try b.embedding(b.upload(ids), table: wordEmbeddings)                                   // [B, L, D]
        let tokenType = try b.embedding(b.upload(HostTensor(ids: [0], shape: [1])), table: tokenTypeEmbeddings)  // [1, D]
        x = try b.add(x, tokenType)
        let positions: HostTensor
        switch config.positionIDs {
        case .absolute:
            positions = HostTensor(ids: Array(0..<length), shape: [length])                            // [L]
        case .paddingAware(let paddingIndex):
            positions = HostTensor(ids: BertTextModel.paddingAwarePositions(idValues, length: length, paddingIndex: paddingIndex),
                                   shape: [batch, length])                                              // [B, L]
        }
        x = try b.add(x, b.embedding(b.upload(positions), table: positionEmbeddings))
        x = try embeddingNorm(x)

        var mask: Tensor?
        if let attentionMask {
            guard attentionMask.count == batch, attentionMask.allSatisfy({ $0.count == length }) else {
                throw PEAError.shapeMismatch("\(config.modelType) text model: attention mask must be [\(batch), \(length)]")
            }
            // transformers fills masked scores with the dtype's lowest value; anything that underflows exp() to 0 is the same.
            // The mask is in the model's dtype (the kernels take one dtype per call).
            let dtype = wordEmbeddings.dtype, lowest = -dtype.greatestFiniteMagnitude
            mask = try b.upload(HostTensor(attentionMask.flatMap { $0.map { $0 == 0 ? lowest : 0 } }, shape: [batch, 1, 1, length], dtype: dtype))
        }
        for layer in layers { x = try layer(x, paddingMask: mask) }
        return x
    }

    /// fairseq's make_positions, as transformers' `create_position_ids_from_input_ids`:
    /// position = cumsum(id ≠ pad) · (id ≠ pad) + pad, per row.
    static func paddingAwarePositions(_ ids: [Int], length: Int, paddingIndex: Int) -> [Int] {
        var positions = [Int](repeating: paddingIndex, count: ids.count)
        for row in 0..<(ids.count / length) {
            var count = 0
            for i in (row * length)..<((row + 1) * length) where ids[i] != paddingIndex {
                count += 1
                positions[i] = paddingIndex + count
            }
        }
        return positions
    }
}

// MARK: - Loading helpers shared by the transformers text towers

/// A transformers folder's weights: `model.safetensors` (or its sharded index), else `pytorch_model.bin`.
func openTransformersWeights(_ directory: String, backend: any ComputeBackend, dtype: DType = .f32,
                             rename: (String) -> String) throws -> CheckpointWeights {
    let candidates = SafeTensorsCollection.candidateFileNames(baseName: "model", variant: nil)
    if candidates.contains(where: { isRegularFile(joinPath(directory, $0)) }) {
        return try CheckpointWeights(safetensors: SafeTensorsCollection.open(folder: directory, baseName: "model"), backend: backend, dtype: dtype, rename: rename)
    }
    let bin = joinPath(directory, "pytorch_model.bin")
    if isRegularFile(bin) {
        return try CheckpointWeights(torch: TorchCheckpointFile(path: bin), backend: backend, dtype: dtype, rename: rename)
    }
    throw PEAError.invalidFile(path: directory, reason: "no weights found; tried \((candidates + ["pytorch_model.bin"]).joined(separator: ", "))")
}

/// The prefix (with its trailing dot, or "") under which a tower's weights sit: the part before `marker` of
/// the one tensor name ending in it. Prefers `text_model.` when several towers match.
func towerPrefix(_ source: CheckpointWeights, marker: String) throws -> String {
    let matches = source.names.filter { $0 == marker || $0.hasSuffix("." + marker) }
    let prefixes = matches.map { String($0.dropLast(marker.count)) }
    if prefixes.count == 1 { return prefixes[0] }
    if prefixes.contains("text_model.") { return "text_model." }
    if prefixes.isEmpty {
        throw PEAError.invalidFile(path: source.path, reason: "no tensor named '\(marker)' (with or without a prefix): not a BERT/XLM-R text encoder's weights")
    }
    throw PEAError.invalidFile(path: source.path, reason: "several text towers: \(matches.joined(separator: ", "))")
}
