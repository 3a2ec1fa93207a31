// Added tokens (special tokens and tokens a config adds to the vocabulary), matched in the text before the
// model's own tokenization, as the tokenizers library does; shared by the CLIP, WordPiece and unigram tokenizers.

/// A token matched in the text ahead of the model's own tokenization (transformers' special and added tokens).
struct AddedTokenEntry: Sendable, Equatable {
    var content: String
    var id: Int
    var special: Bool
}

/// Splits UTF-8 text on added tokens, leftmost then longest match (tokenizers' Aho-Corasick `LeftmostLongest`).
/// Matching bytes is enough: a valid UTF-8 token can only match at a character boundary.
struct AddedTokenSplitter: Sendable {
    enum Segment: Equatable {
        case text([UInt8])
        case token(Int)
    }

    private let tokens: [(bytes: [UInt8], id: Int)]
    private let idsByContent: [[UInt8]: Int]

    init(_ entries: [AddedTokenEntry]) {
        tokens = entries.filter { !$0.content.isEmpty }.map { (Array($0.content.utf8), $0.id) }
        idsByContent = Dictionary(tokens.map { ($0.bytes, $0.id) }, uniquingKeysWith: { _, last in last })
    }

    func id(of content: String) -> Int? { idsByContent[Array(content.utf8)] }

    func split(_ bytes: [UInt8]) -> [Segment] {
        guard !tokens.isEmpty else { return bytes.isEmpty ? [] : [.text(bytes)] }
        var segments: [Segment] = []
        var textStart = 0
        var position = 0
        while position < bytes.count {
            var best: (length: Int, id: Int)? = nil
            for token in tokens where token.bytes.count > (best?.length ?? 0) && position + token.bytes.count <= bytes.count {
                if bytes[position] == token.bytes[0], bytes[position..<(position + token.bytes.count)].elementsEqual(token.bytes) {
                    best = (token.bytes.count, token.id)
                }
            }
            if let match = best {
                if textStart < position { segments.append(.text(Array(bytes[textStart..<position]))) }
                segments.append(.token(match.id))
                position += match.length
                textStart = position
            } else {
                position += 1
            }
        }
        if textStart < bytes.count { segments.append(.text(Array(bytes[textStart...]))) }
        return segments
    }
}
