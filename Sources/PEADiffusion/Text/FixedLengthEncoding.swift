/// What transformers' `tokenizer(text, padding="max_length", max_length=L, truncation=True)` makes of a full
/// encoding (start token … end token), shared by every tokenizer here: at most `maxLength` ids, the end token
/// kept last when the text is cut, then `padID` up to `maxLength` when `padding`; the attention mask (1 for
/// tokens, 0 for padding); and the cut ids decoded (what diffusers' truncation warning shows), nil when
/// nothing was cut.
private func fixedLengthEncoding(_ full: [Int], maxLength: Int, padding: Bool, endID: Int, padID: Int,
                         decode: ([Int]) -> String) -> (ids: [Int], attentionMask: [Int], truncatedText: String?) {
    precondition(maxLength >= 2, "maxLength must leave room for the start and end tokens")
    precondition(!padding || maxLength <= 1 << 20, "padding to \(maxLength) tokens: pass maxLength (the config has no model_max_length)")
    var ids = full
    var truncatedText: String? = nil
    if full.count > maxLength {
        ids = Array(full[0..<(maxLength - 1)]) + [endID]
        truncatedText = decode(Array(full[(maxLength - 1)..<(full.count - 1)]))
    }
    var attentionMask = [Int](repeating: 1, count: ids.count)
    if padding && ids.count < maxLength {
        attentionMask += [Int](repeating: 0, count: maxLength - ids.count)
        ids += [Int](repeating: padID, count: maxLength - ids.count)
    }
    return (ids, attentionMask, truncatedText)
}

/// A tokenizer with transformers' fixed-length call, `tokenizer(text, padding="max_length", max_length=L,
/// truncation=True)`: CLIP's BPE (as diffusers calls it, 77 tokens), WordPiece (Chinese-CLIP: cn_clip and PEA use
/// 52) and SentencePiece unigram (XLM-R: open_clip uses 77). Each gives its full encoding, its end and pad tokens
/// and the text of cut ids; the call itself is written once, below.
public protocol FixedLengthTokenizer: PaddingTokenizer {
    /// The config's `model_max_length`, the length when none is given.
    var modelMaxLength: Int { get }
    /// The token every encoding ends with (`<|endoftext|>`, `[SEP]`, `</s>`), kept last when a text is cut.
    var endTokenID: Int { get }
    var padTokenID: Int { get }
    /// The full encoding: start token, the text's tokens, end token.
    func encode(_ text: String) -> [Int]
    /// Ids as text, for the truncation warning (diffusers shows `batch_decode(untruncated_ids[:, L - 1 : -1])`).
    func truncationText(_ ids: [Int]) -> String
}

/// The most Unicode scalars of a text the tokenizers read; the rest is cut before encoding. Tokenising is at
/// least linear in the text (a 2M-character caption stalled a training step for minutes) and only the first
/// `maxLength` tokens (77, 52) are kept, so the tail of a longer text cannot matter: each token covers at least
/// one non-space character, and 77 tokens of real text take a few thousand characters at most. The cut can
/// change the ids only of a text whose first 65 536 characters make fewer than `maxLength` tokens — more than
/// 850 characters of spaces or ignored characters per token — and is then reported as a truncation all the same.
public let maximumTokenizedTextLength = 1 << 16

/// `text` cut to `maximumTokenizedTextLength` scalars, and how many scalars were cut.
func cappedForTokenizing(_ text: String) -> (kept: String, cutCount: Int) {
    guard text.utf8.count > maximumTokenizedTextLength,
          let end = text.unicodeScalars.index(text.unicodeScalars.startIndex, offsetBy: maximumTokenizedTextLength,
                                              limitedBy: text.unicodeScalars.endIndex),
          end != text.unicodeScalars.endIndex else { return (text, 0) }
    return (String(text.unicodeScalars[..<end]), text.unicodeScalars[end...].count)
}

extension FixedLengthTokenizer {
    /// At most `maxLength` (default `modelMaxLength`) ids ending in the end token, padded with the pad token when
    /// `padding` is true; the attention mask; `truncatedText`, the removed ids decoded, nil when nothing was cut.
    /// A text longer than `maximumTokenizedTextLength` is cut first, which `truncatedText` says.
    public func callAsFunction(_ text: String, maxLength: Int? = nil, padding: Bool = true)
        -> (ids: [Int], attentionMask: [Int], truncatedText: String?) {
        let (kept, cutCount) = cappedForTokenizing(text)
        var encoding = fixedLengthEncoding(encode(kept), maxLength: maxLength ?? modelMaxLength, padding: padding,
                                           endID: endTokenID, padID: padTokenID, decode: truncationText)
        if cutCount > 0 {
            encoding.truncatedText = (encoding.truncatedText.map { $0 + " " } ?? "") + "… (\(cutCount) more characters, not tokenized)"
        }
        return encoding
    }

    /// Padded to `maxLength`, as the language encoders call it.
    public func callAsFunction(_ text: String, maxLength: Int) -> (ids: [Int], attentionMask: [Int], truncatedText: String?) {
        self(text, maxLength: Optional(maxLength), padding: true)
    }
}

/// What a text encoder needs of its tokenizer: ids padded and truncated to a fixed length with the attention mask
/// (1 keep, 0 padding), and `truncatedText`, the part that was cut, for the warning. Every `FixedLengthTokenizer`
/// is one; tests replay fixture rows through it.
public protocol PaddingTokenizer {
    func callAsFunction(_ text: String, maxLength: Int) -> (ids: [Int], attentionMask: [Int], truncatedText: String?)
}

extension ConfigFile {
    /// A tokenizer config's `model_max_length`, or `Int.max` where transformers would use its "no limit" value
    /// (missing, or 1e30). Read as a number because of that 1e30; it must leave room for the start and end tokens.
    func modelMaxLength() throws -> Int {
        guard let length = try optionalDouble("model_max_length") else { return Int.max }
        guard length >= 2, length == length.rounded() else {
            throw PEAError.invalidConfig(path: path, reason: "key 'model_max_length': must be a whole number of at least 2 (the start and end tokens), found \(JSONValue.format(length))")
        }
        return length < 1e15 ? Int(length) : Int.max
    }
}
