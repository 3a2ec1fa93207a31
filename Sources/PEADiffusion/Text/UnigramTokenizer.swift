#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// XLM-R's SentencePiece unigram tokenizer (`xlm-roberta-large`, the text tokenizer of multilingual CLIP
/// `xlm-roberta-large-ViT-H-14`), loaded from a transformers folder: `tokenizer.json` when present (its Unigram
/// vocabulary with scores and its Precompiled normalizer's charsmap), else `sentencepiece.bpe.model` (the
/// SentencePiece protobuf: pieces, scores, `precompiled_charsmap`); plus `tokenizer_config.json` and
/// `special_tokens_map.json` when present (special tokens, `add_prefix_space`, `model_max_length`).
///
/// It matches what transformers 5 gives for `XLMRobertaTokenizer.from_pretrained(folder)` (what open_clip's
/// `HFTokenizer("xlm-roberta-large")` and `AutoTokenizer` load): the tokenizers-backed (Rust) tokenizer, which
/// transformers 5 rebuilds in the class's `__init__` — so only the vocabulary and the charsmap are taken from the
/// files, whatever normalizer or pre-tokenizer tokenizer.json spells out. Its steps:
/// 1. The special tokens (`<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>`, and any other added token) are split out of the
///    raw text first, leftmost then longest match.
/// 2. The Precompiled normalizer (SentencePiece's nmt_nfkc: NFKC, control characters removed, odd spaces to " ") as
///    tokenizers applies it: for each extended grapheme cluster shorter than 6 UTF-8 bytes, the replacement of its
///    shortest prefix in the charsmap's double-array trie, if any; otherwise each scalar's replacement, if any.
/// 3. WhitespaceSplit (White_Space separates words and is dropped), then Metaspace: "▁" in front of each word not
///    starting with one (`add_prefix_space`, default true), and a split before each "▁" that a non-"▁" follows.
/// 4. Unigram: the Viterbi segmentation of each piece over the vocabulary's scores (every entry, the special tokens
///    included, with their scores); a scalar no entry starts with is `<unk>` scored 10 below the lowest score, and
///    adjacent `<unk>`s are fused into one. No byte fallback.
/// 5. `<s>` + ids + `</s>`; truncation keeps that frame, padding uses `<pad>` (id 1).
///
/// Ids are fairseq's, as transformers' vocabulary lists them: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then
/// SentencePiece piece i (from 3) at i + 1, and `<mask>` last (250001 for XLM-R; vocabulary size 250002).
/// Grapheme clusters are Swift's `Character`s (Unicode 17; tokenizers' unicode-segmentation crate is Unicode 16).
public struct SentencePieceUnigramTokenizer: Sendable {
    /// Where the vocabulary was read from.
    public enum Source: Sendable, Equatable {
        case tokenizerJSON
        case sentencePieceModel
    }

    /// The folder the tokenizer was loaded from.
    public let folder: String
    public let source: Source
    /// `model_max_length` from tokenizer_config.json; `Int.max` when the config has none (or transformers' 1e30).
    public let modelMaxLength: Int
    /// `add_prefix_space` (default true): Metaspace's "always" prepend scheme, else "never".
    public let addPrefixSpace: Bool
    /// transformers' `clean_up_tokenization_spaces` (applied by `decode`), false when the config does not say.
    public let cleanUpTokenizationSpaces: Bool

    public let bosToken: String
    public let eosToken: String
    public let padToken: String
    public let unknownToken: String
    public let maskToken: String
    public let bosTokenID: Int
    public let eosTokenID: Int
    public let padTokenID: Int
    /// The Unigram model's unknown id: 3, as `XLMRobertaTokenizer` builds its model.
    public let unknownTokenID: Int
    public let maskTokenID: Int
    /// The number of vocabulary entries (250002 for XLM-R).
    public let vocabularySize: Int

    private let pieces: PieceTrie
    private let scores: [Double]
    private let unknownScore: Double
    private let vocabularyTokens: [String]
    private let addedTokensByID: [Int: String]
    private let charsmap: PrecompiledCharsmap?
    private let addedTokens: AddedTokenSplitter
    private let specialTokenIDs: Set<Int>

    static let metaspace: Unicode.Scalar = "\u{2581}"
    /// tokenizers' `K_UNK_PENALTY`.
    static let unknownPenalty = 10.0
    static let modelUnknownID = 3
    static let supportedClasses: Set<String> = ["XLMRobertaTokenizer", "XLMRobertaTokenizerFast"]

    // MARK: - Loading

    /// Loads an XLM-R tokenizer folder (tokenizer.json, or sentencepiece.bpe.model, and the optional configs).
    /// - Throws: `PEAError.invalidFile` naming tokenizer.json or sentencepiece.bpe.model when neither exists or the
    ///   one read is malformed; `PEAError.invalidConfig` naming a malformed tokenizer_config.json or
    ///   special_tokens_map.json; `PEAError.unsupported` when tokenizer_config.json names another tokenizer class or
    ///   tokenizer.json holds another model type.
    public init(folder: String) throws {
        self.folder = folder
        let config = try TokenizerFolderConfig(folder: folder, defaults: [
            "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
            "pad_token": "<pad>", "mask_token": "<mask>",
        ])
        if let tokenizerClass = try config.file.optionalString("tokenizer_class"), !Self.supportedClasses.contains(tokenizerClass) {
            throw PEAError.unsupported("\(config.file.path): tokenizer_class \"\(tokenizerClass)\": Pea's SentencePiece tokenizer implements XLMRobertaTokenizer")
        }
        modelMaxLength = config.modelMaxLength
        addPrefixSpace = try config.file.optionalBool("add_prefix_space") ?? true
        cleanUpTokenizationSpaces = try config.file.optionalBool("clean_up_tokenization_spaces") ?? false
        let named = config.namedTokens

        let jsonPath = folder + "/tokenizer.json"
        let modelPath = folder + "/sentencepiece.bpe.model"
        let vocabulary: [(piece: String, score: Double)]
        var extraTokens: [String] = []
        let charsmapBytes: [UInt8]?
        let charsmapFile: String
        if isRegularFile(jsonPath) {
            source = .tokenizerJSON
            (vocabulary, charsmapBytes) = try Self.readTokenizerJSON(jsonPath)
            charsmapFile = jsonPath
        } else if isRegularFile(modelPath) {
            source = .sentencePieceModel
            let model = try SentencePieceModelFile(path: modelPath)
            guard model.pieces.count >= 3 else {
                throw PEAError.invalidFile(path: modelPath, reason: "expected at least the <unk>, <s> and </s> pieces, found \(model.pieces.count) pieces")
            }
            // transformers' XLMRobertaConverter: fairseq's four specials, the pieces after SentencePiece's three, <mask>.
            vocabulary = [(named["bos_token"]!, 0), (named["pad_token"]!, 0), (named["eos_token"]!, 0), (named["unk_token"]!, 0)]
                + model.pieces[3...].map { ($0.piece, $0.score) } + [(named["mask_token"]!, 0)]
            // Control and user-defined pieces become added tokens (skipped by decode(skipSpecialTokens:) too).
            extraTokens = model.pieces.filter { $0.type == 3 || $0.type == 4 }.map(\.piece)
            charsmapBytes = model.precompiledCharsmap
            charsmapFile = modelPath
        } else {
            throw PEAError.invalidFile(path: jsonPath, reason: "cannot open: neither tokenizer.json nor sentencepiece.bpe.model is in the folder")
        }
        guard vocabulary.count > Self.modelUnknownID else {
            throw PEAError.invalidFile(path: source == .tokenizerJSON ? jsonPath : modelPath,
                                       reason: "the vocabulary has \(vocabulary.count) entries; XLM-R's unknown id is \(Self.modelUnknownID)")
        }
        if let charsmapBytes, !charsmapBytes.isEmpty {
            do {
                charsmap = try PrecompiledCharsmap(charsmapBytes)
            } catch let error as PrecompiledCharsmap.FormatError {
                throw PEAError.invalidFile(path: charsmapFile, reason: "precompiled_charsmap: \(error.message)")
            }
        } else {
            charsmap = nil
        }

        var pieces = PieceTrie()
        var minimum = Double.infinity
        for (id, entry) in vocabulary.enumerated() {
            pieces.insert(Array(entry.piece.utf8), id: id)
            minimum = min(minimum, entry.score)
        }
        self.pieces = pieces
        scores = vocabulary.map(\.score)
        unknownScore = minimum - Self.unknownPenalty
        vocabularyTokens = vocabulary.map(\.piece)
        vocabularySize = vocabulary.count
        unknownTokenID = Self.modelUnknownID

        let all = try config.resolveAddedTokens(vocabularySize: vocabulary.count, extras: extraTokens) {
            pieces.id(of: Array($0.utf8))
        }
        addedTokens = AddedTokenSplitter(all)
        specialTokenIDs = Set(all.filter(\.special).map(\.id))
        var beyond: [Int: String] = [:]
        for token in all where token.id >= vocabulary.count { beyond[token.id] = token.content }
        addedTokensByID = beyond

        bosToken = named["bos_token"]!
        eosToken = named["eos_token"]!
        padToken = named["pad_token"]!
        unknownToken = named["unk_token"]!
        maskToken = named["mask_token"]!
        func id(_ token: String) -> Int { all.first { $0.content.utf8.elementsEqual(token.utf8) }!.id }
        bosTokenID = id(bosToken)
        eosTokenID = id(eosToken)
        padTokenID = id(padToken)
        maskTokenID = id(maskToken)
    }

    /// tokenizer.json: the Unigram model's `vocab` (`[piece, score]` pairs) and the first Precompiled normalizer's
    /// charsmap (the normalizer itself or a member of a Sequence), as transformers extracts them.
    private static func readTokenizerJSON(_ path: String) throws -> ([(piece: String, score: Double)], [UInt8]?) {
        let document: JSONValue
        do {
            document = try JSONValue.parse(try readWholeFile(path))
        } catch let error as JSONParseError {
            throw PEAError.invalidFile(path: path, reason: "invalid JSON: \(error)")
        }
        guard case .object(let root) = document else {
            throw PEAError.invalidFile(path: path, reason: "expected an object at the top level, found \(document.kindDescription)")
        }
        guard case .object(let model)? = root["model"] else {
            throw PEAError.invalidFile(path: path, reason: "expected a 'model' object, found \(root["model"]?.kindDescription ?? "nothing")")
        }
        let type = model["type"]?.stringValue
        guard type == "Unigram" else {
            throw PEAError.unsupported("\(path): model type \(type.map { "\"\($0)\"" } ?? "missing"): Pea's SentencePiece tokenizer reads Unigram models")
        }
        guard case .array(let entries)? = model["vocab"] else {
            throw PEAError.invalidFile(path: path, reason: "model.vocab: expected a list of [piece, score] pairs, found \(model["vocab"]?.kindDescription ?? "nothing")")
        }
        var vocabulary: [(piece: String, score: Double)] = []
        vocabulary.reserveCapacity(entries.count)
        for (index, entry) in entries.enumerated() {
            guard case .array(let pair) = entry, pair.count == 2, let piece = pair[0].stringValue, let score = pair[1].doubleValue else {
                throw PEAError.invalidFile(path: path, reason: "model.vocab[\(index)]: expected a [piece, score] pair, found \(entry.kindDescription)")
            }
            vocabulary.append((piece, score))
        }

        var normalizers: [JSONValue] = []
        if let normalizer = root["normalizer"], normalizer != .null {
            if normalizer.objectValue?["type"]?.stringValue == "Sequence" {
                normalizers = normalizer.objectValue?["normalizers"]?.arrayValue ?? []
            } else {
                normalizers = [normalizer]
            }
        }
        for normalizer in normalizers {
            guard let fields = normalizer.objectValue, fields["type"]?.stringValue == "Precompiled",
                  let encoded = fields["precompiled_charsmap"], encoded != .null else { continue }
            guard let text = encoded.stringValue, let bytes = decodeBase64(text) else {
                throw PEAError.invalidFile(path: path, reason: "normalizer: precompiled_charsmap is not a base64 string")
            }
            return (vocabulary, bytes)
        }
        return (vocabulary, nil)
    }

    // MARK: - Encoding

    /// `<s>`, the text's tokens, `</s>`: `tokenizer(text).input_ids`, no padding or truncation.
    public func encode(_ text: String) -> [Int] {
        var ids = [bosTokenID]
        for segment in addedTokens.split(Array(text.utf8)) {
            switch segment {
            case .token(let id):
                ids.append(id)
            case .text(let bytes):
                let normalized = normalize(String(decoding: bytes, as: UTF8.self))
                for piece in Self.pieces(normalized, addPrefixSpace: addPrefixSpace) { ids += unigram(piece) }
            }
        }
        ids.append(eosTokenID)
        return ids
    }

    /// The Precompiled normalizer (identity when the files have no charsmap).
    func normalize(_ text: String) -> String {
        charsmap?.normalize(text) ?? text
    }

    /// WhitespaceSplit then Metaspace (replacement "▁", split): the UTF-8 pieces the model segments.
    static func pieces(_ normalized: String, addPrefixSpace: Bool) -> [[UInt8]] {
        var pieces: [[UInt8]] = []
        var word: [Unicode.Scalar] = []
        func flush() {
            guard !word.isEmpty else { return }
            var scalars = word.map { $0 == " " ? metaspace : $0 }
            if addPrefixSpace && scalars.first != metaspace { scalars.insert(metaspace, at: 0) }
            // Split with MergedWithNext: a "▁" joins the run after it when one follows, else stands alone.
            var index = 0
            while index < scalars.count {
                var end = index + 1
                if scalars[index] == metaspace {
                    if end < scalars.count && scalars[end] != metaspace {
                        while end < scalars.count && scalars[end] != metaspace { end += 1 }
                    }
                } else {
                    while end < scalars.count && scalars[end] != metaspace { end += 1 }
                }
                var bytes: [UInt8] = []
                for scalar in scalars[index..<end] { bytes += UTF8.encode(scalar)! }
                pieces.append(bytes)
                index = end
            }
            word = []
        }
        for scalar in normalized.unicodeScalars {
            if scalar.properties.isWhitespace { flush() } else { word.append(scalar) }
        }
        flush()
        return pieces
    }

    /// tokenizers' `Unigram::encode_optimized` with `fuse_unk`: the best-scoring segmentation, ties going to the
    /// candidate found first (earlier start, then shorter entry).
    private func unigram(_ bytes: [UInt8]) -> [Int] {
        let size = bytes.count
        guard size > 0 else { return [] }
        var bestScore = [Double](repeating: 0, count: size + 1)
        var startsAt = [Int](repeating: -1, count: size + 1)
        var nodeIDs = [Int](repeating: 0, count: size + 1)
        var start = 0
        while start < size {
            let scoreHere = bestScore[start]
            let scalarLength = Self.utf8Length(bytes[start])
            var hasSingleScalar = false
            var node = 0
            var position = start
            while position < size, let next = pieces.child(node, bytes[position]) {
                node = next
                position += 1
                guard let id = pieces.entry(at: node) else { continue }
                let candidate = scores[id] + scoreHere
                if startsAt[position] < 0 || candidate > bestScore[position] {
                    bestScore[position] = candidate
                    startsAt[position] = start
                    nodeIDs[position] = id
                }
                if position - start == scalarLength { hasSingleScalar = true }
            }
            let end = min(start + scalarLength, size)
            if !hasSingleScalar {
                let candidate = unknownScore + scoreHere
                if startsAt[end] < 0 || candidate > bestScore[end] {
                    bestScore[end] = candidate
                    startsAt[end] = start
                    nodeIDs[end] = unknownTokenID
                }
            }
            start = end
        }
        var ids: [Int] = []
        var unknownRun: [ArraySlice<UInt8>] = []
        func flushUnknown() {
            guard !unknownRun.isEmpty else { return }
            let fused = Array(unknownRun.reversed().joined())
            ids.append(pieces.id(of: fused) ?? unknownTokenID)
            unknownRun = []
        }
        var end = size
        while end > 0 {
            let begin = startsAt[end]
            if nodeIDs[end] == unknownTokenID {
                unknownRun.append(bytes[begin..<end])
            } else {
                flushUnknown()
                ids.append(nodeIDs[end])
            }
            end = begin
        }
        flushUnknown()
        return ids.reversed()
    }

    /// The length of the UTF-8 sequence a leading byte starts.
    @inline(__always)
    static func utf8Length(_ byte: UInt8) -> Int {
        if byte < 0x80 { return 1 }
        if byte >= 0xF0 { return 4 }
        if byte >= 0xE0 { return 3 }
        return 2
    }

    // MARK: - Decoding

    /// The text of `ids` as transformers' `decode` gives it: tokenizers' Metaspace decoder ("▁" becomes a space,
    /// except in the first token, where it is dropped), then transformers' `clean_up_tokenization` when the config
    /// asks for it. Special tokens are kept unless `skipSpecialTokens`; unknown ids are skipped.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        var result = String.UnicodeScalarView()
        var index = 0
        for id in ids {
            guard let token = token(forID: id), !(skipSpecialTokens && specialTokenIDs.contains(id)) else { continue }
            for scalar in token.unicodeScalars {
                if scalar == Self.metaspace {
                    if index == 0 && addPrefixSpace { continue }
                    result.append(" ")
                } else {
                    result.append(scalar)
                }
            }
            index += 1
        }
        let text = String(result)
        return cleanUpTokenizationSpaces ? WordPieceTokenizer.cleanUpTokenization(text) : text
    }

    /// The token string of an id (vocabulary entry or added token), nil when there is none.
    public func token(forID id: Int) -> String? {
        if id >= 0 && id < vocabularyTokens.count { return vocabularyTokens[id] }
        return addedTokensByID[id]
    }

    /// The id of a token string (vocabulary entry, compared byte for byte, or added token), nil when there is none.
    public func id(forToken token: String) -> Int? { pieces.id(of: Array(token.utf8)) ?? addedTokens.id(of: token) }

    /// The score of a vocabulary entry.
    public func score(forID id: Int) -> Double? { id >= 0 && id < scores.count ? scores[id] : nil }
}

// MARK: - SentencePiece's precompiled charsmap

/// SentencePiece's `precompiled_charsmap` (its normalizer, compiled): a little-endian u32 with the trie's size in
/// bytes, the trie (a Darts double array of u32 units over UTF-8 bytes, whose leaves hold offsets), then the
/// replacement strings, each ending in NUL. Read as tokenizers' spm_precompiled crate reads it.
struct PrecompiledCharsmap: Sendable {
    struct FormatError: Error {
        let message: String
    }

    private let units: [UInt32]
    private let replacements: [UInt8]

    init(_ bytes: [UInt8]) throws {
        guard bytes.count >= 4 else { throw FormatError(message: "\(bytes.count) bytes, too short for the trie size") }
        let trieSize = Int(Self.littleEndian(bytes, at: 0))
        let unitCount = trieSize / 4
        guard 4 + unitCount * 4 <= bytes.count else {
            throw FormatError(message: "the trie size \(trieSize) exceeds the \(bytes.count - 4) bytes that follow it")
        }
        guard unitCount > 0 else { throw FormatError(message: "the trie is empty") }
        units = (0..<unitCount).map { Self.littleEndian(bytes, at: 4 + $0 * 4) }
        replacements = Array(bytes[(4 + unitCount * 4)...])
        guard String(validating: replacements, as: UTF8.self) != nil else {
            throw FormatError(message: "the replacement strings are not valid UTF-8")
        }
    }

    private static func littleEndian(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16 | UInt32(bytes[offset + 3]) << 24
    }

    /// The replacement of the shortest prefix of `key` that the trie holds (a NUL byte ends the key), nil when no
    /// prefix has one: spm_precompiled's `transform`, which takes the first `common_prefix_search` result.
    func transform<Key: Collection>(_ key: Key) -> ArraySlice<UInt8>? where Key.Element == UInt8 {
        var position = 0
        var unit = Int(units[0])
        position ^= Self.offset(unit)
        for byte in key {
            if byte == 0 { break }
            position ^= Int(byte)
            guard position < units.count else { return nil }
            unit = Int(units[position])
            if unit & ((1 << 31) | 0xFF) != Int(byte) { return nil }  // the unit's label
            position ^= Self.offset(unit)
            if (unit >> 8) & 1 == 1 {  // has a leaf
                guard position < units.count else { return nil }
                let start = Int(units[position]) & ((1 << 31) - 1)
                guard start < replacements.count else { return replacements[replacements.endIndex...] }
                let end = replacements[start...].firstIndex(of: 0) ?? replacements.endIndex
                return replacements[start..<end]
            }
        }
        return nil
    }

    @inline(__always)
    private static func offset(_ unit: Int) -> Int { (unit >> 10) << ((unit & (1 << 9)) >> 6) }

    /// tokenizers' Precompiled normalizer: each grapheme cluster shorter than 6 bytes replaced as a whole when its
    /// bytes have a replacement, otherwise each of its scalars replaced when it has one.
    func normalize(_ text: String) -> String {
        var output: [UInt8] = []
        output.reserveCapacity(text.utf8.count)
        for character in text {
            let bytes = Array(character.utf8)
            if bytes.count < 6, let replacement = transform(bytes) {
                output += replacement
                continue
            }
            for scalar in character.unicodeScalars {
                let scalarBytes = UTF8.encode(scalar)!
                if let replacement = transform(scalarBytes) {
                    output += replacement
                } else {
                    output += scalarBytes
                }
            }
        }
        return String(decoding: output, as: UTF8.self)
    }
}

// MARK: - sentencepiece.bpe.model

/// The parts of a SentencePiece `ModelProto` that XLM-R's tokenizer needs, read with a minimal protobuf reader:
/// `pieces` (field 1: piece, score, type) and `normalizer_spec.precompiled_charsmap` (field 3, its field 2).
struct SentencePieceModelFile {
    struct Piece {
        var piece: String
        var score: Double
        /// SentencePiece's piece type: 1 normal (the default), 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        var type: Int
    }

    let pieces: [Piece]
    let precompiledCharsmap: [UInt8]?

    init(path: String) throws {
        let bytes = try readWholeFile(path)
        do {
            var reader = ProtobufReader(bytes[...])
            var pieces: [Piece] = []
            var charsmap: [UInt8]? = nil
            while let (field, wireType) = try reader.nextField() {
                switch (field, wireType) {
                case (1, 2):
                    pieces.append(try Self.piece(try reader.lengthDelimited()))
                case (3, 2):
                    var spec = ProtobufReader(try reader.lengthDelimited())
                    while let (specField, specWireType) = try spec.nextField() {
                        if specField == 2 && specWireType == 2 {
                            charsmap = Array(try spec.lengthDelimited())
                        } else {
                            try spec.skip(specWireType)
                        }
                    }
                default:
                    try reader.skip(wireType)
                }
            }
            self.pieces = pieces
            precompiledCharsmap = charsmap
        } catch let error as ProtobufReader.FormatError {
            throw PEAError.invalidFile(path: path, reason: "not a SentencePiece model: \(error.message)")
        }
    }

    private static func piece(_ bytes: ArraySlice<UInt8>) throws -> Piece {
        var reader = ProtobufReader(bytes)
        var piece = Piece(piece: "", score: 0, type: 1)
        while let (field, wireType) = try reader.nextField() {
            switch (field, wireType) {
            case (1, 2):
                let text = try reader.lengthDelimited()
                guard let string = String(validating: text, as: UTF8.self) else {
                    throw ProtobufReader.FormatError(message: "a piece is not valid UTF-8")
                }
                piece.piece = string
            case (2, 5):
                piece.score = Double(Float(bitPattern: try reader.fixed32()))
            case (3, 0):
                piece.type = Int(truncatingIfNeeded: try reader.varint())
            default:
                try reader.skip(wireType)
            }
        }
        return piece
    }
}

/// Protocol Buffers wire format, just enough to walk a message: varints, fixed32/64, length-delimited fields.
struct ProtobufReader {
    struct FormatError: Error {
        let message: String
    }

    private let bytes: ArraySlice<UInt8>
    private var position: Int

    init(_ bytes: ArraySlice<UInt8>) {
        self.bytes = bytes
        position = bytes.startIndex
    }

    /// The next field's number and wire type, nil at the end of the message.
    mutating func nextField() throws -> (Int, Int)? {
        guard position < bytes.endIndex else { return nil }
        let key = try varint()
        let field = Int(truncatingIfNeeded: key >> 3)
        guard field > 0 else { throw error("field number 0") }
        return (field, Int(key & 7))
    }

    mutating func varint() throws -> UInt64 {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard position < bytes.endIndex else { throw error("a varint runs past the end") }
            let byte = bytes[position]
            position += 1
            guard shift < 64 else { throw error("a varint is longer than 10 bytes") }
            value |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return value }
            shift += 7
        }
    }

    mutating func fixed32() throws -> UInt32 {
        guard bytes.endIndex - position >= 4 else { throw error("a fixed32 runs past the end") }
        let value = (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[position + $1]) << (8 * UInt32($1)) }
        position += 4
        return value
    }

    mutating func lengthDelimited() throws -> ArraySlice<UInt8> {
        let length = try varint()
        guard length <= UInt64(bytes.endIndex - position) else { throw error("a field of \(length) bytes runs past the end") }
        let start = position
        position += Int(length)
        return bytes[start..<position]
    }

    mutating func skip(_ wireType: Int) throws {
        switch wireType {
        case 0: _ = try varint()
        case 1:
            guard bytes.endIndex - position >= 8 else { throw error("a fixed64 runs past the end") }
            position += 8
        case 2: _ = try lengthDelimited()
        case 5: _ = try fixed32()
        default: throw error("unsupported wire type \(wireType)")
        }
    }

    private func error(_ message: String) -> FormatError {
        FormatError(message: "\(message) (byte \(position - bytes.startIndex))")
    }
}

/// Standard base64 (RFC 4648, `+` `/`, `=` padding) as Rust's base64 STANDARD engine decodes it; nil when invalid.
func decodeBase64(_ text: String) -> [UInt8]? {
    var values: [UInt8] = []
    values.reserveCapacity(text.utf8.count)
    var padding = 0
    for byte in text.utf8 {
        let value: UInt8
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): value = byte - UInt8(ascii: "A")
        case UInt8(ascii: "a")...UInt8(ascii: "z"): value = byte - UInt8(ascii: "a") + 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): value = byte - UInt8(ascii: "0") + 52
        case UInt8(ascii: "+"): value = 62
        case UInt8(ascii: "/"): value = 63
        case UInt8(ascii: "="):
            padding += 1
            continue
        default: return nil
        }
        guard padding == 0 else { return nil }  // data after padding
        values.append(value)
    }
    guard (values.count + padding) % 4 == 0, padding <= 2, values.count % 4 != 1 else { return nil }
    var output: [UInt8] = []
    output.reserveCapacity(values.count * 3 / 4)
    var index = 0
    while index + 4 <= values.count {
        let group = UInt32(values[index]) << 18 | UInt32(values[index + 1]) << 12 | UInt32(values[index + 2]) << 6 | UInt32(values[index + 3])
        output += [UInt8(group >> 16), UInt8((group >> 8) & 0xFF), UInt8(group & 0xFF)]
        index += 4
    }
    let rest = values.count - index
    if rest == 2 {
        output.append(values[index] << 2 | values[index + 1] >> 4)
    } else if rest == 3 {
        output.append(values[index] << 2 | values[index + 1] >> 4)
        output.append(values[index + 1] << 4 | values[index + 2] >> 2)
    }
    return output
}

extension SentencePieceUnigramTokenizer: FixedLengthTokenizer {
    public var endTokenID: Int { eosTokenID }
    public func truncationText(_ ids: [Int]) -> String { decode(ids) }
}
