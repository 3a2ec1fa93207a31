#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// CLIP's byte-level BPE tokenizer, loaded from a diffusers `tokenizer/` or `tokenizer_2/` folder (`vocab.json`,
/// `merges.txt`, `tokenizer_config.json`, and `special_tokens_map.json` / `added_tokens.json` where present).
///
/// It matches what diffusers gets for `"CLIPTokenizer"` in model_index.json under transformers 5: the
/// tokenizers-backed (Rust) `transformers.CLIPTokenizer` — transformers 5 has no slow CLIP tokenizer. Its steps:
/// 1. Added tokens are split out of the text first (leftmost, then longest match): those declared
///    `normalized: false` on the raw text, the others on each normalized remainder. The special tokens
///    (`<|startoftext|>`, `<|endoftext|>`, and the pad token, which is `!` in SD2's tokenizer and SDXL's
///    `tokenizer_2`) are added tokens, so "hello!" gives a different `!` id with SDXL's `tokenizer_2` (0, the
///    bare `!`) than with `tokenizer` (`!</w>`). Which spellings match depends on each token's `normalized` flag,
///    which transformers derives from the config files in a format-dependent way (`SpecialTokenResolution`).
/// 2. Normalization: NFC, every run of whitespace becomes one space, then each scalar is lower-cased on its own
///    (full mappings, no final-sigma rule). `do_lower_case` is ignored, as transformers 5 ignores it.
/// 3. The CLIP split pattern `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
///    (whitespace dropped), then GPT-2's byte-level split on each piece, which only ever splits a literal
///    `<|startoftext|>`/`<|endoftext|>` that was not taken as an added token into `<|`, the word, `|>`.
/// 4. Each piece's UTF-8 bytes become GPT-2's printable byte characters; BPE merges them by rank, with `</w>`
///    appended to the piece's last symbol.
/// 5. `<|startoftext|>` + ids + `<|endoftext|>`; truncation keeps that frame, padding uses the pad token.
///
/// Unicode classes follow the Oniguruma inside tokenizers 0.23, whose tables are Unicode 16.0: a scalar
/// assigned later counts as neither letter nor number (see `regexUnicodeVersion`). The tests check every scalar's
/// class and lone normalization against the reference (Tests/Fixtures/tokenizers/clip_unicode.json).
public struct CLIPTokenizer: Sendable {
    /// A token matched in the text before BPE, with transformers' flags (`tokenizers.AddedToken`).
    public struct AddedToken: Sendable, Equatable {
        public var content: String
        public var singleWord = false
        public var leftStrip = false
        public var rightStrip = false
        /// Whether the token is matched in the normalized (lower-cased, NFC) text rather than the raw text.
        public var normalized: Bool
        public var special: Bool

        public init(content: String, normalized: Bool? = nil, special: Bool = false) {
            self.content = content
            self.special = special
            self.normalized = normalized ?? !special  // tokenizers' default
        }
    }

    /// The folder the tokenizer was loaded from.
    public let folder: String
    /// `model_max_length` from tokenizer_config.json (77 for CLIP); `Int.max` when the config has none.
    public let modelMaxLength: Int
    public let bosToken: String
    public let eosToken: String
    public let padToken: String
    public let unknownToken: String
    public let bosTokenID: Int
    public let eosTokenID: Int
    public let padTokenID: Int
    public let unknownTokenID: Int
    /// The added tokens (the special tokens among them) with the flags transformers ends up giving them, in the
    /// order it registers them.
    public let addedTokens: [AddedToken]

    private let idsByToken: [String: Int]
    private let tokensByID: [Int: String]
    /// Merge rank and merged token id by the pair of token ids, `left << 32 | right`.
    private let merges: [Int: (rank: Int, merged: Int)]
    /// The token id of each byte as a symbol inside a word, and as the word's last symbol (with `</w>`).
    private let byteSymbolIDs: [Int]
    private let lastByteSymbolIDs: [Int]
    /// Added tokens matched in the raw text, and those (normalized: true) matched after normalization.
    private let rawMatchedTokens: AddedTokenSplitter
    private let normalizedMatchedTokens: AddedTokenSplitter
    private let cache = BPECache()

    /// The Unicode version of the regex engine's tables in tokenizers 0.23 (Oniguruma): scalars assigned after it
    /// are neither `\p{L}` nor `\p{N}` there (Swift's own tables are newer).
    public static let regexUnicodeVersion: Unicode.Version = (major: 16, minor: 0)

    /// The suffix CLIP's vocabulary puts on the last symbol of a word.
    static let endOfWord = "</w>"

    // MARK: - Loading

    /// Loads the tokenizer files of a diffusers `tokenizer/` (or `tokenizer_2/`) folder.
    /// - Throws: `PEAError.invalidFile` naming vocab.json or merges.txt when one is missing or malformed;
    ///   `PEAError.invalidConfig` for a malformed tokenizer_config.json / special_tokens_map.json / added_tokens.json.
    public init(folder: String) throws {
        self.folder = folder
        let vocabPath = folder + "/vocab.json", tokenizerJSONPath = folder + "/tokenizer.json"
        let configPath = folder + "/tokenizer_config.json"
        var config = isRegularFile(configPath) ? try ConfigFile(path: configPath) : ConfigFile(path: configPath, values: [:])
        let vocabulary: [String: Int]
        let mergeList: [(left: Int, right: Int, merged: Int)]
        if !isRegularFile(vocabPath) && isRegularFile(tokenizerJSONPath) {
            // A folder saved by transformers 5 holds only tokenizer.json (the tokenizers library's file): the same
            // vocabulary and merges, and the added tokens with their flags.
            let saved = try Self.readTokenizerJSON(tokenizerJSONPath)
            vocabulary = saved.vocabulary
            mergeList = try Self.resolveMerges(saved.merges, path: tokenizerJSONPath, vocabulary: vocabulary)
            if config.value("added_tokens_decoder") == nil, let decoder = saved.addedTokensDecoder {
                config = ConfigFile(path: config.path, values: config.values.merging(["added_tokens_decoder": decoder]) { $1 })
            }
        } else {
            vocabulary = try Self.readVocabulary(vocabPath)
            mergeList = try Self.readMerges(folder + "/merges.txt", vocabulary: vocabulary)
        }
        modelMaxLength = try config.modelMaxLength()
        let tokens = try SpecialTokenResolution(folder: folder, config: config)

        // tokenizers' AddedVocabulary: a content already registered keeps its id and takes the later token's
        // flags; a new content takes its vocabulary id, else the next id after the vocabulary and the added ids.
        var idsByToken = vocabulary
        var tokensByID: [Int: String] = [:]
        for (token, id) in vocabulary { tokensByID[id] = token }
        var largestAddedID: Int? = nil
        var registered: [AddedToken] = []
        var addedIDs: [String: Int] = [:]
        for token in tokens.addedTokens where !token.content.isEmpty {
            if addedIDs[token.content] != nil {
                registered[registered.firstIndex { $0.content == token.content }!] = token
                continue
            }
            let id: Int
            if let known = vocabulary[token.content] {
                id = known
            } else if let largest = largestAddedID, largest >= vocabulary.count {
                id = largest + 1
            } else {
                id = vocabulary.count
            }
            registered.append(token)
            addedIDs[token.content] = id
            largestAddedID = max(largestAddedID ?? id, id)
            idsByToken[token.content] = id
            tokensByID[id] = token.content
        }
        var raw: [AddedTokenEntry] = []
        var normalized: [AddedTokenEntry] = []
        for token in registered {
            if token.singleWord || token.leftStrip || token.rightStrip {
                throw PEAError.unsupported("\(configPath): added token \"\(token.content)\" uses single_word/lstrip/rstrip, which Pea's CLIP tokenizer does not implement")
            }
            let entry = AddedTokenEntry(content: token.content, id: addedIDs[token.content]!, special: token.special)
            if token.normalized { normalized.append(entry) } else { raw.append(entry) }
        }
        addedTokens = registered
        rawMatchedTokens = AddedTokenSplitter(raw)
        normalizedMatchedTokens = AddedTokenSplitter(normalized)
        self.idsByToken = idsByToken
        self.tokensByID = tokensByID

        func id(of token: String, key: String) throws -> Int {
            guard let id = idsByToken[token] else {
                throw PEAError.invalidConfig(path: configPath, reason: "\(key) \"\(token)\" is neither in vocab.json nor an added token")
            }
            return id
        }
        bosToken = tokens.bos
        eosToken = tokens.eos
        padToken = tokens.pad
        unknownToken = tokens.unknown
        bosTokenID = try id(of: bosToken, key: "bos_token")
        eosTokenID = try id(of: eosToken, key: "eos_token")
        padTokenID = try id(of: padToken, key: "pad_token")
        unknownTokenID = try id(of: unknownToken, key: "unk_token")

        var merges: [Int: (rank: Int, merged: Int)] = [:]
        for (rank, merge) in mergeList.enumerated() {
            merges[Self.pairKey(merge.left, merge.right)] = (rank, merge.merged)  // a repeated pair keeps its last rank
        }
        self.merges = merges
        let byteCharacters = Self.byteCharacters
        byteSymbolIDs = byteCharacters.map { vocabulary[String($0)] ?? -1 }
        lastByteSymbolIDs = byteCharacters.map { vocabulary[String($0) + Self.endOfWord] ?? -1 }
    }

    /// vocab.json: an object from token to id.
    private static func readVocabulary(_ path: String) throws -> [String: Int] {
        let document: JSONValue
        do {
            document = try JSONValue.parse(try readWholeFile(path))
        } catch let error as JSONParseError {
            throw PEAError.invalidFile(path: path, reason: "invalid JSON: \(error)")
        }
        guard case .object(let members) = document else {
            throw PEAError.invalidFile(path: path, reason: "expected an object from token to id, found \(document.kindDescription)")
        }
        var vocabulary: [String: Int] = [:]
        vocabulary.reserveCapacity(members.count)
        for (token, value) in members {
            guard let id = value.intValue, id >= 0 else {
                throw PEAError.invalidFile(path: path, reason: "token \(JSONValue.string(token).serialized()): expected a non-negative integer id, found \(value.kindDescription)")
            }
            vocabulary[token] = id
        }
        return vocabulary
    }

    /// merges.txt as tokenizers reads it: lines (a final newline ends the last line, a `\r` before `\n` is
    /// dropped), those starting with `#version` skipped, every other line exactly two symbols split by one space,
    /// each symbol and their concatenation in the vocabulary. Ranks count the merge lines from 0.
    private static func readMerges(_ path: String, vocabulary: [String: Int]) throws -> [(left: Int, right: Int, merged: Int)] {
        let bytes = try readWholeFile(path)
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw PEAError.invalidFile(path: path, reason: "not valid UTF-8")
        }
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        if lines.last?.isEmpty == true { lines.removeLast() }
        var merges: [(left: Int, right: Int, merged: Int)] = []
        merges.reserveCapacity(lines.count)
        for (index, rawLine) in lines.enumerated() {
            let line = rawLine.hasSuffix("\r") ? rawLine.dropLast() : rawLine[...]
            if line.hasPrefix("#version") { continue }
            let parts = line.split(separator: " ", omittingEmptySubsequences: false)
            guard parts.count == 2 else {
                throw PEAError.invalidFile(path: path, reason: "line \(index + 1): expected two symbols separated by one space, found \"\(line)\"")
            }
            merges.append(try mergeIDs(String(parts[0]), String(parts[1]), vocabulary: vocabulary, path: path,
                                       what: "line \(index + 1)", vocabularyName: "vocab.json"))
        }
        return merges
    }

    /// The ids of a merge's two symbols and of their concatenation, each of which must be in the vocabulary.
    private static func mergeIDs(_ left: String, _ right: String, vocabulary: [String: Int], path: String,
                                 what: String, vocabularyName: String) throws -> (left: Int, right: Int, merged: Int) {
        var ids: [Int] = []
        for symbol in [left, right, left + right] {
            guard let id = vocabulary[symbol] else {
                throw PEAError.invalidFile(path: path, reason: "\(what): \"\(symbol)\" is not in \(vocabularyName)")
            }
            ids.append(id)
        }
        return (ids[0], ids[1], ids[2])
    }

    private static func resolveMerges(_ pairs: [(String, String)], path: String, vocabulary: [String: Int]) throws -> [(left: Int, right: Int, merged: Int)] {
        try pairs.enumerated().map { index, pair in
            try mergeIDs(pair.0, pair.1, vocabulary: vocabulary, path: path, what: "model.merges[\(index)]", vocabularyName: "model.vocab")
        }
    }

    /// tokenizer.json (a BPE model): `model.vocab`, `model.merges` ("a b" strings, or [a, b] pairs since
    /// tokenizers 0.20) and `added_tokens`, returned in tokenizer_config.json's `added_tokens_decoder` shape.
    private static func readTokenizerJSON(_ path: String) throws -> (vocabulary: [String: Int], merges: [(String, String)], addedTokensDecoder: JSONValue?) {
        let document: JSONValue
        do {
            document = try JSONValue.parse(try readWholeFile(path))
        } catch let error as JSONParseError {
            throw PEAError.invalidFile(path: path, reason: "invalid JSON: \(error)")
        }
        guard let model = document.objectValue?["model"]?.objectValue, model["type"]?.stringValue ?? "BPE" == "BPE",
              let vocabObject = model["vocab"]?.objectValue, let mergeValues = model["merges"]?.arrayValue else {
            throw PEAError.invalidFile(path: path, reason: "expected a BPE model with 'vocab' and 'merges'")
        }
        var vocabulary: [String: Int] = [:]
        for (token, value) in vocabObject {
            guard let id = value.intValue, id >= 0 else {
                throw PEAError.invalidFile(path: path, reason: "model.vocab: token \(JSONValue.string(token).serialized()) has no valid id")
            }
            vocabulary[token] = id
        }
        let merges: [(String, String)] = try mergeValues.enumerated().map { index, value in
            if let text = value.stringValue {
                let parts = text.split(separator: " ", omittingEmptySubsequences: false)
                if parts.count == 2 { return (String(parts[0]), String(parts[1])) }
            } else if let pair = value.arrayValue, pair.count == 2, let a = pair[0].stringValue, let b = pair[1].stringValue {
                return (a, b)
            }
            throw PEAError.invalidFile(path: path, reason: "model.merges[\(index)]: expected \"a b\" or [\"a\", \"b\"]")
        }
        var decoder: [String: JSONValue] = [:]
        for entry in document.objectValue?["added_tokens"]?.arrayValue ?? [] {
            guard var fields = entry.objectValue, let id = fields["id"]?.intValue else {
                throw PEAError.invalidFile(path: path, reason: "added_tokens: an entry without an id")
            }
            fields["id"] = nil
            decoder[String(id)] = .object(fields)
        }
        return (vocabulary, merges, decoder.isEmpty ? nil : .object(decoder))
    }

    // MARK: - Encoding

    /// `<|startoftext|>`, the text's tokens, `<|endoftext|>`: `tokenizer(text).input_ids`, no padding or truncation.
    public func encode(_ text: String) -> [Int] {
        var ids = [bosTokenID]
        for segment in rawMatchedTokens.split(Array(text.utf8)) {
            switch segment {
            case .token(let id):
                ids.append(id)
            case .text(let raw):
                let normalizedText = Self.normalize(String(decoding: raw, as: UTF8.self))
                for inner in normalizedMatchedTokens.split(Array(normalizedText.utf8)) {
                    switch inner {
                    case .token(let id): ids.append(id)
                    case .text(let normalized):
                        for word in Self.words(String(decoding: normalized, as: UTF8.self)) {
                            ids.append(contentsOf: bpe(Array(word.utf8)))
                        }
                    }
                }
            }
        }
        ids.append(eosTokenID)
        return ids
    }

    // MARK: - Decoding

    /// The text of `ids` as transformers' `decode` gives it: tokens joined, byte characters turned back into
    /// bytes (invalid UTF-8 becomes U+FFFD), `</w>` into a space, leading and trailing whitespace stripped.
    /// Special tokens are kept; unknown ids are skipped.
    public func decode(_ ids: [Int]) -> String {
        var bytes: [UInt8] = []
        for id in ids {
            guard let token = tokensByID[id] else { continue }
            // tokenizers' ByteLevel decoder: a token with a character outside the byte alphabet keeps its UTF-8.
            var tokenBytes: [UInt8] = []
            var allBytes = true
            for scalar in token.unicodeScalars {
                guard let byte = Self.byteForCharacter[scalar] else { allBytes = false; break }
                tokenBytes.append(byte)
            }
            bytes += allBytes ? tokenBytes : Array(token.utf8)
        }
        let text = String(decoding: bytes, as: UTF8.self)
        // CLIPTokenizer's decode wrapper: `.replace("</w>", " ").strip()`.
        let spaced = Self.replacing(Array(Self.endOfWord.utf8), with: UInt8(ascii: " "), in: Array(text.utf8))
        let scalars = Array(String(decoding: spaced, as: UTF8.self).unicodeScalars)
        guard let first = scalars.firstIndex(where: { !Self.isPythonWhitespace($0) }),
              let last = scalars.lastIndex(where: { !Self.isPythonWhitespace($0) }) else { return "" }
        var view = String.UnicodeScalarView()
        view.append(contentsOf: scalars[first...last])
        return String(view)
    }

    /// The token string of an id (vocabulary or added token), nil when there is none.
    public func token(forID id: Int) -> String? { tokensByID[id] }

    /// The id of a token string (vocabulary or added token), nil when there is none.
    public func id(forToken token: String) -> Int? { idsByToken[token] }


    // MARK: - Normalization and pre-tokenization

    /// NFC, runs of whitespace to one space, each scalar lower-cased (tokenizers' NFC, Replace(`\s+`, " "),
    /// Lowercase, in that order).
    static func normalize(_ text: String) -> String {
        let composed = String(decoding: text._nfcCodeUnits, as: UTF8.self)
        var result = String.UnicodeScalarView()
        var inWhitespace = false
        for scalar in composed.unicodeScalars {
            if scalar.properties.isWhitespace {
                if !inWhitespace { result.append(" ") }
                inWhitespace = true
                continue
            }
            inWhitespace = false
            result.append(contentsOf: scalar.properties.lowercaseMapping.unicodeScalars)
        }
        return String(result)
    }

    /// How the split patterns see a scalar: `\p{L}`, `\p{N}`, `\s`, or anything else.
    enum ScalarClass { case letter, number, whitespace, other }

    static func scalarClass(_ scalar: Unicode.Scalar) -> ScalarClass {
        let properties = scalar.properties
        if properties.isWhitespace { return .whitespace }  // Oniguruma's \s is exactly White_Space
        guard let age = properties.age,
              age.major < regexUnicodeVersion.major
                || (age.major == regexUnicodeVersion.major && age.minor <= regexUnicodeVersion.minor) else {
            return .other
        }
        switch properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return .letter
        case .decimalNumber, .letterNumber, .otherNumber: return .number
        default: return .other
        }
    }

    private static let contractions: [[Unicode.Scalar]] = ["s", "t", "re", "ve", "m", "ll", "d"].map { Array($0.unicodeScalars) }
    private static let specialTokenPatterns: [[Unicode.Scalar]] = ["<|startoftext|>", "<|endoftext|>"].map { Array($0.unicodeScalars) }

    /// The words BPE sees in normalized text: CLIP's split pattern (whitespace removed), then GPT-2's byte-level
    /// split inside each piece.
    static func words(_ normalized: String) -> [String] {
        let scalars = Array(normalized.unicodeScalars)
        var words: [String] = []
        var position = 0
        while position < scalars.count {
            let end = clipPieceEnd(scalars, from: position)
            if end == position {  // whitespace separates pieces and is dropped
                position += 1
                continue
            }
            words += byteLevelPieces(scalars[position..<end])
            position = end
        }
        return words
    }

    /// The end of the CLIP pattern's match at `start`, or `start` when the scalar there is whitespace. The
    /// alternatives are tried in the pattern's order, as a backtracking engine does.
    private static func clipPieceEnd(_ scalars: [Unicode.Scalar], from start: Int) -> Int {
        for pattern in specialTokenPatterns where scalars[start...].starts(with: pattern) {
            return start + pattern.count
        }
        if let end = contractionEnd(scalars[...], from: start) { return end }
        switch scalarClass(scalars[start]) {
        case .whitespace: return start
        case .number: return start + 1  // `[\p{N}]`: one digit at a time
        case .letter: return runEnd(scalars[...], from: start, of: .letter)
        case .other: return runEnd(scalars[...], from: start, of: .other)
        }
    }

    /// GPT-2's pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` over a piece
    /// without whitespace, where it reduces to a contraction or a run of one class.
    private static func byteLevelPieces(_ piece: ArraySlice<Unicode.Scalar>) -> [String] {
        var pieces: [String] = []
        var position = piece.startIndex
        while position < piece.endIndex {
            let end = contractionEnd(piece, from: position) ?? runEnd(piece, from: position, of: scalarClass(piece[position]))
            var view = String.UnicodeScalarView()
            view.append(contentsOf: piece[position..<end])
            pieces.append(String(view))
            position = end
        }
        return pieces
    }

    private static func contractionEnd(_ scalars: ArraySlice<Unicode.Scalar>, from start: Int) -> Int? {
        guard scalars[start] == "'" else { return nil }
        for suffix in contractions where scalars[(start + 1)...].starts(with: suffix) {
            return start + 1 + suffix.count
        }
        return nil
    }

    private static func runEnd(_ scalars: ArraySlice<Unicode.Scalar>, from start: Int, of kind: ScalarClass) -> Int {
        var end = start + 1
        while end < scalars.endIndex && scalarClass(scalars[end]) == kind { end += 1 }
        return end
    }

    // MARK: - BPE

    private static func pairKey(_ left: Int, _ right: Int) -> Int { left << 32 | right }

    /// The ids of one word (its UTF-8 bytes): one symbol per byte, `</w>` on the last, then the lowest-ranked
    /// adjacent pair merged (leftmost first) until no pair has a merge.
    ///
    /// Rescanning every pair after each merge is quadratic in the word's length (a 100 000-byte word took ~40 s),
    /// so the candidate pairs wait in a min-heap ordered by (rank, position) and the symbols form a linked list:
    /// O(n log n), the same merges in the same order (the heap's minimum is the scan's choice; an entry whose
    /// pair has since changed is skipped when it comes up).
    private func bpe(_ word: [UInt8]) -> [Int] {
        if let cached = cache.lookup(word) { return cached }
        let count = word.count
        // Symbol i starts at byte i; merged symbols keep their left part's index, dead ones are skipped.
        var symbols: [Int] = word.indices.map { index in
            let id = index == count - 1 ? lastByteSymbolIDs[Int(word[index])] : byteSymbolIDs[Int(word[index])]
            return id >= 0 ? id : unknownTokenID  // only a vocabulary without every byte lacks one
        }
        var next = Array(1...max(count, 1)), previous = Array(-1..<max(count - 1, 0))
        var alive = [Bool](repeating: true, count: count)
        // Candidates keyed rank × count + position (position < count): the lowest rank, then the leftmost.
        var candidates = MinHeap()
        func pushPair(at position: Int) {
            guard position >= 0, next[position] < count,
                  let merge = merges[Self.pairKey(symbols[position], symbols[next[position]])] else { return }
            candidates.push(merge.rank * count + position)
        }
        for position in 0..<max(count - 1, 0) { pushPair(at: position) }
        while let key = candidates.pop() {
            let rank = key / count, position = key % count
            guard alive[position], next[position] < count,
                  let merge = merges[Self.pairKey(symbols[position], symbols[next[position]])], merge.rank == rank else { continue }
            let right = next[position]
            symbols[position] = merge.merged
            alive[right] = false
            next[position] = next[right]
            if next[right] < count { previous[next[right]] = position }
            pushPair(at: previous[position])
            pushPair(at: position)
        }
        var ids: [Int] = []
        var position = 0
        while position < count { ids.append(symbols[position]); position = next[position] }
        cache.store(word, ids)
        return ids
    }

    // MARK: - Byte alphabet

    /// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100…
    /// in byte order, so every byte is one printable character.
    static let byteCharacters: [Unicode.Scalar] = {
        var characters: [Unicode.Scalar] = []
        var next: UInt32 = 256
        for byte in 0..<256 {
            let printable = (33...126).contains(byte) || (161...172).contains(byte) || (174...255).contains(byte)
            if printable {
                characters.append(Unicode.Scalar(UInt32(byte))!)
            } else {
                characters.append(Unicode.Scalar(next)!)
                next += 1
            }
        }
        return characters
    }()

    static let byteForCharacter: [Unicode.Scalar: UInt8] = {
        var map: [Unicode.Scalar: UInt8] = [:]
        for (byte, character) in byteCharacters.enumerated() { map[character] = UInt8(byte) }
        return map
    }()

    // MARK: - Helpers

    /// Python's `str.isspace`: White_Space plus the separators U+001C…U+001F.
    static func isPythonWhitespace(_ scalar: Unicode.Scalar) -> Bool {
        scalar.properties.isWhitespace || (0x1C...0x1F).contains(scalar.value)
    }

    private static func replacing(_ pattern: [UInt8], with replacement: UInt8, in bytes: [UInt8]) -> [UInt8] {
        var result: [UInt8] = []
        result.reserveCapacity(bytes.count)
        var index = 0
        while index < bytes.count {
            if bytes[index...].starts(with: pattern) {
                result.append(replacement)
                index += pattern.count
            } else {
                result.append(bytes[index])
                index += 1
            }
        }
        return result
    }
}

/// A binary min-heap of Ints (the BPE merge candidates).
private struct MinHeap {
    private var items: [Int] = []

    mutating func push(_ value: Int) {
        items.append(value)
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child] < items[parent] else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> Int? {
        guard let top = items.first else { return nil }
        let last = items.removeLast()
        guard !items.isEmpty else { return top }
        items[0] = last
        var parent = 0
        while true {
            let left = 2 * parent + 1, right = left + 1
            var smallest = parent
            if left < items.count && items[left] < items[smallest] { smallest = left }
            if right < items.count && items[right] < items[smallest] { smallest = right }
            guard smallest != parent else { return top }
            items.swapAt(parent, smallest)
            parent = smallest
        }
    }
}

/// The BPE results of words already seen, shared by copies of a tokenizer; bounded like tokenizers' cache
/// (10 000 words), after which new words are simply not remembered.
private final class BPECache: @unchecked Sendable {
    private let lock = PThreadLock()
    private var entries: [[UInt8]: [Int]] = [:]
    private let capacity = 10_000

    func lookup(_ word: [UInt8]) -> [Int]? { lock.withLock { entries[word] } }

    func store(_ word: [UInt8], _ ids: [Int]) {
        lock.withLock {
            if entries.count < capacity { entries[word] = ids }
        }
    }
}

/// How transformers 5 turns a tokenizer folder's configs into the added tokens of the backend tokenizer and the
/// named special tokens (`PreTrainedTokenizerBase.from_pretrained`, then `TokenizersBackend.__init__`):
/// - With `added_tokens_decoder` in tokenizer_config.json, its entries (by id) are the added tokens, and a named
///   token (`bos_token`, …) with the same content is that entry; special_tokens_map.json and added_tokens.json
///   are not read.
/// - Without it (the legacy format), special_tokens_map.json overrides tokenizer_config.json's named tokens (its
///   objects become special tokens), and added_tokens.json declares added tokens (normalized unless special).
/// - Then every named token (bos, eos, unk, sep, pad, cls, mask order) and every additional special token whose
///   content is not among those entries is appended, unless an identical one was appended already; a plain
///   string becomes a special, non-normalized token. A later token with the same content overrides the flags.
/// Missing named tokens take CLIPTokenizer's defaults (`<|startoftext|>`, `<|endoftext|>` for the others).
private struct SpecialTokenResolution {
    /// A named token as the config gives it: a plain string or a token object.
    private enum Value: Equatable {
        case plain(String)
        case token(CLIPTokenizer.AddedToken)

        var content: String {
            switch self {
            case .plain(let content): return content
            case .token(let token): return token.content
            }
        }
    }

    private static let namedKeys = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
    private static let clipDefaults = ["bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                       "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"]

    var addedTokens: [CLIPTokenizer.AddedToken] = []
    var bos = "", eos = "", pad = "", unknown = ""

    init(folder: String, config: ConfigFile) throws {
        var named: [String: Value] = [:]
        // Token objects read from tokenizer_config.json are still raw dicts when transformers reads
        // added_tokens.json, so their content does not count as special there (see below).
        var namedConfigObjects = Set<String>()
        for key in Self.namedKeys {
            if let value = config.value(key), value != .null {
                named[key] = try Self.value(value, key: key, file: config.path)
                if value.objectValue != nil { namedConfigObjects.insert(key) }
            }
        }
        var extras: [(value: Value, isConfigObject: Bool)] = []
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if case .array(let elements)? = config.value(key) {
                extras = try elements.enumerated().map {
                    (try Self.value($1, key: "\(key)[\($0)]", file: config.path), $1.objectValue != nil)
                }
            }
        }

        var declared: [(id: Int, token: CLIPTokenizer.AddedToken)] = []
        if let decoder = config.value("added_tokens_decoder"), decoder != .null {
            guard case .object(let entries) = decoder else {
                throw PEAError.invalidConfig(path: config.path, reason: "key 'added_tokens_decoder': expected an object, found \(decoder.kindDescription)")
            }
            for (idText, entry) in entries {
                guard let id = Int(idText) else {
                    throw PEAError.invalidConfig(path: config.path, reason: "key 'added_tokens_decoder': \"\(idText)\" is not an id")
                }
                declared.append((id, try Self.token(entry, key: "added_tokens_decoder.\(idText)", file: config.path, special: false)))
            }
        } else {
            let mapPath = folder + "/special_tokens_map.json"
            if isRegularFile(mapPath) {
                let map = try ConfigFile(path: mapPath)
                for (key, value) in map.values {
                    if Self.namedKeys.contains(key) {
                        // Objects here become special tokens (transformers passes special=True).
                        named[key] = value == .null ? nil : (value.objectValue != nil
                            ? .token(try Self.token(value, key: key, file: mapPath, special: true))
                            : try Self.value(value, key: key, file: mapPath))
                        namedConfigObjects.remove(key)
                    } else if key == "additional_special_tokens" || key == "extra_special_tokens", case .array(let elements) = value {
                        for (index, element) in elements.enumerated() {
                            let extra: Value = element.objectValue != nil
                                ? .token(try Self.token(element, key: "\(key)[\(index)]", file: mapPath, special: true))
                                : try Self.value(element, key: "\(key)[\(index)]", file: mapPath)
                            if !extras.contains(where: { $0.value == extra }) { extras.append((extra, false)) }
                        }
                    }
                }
            }
            let addedPath = folder + "/added_tokens.json"
            if isRegularFile(addedPath) {
                let added = try ConfigFile(path: addedPath)
                // transformers' `str(value)` of a raw dict is not its content: only plain strings and the
                // special_tokens_map.json objects make an added_tokens.json entry special (and not normalized).
                let specialContents = Set(named.filter { !namedConfigObjects.contains($0.key) }.map(\.value.content)
                                          + extras.filter { !$0.isConfigObject }.map(\.value.content))
                for (content, _) in added.values {
                    let id = try added.int(content)
                    let isSpecial = specialContents.contains(content)
                    declared.append((id, CLIPTokenizer.AddedToken(content: content, normalized: !isSpecial, special: isSpecial)))
                }
            }
        }
        declared.sort { $0.id < $1.id }

        // A named token whose content was declared is that declared token.
        let declaredByContent = Dictionary(declared.map { ($0.token.content, $0.token) }, uniquingKeysWith: { _, last in last })
        for (key, value) in named {
            if let token = declaredByContent[value.content] { named[key] = .token(token) }
        }
        for (key, content) in Self.clipDefaults where named[key] == nil { named[key] = .plain(content) }

        var toAdd: [Value] = declared.map { .token($0.token) }
        let declaredContents = Set(declared.map(\.token.content))
        for value in Self.namedKeys.compactMap({ named[$0] }) + extras.map(\.value)
        where !declaredContents.contains(value.content) && !toAdd.contains(value) {
            toAdd.append(value)
        }
        let namedContents = Set(named.values.map(\.content))
        addedTokens = toAdd.map { value in
            switch value {
            case .plain(let content):
                return CLIPTokenizer.AddedToken(content: content, special: true)
            case .token(var token):
                if namedContents.contains(token.content) { token.special = true }
                return token
            }
        }
        bos = named["bos_token"]!.content
        eos = named["eos_token"]!.content
        pad = named["pad_token"]!.content
        unknown = named["unk_token"]!.content
    }

    /// A named token: a string, or an AddedToken object (with or without `__type`).
    private static func value(_ json: JSONValue, key: String, file: String) throws -> Value {
        if case .string(let content) = json { return .plain(content) }
        return .token(try token(json, key: key, file: file, special: false))
    }

    /// `AddedToken(**object)`: `special` from the object unless forced, `normalized` defaulting to `!special`.
    private static func token(_ json: JSONValue, key: String, file: String, special forcedSpecial: Bool) throws -> CLIPTokenizer.AddedToken {
        guard case .object(let fields) = json else {
            throw PEAError.invalidConfig(path: file, reason: "key '\(key)': expected a string or a token object, found \(json.kindDescription)")
        }
        let object = ConfigFile(path: file, values: fields)
        func flag(_ name: String) throws -> Bool? {
            do { return try object.optionalBool(name) } catch {
                throw PEAError.invalidConfig(path: file, reason: "key '\(key).\(name)': expected a boolean, found \(fields[name]!.kindDescription)")
            }
        }
        guard let content = fields["content"]?.stringValue else {
            throw PEAError.invalidConfig(path: file, reason: "key '\(key)': a token object needs a string 'content'")
        }
        let special = forcedSpecial ? true : (try flag("special") ?? false)
        var token = CLIPTokenizer.AddedToken(content: content, normalized: try flag("normalized"), special: special)
        token.singleWord = try flag("single_word") ?? false
        token.leftStrip = try flag("lstrip") ?? false
        token.rightStrip = try flag("rstrip") ?? false
        return token
    }
}

extension CLIPTokenizer: FixedLengthTokenizer {
    public var endTokenID: Int { eosTokenID }
    public func truncationText(_ ids: [Int]) -> String { decode(ids) }
}
