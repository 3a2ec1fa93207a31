// Prompt → the UNet's conditioning, as diffusers' StableDiffusionPipeline.encode_prompt (SD1.x, SD2.x) and
// StableDiffusionXLPipeline.encode_prompt (SDXL) compute it.

/// What the UNet is conditioned on for a batch of prompts: the token states [B, T, D] and, for SDXL, the
/// pooled text embedding [B, P].
public struct Conditioning {
    public var states: Tensor
    public var pooled: Tensor?

    public init(states: Tensor, pooled: Tensor? = nil) {
        self.states = states
        self.pooled = pooled
    }
}

/// Turns prompts into conditioning. The English CLIP encoders are one implementation; PEA's language-specific
/// encoder followed by the adapter is another, and the pipeline cannot tell them apart.
public protocol TextConditioner {
    /// The prompts' conditioning. `warn` receives a message when a prompt had to be truncated.
    func encode(_ prompts: [String], warn: (String) -> Void) throws -> Conditioning
    /// The unconditional side of classifier-free guidance: `negatives` given (even "") are encoded like
    /// prompts; nil means diffusers' `negative_prompt=None`.
    func encodeNegative(_ negatives: [String]?, count: Int, warn: (String) -> Void) throws -> Conditioning
}

/// One CLIP tokenizer + text encoder pair, as a pipeline folder holds them (`tokenizer/` + `text_encoder/`).
public struct CLIPTextStack {
    public let tokenizer: CLIPTokenizer
    public let encoder: CLIPTextModel

    public init(tokenizer: CLIPTokenizer, encoder: CLIPTextModel) {
        self.tokenizer = tokenizer
        self.encoder = encoder
    }

    /// Tokenizes with padding to the tokenizer's maximum length and truncation (warning with what was cut),
    /// then runs the encoder, keeping every hidden state.
    func run(_ texts: [String], warn: (String) -> Void) throws -> CLIPTextOutput {
        var ids: [Int] = []
        // diffusers pads to the tokenizer's model_max_length (77 in every CLIP folder); a config without one
        // falls back to the encoder's position table.
        let length = min(tokenizer.modelMaxLength, encoder.config.maxPositions)
        for text in texts {
            let encoded = tokenizer(text, maxLength: length)
            if let cut = encoded.truncatedText {
                warn("The following part of your input was truncated because CLIP can only handle sequences up to \(length) tokens: \(cut)")
            }
            ids += encoded.ids
        }
        return try encoder(ids: HostTensor(ids: ids, shape: [texts.count, length]), keepHiddenStates: true)
    }
}

/// SD1.x and SD2.x: one CLIP text encoder; the prompt's states are the last hidden state, or with
/// `clipSkip` = k the output of layer L − k through the final layer norm. (diffusers applies clip_skip to the
/// prompt only; the negative prompt always uses the last hidden state.)
public struct CLIPConditioner: TextConditioner {
    public let text: CLIPTextStack
    public let clipSkip: Int

    public init(text: CLIPTextStack, clipSkip: Int = 0) throws {
        guard clipSkip >= 0, clipSkip < text.encoder.config.layers else {
            throw PEAError.usage("clipSkip must be in 0..<\(text.encoder.config.layers) for this text encoder, got \(clipSkip)")
        }
        self.text = text
        self.clipSkip = clipSkip
    }

    public func encode(_ prompts: [String], warn: (String) -> Void) throws -> Conditioning {
        let output = try text.run(prompts, warn: warn)
        if clipSkip == 0 { return Conditioning(states: output.lastHiddenState) }
        let hidden = output.hiddenStates[output.hiddenStates.count - 1 - clipSkip]
        return Conditioning(states: try text.encoder.finalNormed(hidden))
    }

    public func encodeNegative(_ negatives: [String]?, count: Int, warn: (String) -> Void) throws -> Conditioning {
        Conditioning(states: try text.run(negatives ?? Array(repeating: "", count: count), warn: warn).lastHiddenState)
    }
}

/// SDXL: two CLIP encoders; the states are both encoders' penultimate hidden states (or 1 + clipSkip from the
/// end) concatenated on the feature axis, the pooled vector is the second encoder's projected output. With
/// `force_zeros_for_empty_prompt` and no negative prompt, the unconditional side is all zeros.
public struct SDXLConditioner: TextConditioner {
    public let first, second: CLIPTextStack
    public let clipSkip: Int
    public let forceZerosForEmptyPrompt: Bool

    public init(first: CLIPTextStack, second: CLIPTextStack, clipSkip: Int = 0, forceZerosForEmptyPrompt: Bool) throws {
        guard second.encoder.config.projectionDim != nil else {
            throw PEAError.unsupported("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection")
        }
        let layers = min(first.encoder.config.layers, second.encoder.config.layers)
        // A one-layer encoder is a config problem, not a --clip-skip one (config readers require at least 1 layer).
        guard layers >= 2 else {
            throw PEAError.unsupported("SDXL conditions on the text encoders' penultimate hidden state, so each needs at least 2 layers; 'num_hidden_layers' in a text encoder's config.json is \(layers)")
        }
        guard clipSkip >= 0, clipSkip + 1 < layers else {
            throw PEAError.usage("clipSkip must be in 0..<\(layers - 1) for these text encoders, got \(clipSkip)")
        }
        self.first = first
        self.second = second
        self.clipSkip = clipSkip
        self.forceZerosForEmptyPrompt = forceZerosForEmptyPrompt
    }

    public func encode(_ prompts: [String], warn: (String) -> Void) throws -> Conditioning {
        try encode(prompts, fromEnd: 2 + clipSkip, warn: warn)
    }

    public func encodeNegative(_ negatives: [String]?, count: Int, warn: (String) -> Void) throws -> Conditioning {
        if negatives == nil && forceZerosForEmptyPrompt {
            let b = first.encoder.tokenEmbedding.backend
            let width = first.encoder.config.hiddenSize + second.encoder.config.hiddenSize
            let length = min(first.tokenizer.modelMaxLength, first.encoder.config.maxPositions)
            let dtype = second.encoder.dtype   // the encoders' dtype, so the zeros concatenate with their states
            return Conditioning(states: try b.zeros([count, length, width], dtype: dtype),
                                pooled: try b.zeros([count, second.encoder.config.projectionDim!], dtype: dtype))
        }
        return try encode(negatives ?? Array(repeating: "", count: count), fromEnd: 2, warn: warn)
    }

    /// hidden_states[-fromEnd] of both encoders, concatenated; the second encoder's text_embeds as pooled.
    private func encode(_ texts: [String], fromEnd: Int, warn: (String) -> Void) throws -> Conditioning {
        let a = try first.run(texts, warn: warn), b = try second.run(texts, warn: warn)
        let states = try a.lastHiddenState.backend.concat(
            [a.hiddenStates[a.hiddenStates.count - fromEnd], b.hiddenStates[b.hiddenStates.count - fromEnd]], dim: 2)
        return Conditioning(states: states, pooled: b.textEmbeds)
    }
}
