// The language-specific encoders PEA uses, each a tokenizer (Text/) with its text tower (Models/), loaded from one
// folder: Chinese-CLIP (WordPiece + BERT, 52 tokens as cn_clip) and multilingual CLIP's XLM-R (SentencePiece
// unigram + XLM-R, 77 tokens as open_clip). The tokenizer files sit in the folder itself (a transformers model
// folder as the hub has them: config.json, weights, vocab.txt / tokenizer.json …) or in its `tokenizer/`
// subfolder beside `text_encoder/`.

public enum LanguageEncoders {
    /// cn_clip's context length (`clip.tokenize(..., context_length=52)`).
    public static let chineseCLIPMaxLength = 52
    /// open_clip's context length for `xlm-roberta-large-ViT-H-14`.
    public static let xlmRobertaMaxLength = 77

    /// The encoder a folder holds, by its config's `model_type`: BERT / Chinese-CLIP → WordPiece + BERT,
    /// XLM-R → SentencePiece + XLM-R. `maxLength` nil: 52 (Chinese-CLIP) or 77 (XLM-R).
    public static func load(folder: String, backend: any ComputeBackend, maxLength: Int? = nil, dtype: DType = .f32) throws -> any LanguageEncoder {
        let directory = try ModelFolder.component(folder, "text_encoder")
        let config = try BertTextConfig(ConfigFile(path: joinPath(directory, "config.json")))
        if case .paddingAware = config.positionIDs {
            return try xlmRoberta(folder: folder, backend: backend, maxLength: maxLength ?? xlmRobertaMaxLength, dtype: dtype)
        }
        return try chineseCLIP(folder: folder, backend: backend, maxLength: maxLength ?? chineseCLIPMaxLength, dtype: dtype)
    }

    /// Chinese-CLIP's text side: `vocab.txt` (+ tokenizer_config.json) and a BERT/ChineseCLIP model.
    public static func chineseCLIP(folder: String, backend: any ComputeBackend, maxLength: Int = chineseCLIPMaxLength,
                                   dtype: DType = .f32) throws
        -> TokenizedTextEncoder<WordPieceTokenizer> {
        let tokenizer = try WordPieceTokenizer(folder: tokenizerFolder(folder, marker: ["vocab.txt"]))
        let (model, _) = try BertTextModel.load(folder: folder, backend: backend, dtype: dtype)
        return try TokenizedTextEncoder(tokenizer: tokenizer, model: model, maxLength: maxLength, displayName: "Chinese-CLIP")
    }

    /// Multilingual CLIP's XLM-R text side: `tokenizer.json` or `sentencepiece.bpe.model` and an XLM-R model.
    public static func xlmRoberta(folder: String, backend: any ComputeBackend, maxLength: Int = xlmRobertaMaxLength,
                                  dtype: DType = .f32) throws
        -> TokenizedTextEncoder<SentencePieceUnigramTokenizer> {
        let tokenizer = try SentencePieceUnigramTokenizer(folder: tokenizerFolder(folder, marker: ["tokenizer.json", "sentencepiece.bpe.model"]))
        let (model, _) = try XLMRobertaTextModel.load(folder: folder, backend: backend, dtype: dtype)
        return try TokenizedTextEncoder(tokenizer: tokenizer, model: model.encoder, maxLength: maxLength, displayName: "XLM-R")
    }

    /// `folder` when it holds one of the marker files, else `folder/tokenizer`.
    static func tokenizerFolder(_ folder: String, marker: [String]) throws -> String {
        for candidate in [folder, joinPath(folder, "tokenizer")] where marker.contains(where: { isRegularFile(joinPath(candidate, $0)) }) {
            return candidate
        }
        throw PEAError.invalidFile(path: folder, reason: "no tokenizer files (\(marker.joined(separator: " or "))) in the folder or its tokenizer/ subfolder")
    }
}
