// transformers' XLMRobertaModel (models/xlm_roberta/modeling_xlm_roberta.py): the text tower of the
// multilingual CLIP `xlm-roberta-large-ViT-H-14` (open_clip's HF text encoder wraps this model; with
// `output_tokens` and its mean pooler it hands out the whole last hidden state [B, 77, 1024], which is what
// PEA's adapter reads). The encoder is BERT's (BertTextModel.swift); the embeddings differ:
// - position ids count only the non-padding tokens and start after the padding index:
//   position = cumsum(id ≠ pad) · (id ≠ pad) + pad (pad = pad_token_id = 1), so padding tokens all read row 1
//   of the position table and the first real token row 2 — max_position_embeddings 514 allows 512 tokens;
// - one token type (type_vocab_size 1).
// open_clip builds the attention mask as `ids != pad_token_id`.

public struct XLMRobertaTextModel {
    public let encoder: BertTextModel

    public var config: BertTextConfig { encoder.config }

    public init(config: BertTextConfig, weights: Weights) throws {
        guard case .paddingAware = config.positionIDs else {
            throw PEAError.unsupported("XLMRobertaTextModel needs an XLM-R/RoBERTa config (padding-aware position ids), got model_type \"\(config.modelType)\"")
        }
        encoder = try BertTextModel(config: config, weights: weights)
    }

    /// Loads a transformers XLMRobertaModel folder (weights unprefixed, or under `roberta.` beside a head), or
    /// the `component` subfolder of a pipeline root. See `BertTextModel.load` for what is read and reported.
    public static func load(folder: String, component: String = "text_encoder", backend: any ComputeBackend,
                            dtype: DType = .f32) throws -> (model: XLMRobertaTextModel, unusedWeights: [String]) {
        let (encoder, unused) = try BertTextModel.load(folder: folder, component: component, backend: backend, dtype: dtype)
        guard case .paddingAware = encoder.config.positionIDs else {
            throw PEAError.invalidConfig(path: joinPath(try ModelFolder.component(folder, component), "config.json"),
                                         reason: "'model_type': \"\(encoder.config.modelType)\" is not an XLM-R model (xlm-roberta, roberta)")
        }
        return (XLMRobertaTextModel(encoder: encoder), unused)
    }

    private init(encoder: BertTextModel) { self.encoder = encoder }

    /// Token ids [B, L] and the attention mask (1 keep, 0 padding) → the last hidden state [B, L, D].
    public func callAsFunction(ids: HostTensor, attentionMask: [[Int]]? = nil) throws -> Tensor {
        try encoder(ids: ids, attentionMask: attentionMask)
    }
}
