/// What transformers' `tokenizer(text, padding="max_length", max_length=L, truncation=True)` makes of a full
/// encoding (start token … end token), shared by every tokenizer here: at most `maxLength` ids, the end token
/// kept last when the text is cut, then `padID` up to `maxLength` when `padding`; the attention mask (1 for
/// tokens, 0 for padding); and the cut ids decoded (what diffusers' truncation warning shows), nil when
/// nothing was cut.
func fixedLengthEncoding(_ full: [Int], maxLength: Int, padding: Bool, endID: Int, padID: Int,
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
