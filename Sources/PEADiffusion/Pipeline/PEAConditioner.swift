// PEA at inference (the authors' tests/test_sd_zh.py and test_sdxl_zh.py): a language-specific text encoder's
// last hidden state, through the PEA adapter, replaces the English CLIP encoders' conditioning — for the prompt
// and for the unconditional side, where a missing negative prompt is the empty prompt "" encoded and adapted
// like any other (never zeros, whatever the UNet's `force_zeros_for_empty_prompt`).

/// A text encoder with its tokenizer: texts → the last hidden state [B, L, D] that PEA's adapter reads.
public protocol LanguageEncoder {
    /// D, the width of the states.
    var hiddenSize: Int { get }
    /// The last hidden state [B, L, D] of a batch of texts, padded to the encoder's fixed length. `warn` receives a
    /// message when a text had to be truncated.
    func encode(_ texts: [String], warn: (String) -> Void) throws -> Tensor
}

/// A BERT or XLM-R text tower with its tokenizer (Chinese-CLIP: 52 tokens as cn_clip; multilingual CLIP
/// XLM-R: 77 as open_clip). The attention mask is the tokenizer's.
public struct TokenizedTextEncoder<Tokenizer: PaddingTokenizer>: LanguageEncoder {
    public let tokenizer: Tokenizer
    public let model: BertTextModel
    public let maxLength: Int
    /// How warnings name the encoder ("Chinese-CLIP", "XLM-R").
    public let displayName: String

    public init(tokenizer: Tokenizer, model: BertTextModel, maxLength: Int, displayName: String) throws {
        guard maxLength >= 2, maxLength <= model.config.maxSequenceLength else {
            throw PEAError.usage("maxLength must be in 2...\(model.config.maxSequenceLength) for this \(model.config.modelType) encoder, got \(maxLength)")
        }
        self.tokenizer = tokenizer
        self.model = model
        self.maxLength = maxLength
        self.displayName = displayName
    }

    public var hiddenSize: Int { model.config.hiddenSize }

    /// Token ids and attention masks [B, maxLength] (int64), and for each text the part truncation cut.
    public func tokenize(_ texts: [String]) -> (ids: HostTensor, attentionMask: HostTensor, truncated: [String?]) {
        var ids: [Int] = [], mask: [Int] = [], truncated: [String?] = []
        for text in texts {
            let encoded = tokenizer(text, maxLength: maxLength)
            ids += encoded.ids
            mask += encoded.attentionMask
            truncated.append(encoded.truncatedText)
        }
        return (HostTensor(ids: ids, shape: [texts.count, maxLength]), HostTensor(ids: mask, shape: [texts.count, maxLength]), truncated)
    }

    public func encode(_ texts: [String], warn: (String) -> Void) throws -> Tensor {
        var rows: [[Int]] = [], masks: [[Int]] = []
        for text in texts {
            let encoded = tokenizer(text, maxLength: maxLength)
            guard encoded.ids.count == maxLength, encoded.attentionMask.count == maxLength else {
                throw PEAError.shapeMismatch("\(displayName) tokenizer gave \(encoded.ids.count) ids and \(encoded.attentionMask.count) mask values for max length \(maxLength)")
            }
            if let cut = encoded.truncatedText {
                warn("The following part of your input was truncated because \(displayName) can only handle sequences up to \(maxLength) tokens: \(cut)")
            }
            rows.append(encoded.ids)
            masks.append(encoded.attentionMask)
        }
        return try model(ids: HostTensor(ids: rows.flatMap { $0 }, shape: [texts.count, maxLength]), attentionMask: masks)
    }
}

/// An English CLIP text stack is a language encoder too (its last hidden state, no padding mask, as diffusers).
extension CLIPTextStack: LanguageEncoder {
    public var hiddenSize: Int { encoder.config.hiddenSize }

    public func encode(_ texts: [String], warn: (String) -> Void) throws -> Tensor {
        try run(texts, warn: warn).lastHiddenState
    }
}

/// PEA's conditioning: encoder → adapter. SD1.x form: states = the adapter's sequence; SDXL form: states = the
/// fc head's [B, L, 2048] and pooled = the mean of the stack output [B, 1280] (SDXL's `text_embeds`).
public struct PEAConditioner: TextConditioner {
    public let encoder: any LanguageEncoder
    public let adapter: PEAAdapter

    /// - Throws: when the encoder's width is not the adapter's input width.
    public init(encoder: any LanguageEncoder, adapter: PEAAdapter) throws {
        guard encoder.hiddenSize == adapter.inputDim else {
            throw PEAError.shapeMismatch("the text encoder's states are \(encoder.hiddenSize) wide, but the PEA adapter reads \(adapter.inputDim) (layernorm.weight)")
        }
        self.encoder = encoder
        self.adapter = adapter
    }

    public func encode(_ prompts: [String], warn: (String) -> Void) throws -> Conditioning {
        let (sequence, pooled) = try adapter(encoder.encode(prompts, warn: warn))
        return Conditioning(states: sequence, pooled: pooled)
    }

    /// nil → "" for each of the `count` prompts, adapted (the official scripts' `uncond_tokens = [""] * batch_size`).
    public func encodeNegative(_ negatives: [String]?, count: Int, warn: (String) -> Void) throws -> Conditioning {
        try encode(negatives ?? Array(repeating: "", count: count), warn: warn)
    }
}
