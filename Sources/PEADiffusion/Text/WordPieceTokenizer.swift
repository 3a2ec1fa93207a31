#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
// `String._nfd` (the standard library's canonical decomposition, which Foundation itself uses) is SPI: Swift 6.3
// has no public Unicode normalization API on String.
@_spi(_Unicode) import Swift

/// BERT's WordPiece tokenizer, loaded from a folder with `vocab.txt` and optionally `tokenizer_config.json`
/// (`do_lower_case`, `strip_accents`, `tokenize_chinese_chars`, `model_max_length`, `clean_up_tokenization_spaces`,
/// the special tokens, `added_tokens_decoder`) and `special_tokens_map.json`: Chinese-CLIP's text tokenizer (cn_clip
/// and the hub's `OFA-Sys/chinese-clip-*` folders use the RoBERTa-wwm-ext vocabulary, lower-cased; cn_clip pads and
/// truncates to 52 tokens).
///
/// It matches what transformers 5 gives for `BertTokenizer.from_pretrained(folder)` (the class Chinese-CLIP users
/// load, directly or through `ChineseCLIPProcessor`): the tokenizers-backed (Rust) tokenizer — transformers 5 has no
/// slow BERT tokenizer. Its steps:
/// 1. The special tokens (`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`, and any other added token) are split out of
///    the raw text first, leftmost then longest match, case-sensitive: "[MASK]" is the mask id, "[mask]" is text.
/// 2. BertNormalizer: control characters (Cc, Cf, Co; not tab, newline, carriage return), U+0000 and U+FFFD are
///    removed and every White_Space scalar becomes a space; each CJK ideograph gets a space on both sides (tokenizers'
///    ranges, which start the extension-C/D block at U+2B920 where BERT's own code says U+2B820); with
///    `strip_accents` (default: `do_lower_case`) the text is decomposed (NFD) and nonspacing marks (Mn) dropped —
///    which also turns Hangul syllables into conjoining jamo, and CJK compatibility ideographs into unified ones;
///    with `do_lower_case` each scalar is lower-cased alone (full mappings, no final-sigma rule: "Σ" is always "σ").
/// 3. BertPreTokenizer: split on whitespace (dropped) and around every punctuation scalar (ASCII `!`…`/`, `:`…`@`,
///    `[`…`` ` ``, `{`…`~`, and the Unicode P* categories).
/// 4. WordPiece on each word: longest vocabulary entry first, `##` before the entries that continue a word; a word
///    longer than 100 scalars, or with a part no entry matches, is `[UNK]` as a whole.
/// 5. `[CLS]` + ids + `[SEP]`; truncation keeps that frame, padding uses the pad token (`[PAD]`, id 0).
///
/// Unicode tables: the categories behind steps 2–3 (Cc/Cf/Co, Mn, P*) come from the unicode_categories crate inside
/// tokenizers, which is Unicode 8.0 — a scalar assigned later is none of them (a newer emoji is kept as a letter
/// would be, a newer punctuation mark is not split off); its NFD is Unicode 12.1 (a later scalar is not decomposed);
/// lower-casing follows Rust's standard library (Unicode 17.0). The tests check every scalar's class and
/// normalizations against the reference (wordpiece_unicode.json).
///
/// cn_clip's own `FullTokenizer` (its `bert_tokenizer.py`, the original BERT code) differs from this on rare inputs:
/// it uses Python's categories (Unicode of the running Python) and keeps private-use scalars (Co), counts
/// U+2B820…U+2B91F as CJK, lower-cases with Python's `lower()` (final sigma "ς"), allows 200 scalars per word, and
/// reads "[MASK]"/"[CLS]"… in the text as plain text.
public struct WordPieceTokenizer: Sendable {
    /// The folder the tokenizer was loaded from.
    public let folder: String
    /// `model_max_length` from tokenizer_config.json; `Int.max` when the config has none (or transformers' 1e30).
    public let modelMaxLength: Int
    public let doLowerCase: Bool
    /// Whether accents are stripped: `strip_accents`, or `do_lower_case` when that is null or missing.
    public let stripAccents: Bool
    public let tokenizeChineseChars: Bool
    /// tokenizers' WordPiece limit: a longer word is one `[UNK]`.
    public let maxInputCharsPerWord = 100
    /// transformers' `clean_up_tokenization_spaces` (applied by `decode`), false when the config does not say.
    public let cleanUpTokenizationSpaces: Bool

    public let clsToken: String
    public let sepToken: String
    public let padToken: String
    public let unknownToken: String
    public let maskToken: String
    public let clsTokenID: Int
    public let sepTokenID: Int
    public let padTokenID: Int
    public let unknownTokenID: Int
    public let maskTokenID: Int
    /// The number of entries in vocab.txt (its lines).
    public let vocabularySize: Int

    /// The vocabulary: entries starting a word, and the entries after `##` that continue one.
    private let vocabulary: PieceTrie
    private let continuations: PieceTrie
    private let tokensByID: [Int: String]
    private let addedTokens: AddedTokenSplitter
    private let specialTokenIDs: Set<Int>

    static let continuationPrefix = "##"

    // MARK: - Loading

    /// Loads `vocab.txt` and the optional config files of a BERT tokenizer folder.
    /// - Throws: `PEAError.invalidFile` naming vocab.txt when it is missing, not UTF-8, or lacks the unknown token;
    ///   `PEAError.invalidConfig` naming tokenizer_config.json or special_tokens_map.json when one is malformed;
    ///   `PEAError.unsupported` for added tokens Pea does not implement (single-word, or normalized non-special ones).
    public init(folder: String) throws {
        self.folder = folder
        let vocabPath = folder + "/vocab.txt"
        let entries = try Self.readVocabulary(vocabPath)
        vocabularySize = entries.count

        let config = try TokenizerFolderConfig(folder: folder, defaults: [
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
        ])
        modelMaxLength = config.modelMaxLength
        doLowerCase = try config.file.optionalBool("do_lower_case") ?? true
        stripAccents = try config.file.optionalBool("strip_accents") ?? doLowerCase
        tokenizeChineseChars = try config.file.optionalBool("tokenize_chinese_chars") ?? true
        cleanUpTokenizationSpaces = try config.file.optionalBool("clean_up_tokenization_spaces") ?? false

        // tokenizers' WordPiece vocabulary is a map: a repeated entry keeps its last line.
        var vocabulary = PieceTrie()
        var continuations = PieceTrie()
        var tokensByID: [Int: String] = [:]
        let prefix = Array(Self.continuationPrefix.utf8)
        for (id, entry) in entries.enumerated() {
            let bytes = Array(entry.utf8)
            vocabulary.insert(bytes, id: id)
            if bytes.starts(with: prefix) { continuations.insert(Array(bytes.dropFirst(prefix.count)), id: id) }
            tokensByID[id] = entry
        }
        self.vocabulary = vocabulary
        self.continuations = continuations

        let added = try config.resolveAddedTokens(vocabularySize: entries.count) { vocabulary.id(of: Array($0.utf8)) }
        for token in added where tokensByID[token.id] == nil { tokensByID[token.id] = token.content }
        self.tokensByID = tokensByID
        addedTokens = AddedTokenSplitter(added)
        specialTokenIDs = Set(added.filter(\.special).map(\.id))

        let named = config.namedTokens
        clsToken = named["cls_token"]!
        sepToken = named["sep_token"]!
        padToken = named["pad_token"]!
        unknownToken = named["unk_token"]!
        maskToken = named["mask_token"]!
        func id(_ token: String) -> Int { added.first { $0.content.utf8.elementsEqual(token.utf8) }!.id }
        clsTokenID = id(clsToken)
        sepTokenID = id(sepToken)
        padTokenID = id(padToken)
        maskTokenID = id(maskToken)
        // The model's own unknown id: WordPiece looks the unknown token up in the vocabulary.
        guard let unknownID = vocabulary.id(of: Array(unknownToken.utf8)) else {
            throw PEAError.invalidFile(path: vocabPath, reason: "the unknown token \"\(unknownToken)\" is not in the vocabulary")
        }
        unknownTokenID = unknownID
    }

    /// vocab.txt as tokenizers reads it: one entry per line (`\n`, or `\r\n`; a final newline ends the last line),
    /// trailing whitespace trimmed, the line number is the id. Must be UTF-8.
    private static func readVocabulary(_ path: String) throws -> [String] {
        let bytes = try readWholeFile(path)
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw PEAError.invalidFile(path: path, reason: "not valid UTF-8")
        }
        var lines = text.utf8.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
        if lines.last?.isEmpty == true { lines.removeLast() }
        guard !lines.isEmpty else { throw PEAError.invalidFile(path: path, reason: "the vocabulary is empty") }
        return lines.map { line in
            var scalars = Array(String(Substring(line)).unicodeScalars)
            while let last = scalars.last, last.properties.isWhitespace { scalars.removeLast() }
            var view = String.UnicodeScalarView()
            view.append(contentsOf: scalars)
            return String(view)
        }
    }

    // MARK: - Encoding

    /// `[CLS]`, the text's tokens, `[SEP]`: `tokenizer(text).input_ids`, no padding or truncation.
    public func encode(_ text: String) -> [Int] {
        var ids = [clsTokenID]
        for segment in addedTokens.split(Array(text.utf8)) {
            switch segment {
            case .token(let id):
                ids.append(id)
            case .text(let bytes):
                let normalized = normalize(String(decoding: bytes, as: UTF8.self))
                for word in Self.words(normalized) { ids += wordPiece(word) }
            }
        }
        ids.append(sepTokenID)
        return ids
    }

    /// Greedy longest-match-first WordPiece over one word (normalized scalars, no whitespace or punctuation inside).
    private func wordPiece(_ word: [Unicode.Scalar]) -> [Int] {
        if word.count > maxInputCharsPerWord { return [unknownTokenID] }
        var bytes: [UInt8] = []
        var boundaries: [Bool] = []  // whether a scalar starts at each byte offset (and at the end)
        for scalar in word {
            let start = bytes.count
            bytes += UTF8.encode(scalar)!
            boundaries += [Bool](repeating: false, count: bytes.count - start)
            boundaries[start] = true
        }
        boundaries.append(true)
        var ids: [Int] = []
        var start = 0
        while start < bytes.count {
            let trie = start == 0 ? vocabulary : continuations
            guard let match = trie.longestMatch(bytes, from: start, where: { boundaries[$0] }) else {
                return [unknownTokenID]
            }
            ids.append(match.id)
            start = match.end
        }
        return ids
    }

    // MARK: - Normalization and pre-tokenization

    /// tokenizers' BertNormalizer with this tokenizer's settings (clean text, CJK spacing, accents, lower case).
    func normalize(_ text: String) -> [Unicode.Scalar] {
        var cleaned = String.UnicodeScalarView()
        for scalar in text.unicodeScalars {
            if scalar.value == 0 || scalar.value == 0xFFFD || Self.isControl(scalar) { continue }
            if Self.isWhitespace(scalar) {
                cleaned.append(" ")
            } else if tokenizeChineseChars && Self.isChineseCharacter(scalar) {
                cleaned.append(contentsOf: [" ", scalar, " "])
            } else {
                cleaned.append(scalar)
            }
        }
        var scalars: [Unicode.Scalar]
        if stripAccents {
            scalars = Self.decomposed(cleaned).filter { !Self.isNonspacingMark($0) }
        } else {
            scalars = Array(cleaned)
        }
        if doLowerCase {
            scalars = scalars.flatMap(Self.lowercased)
        }
        return scalars
    }

    /// BertPreTokenizer: whitespace separates words and is dropped; each punctuation scalar is a word of its own.
    static func words(_ scalars: [Unicode.Scalar]) -> [[Unicode.Scalar]] {
        var words: [[Unicode.Scalar]] = []
        var current: [Unicode.Scalar] = []
        for scalar in scalars {
            if scalar.properties.isWhitespace {
                if !current.isEmpty { words.append(current); current = [] }
            } else if isPunctuation(scalar) {
                if !current.isEmpty { words.append(current); current = [] }
                words.append([scalar])
            } else {
                current.append(scalar)
            }
        }
        if !current.isEmpty { words.append(current) }
        return words
    }

    // MARK: - Decoding

    /// The text of `ids` as transformers' `decode` gives it: tokenizers' WordPiece decoder (tokens joined by spaces,
    /// `##` entries glued to the previous one, each token's " ." " ," " !" " ?"… cleaned up), then transformers'
    /// `clean_up_tokenization` when the config asks for it. Special tokens are kept unless `skipSpecialTokens`;
    /// unknown ids are skipped.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        var text = ""
        var index = 0
        for id in ids {
            guard let token = tokensByID[id], !(skipSpecialTokens && specialTokenIDs.contains(id)) else { continue }
            var piece = token
            if index > 0 {
                if token.utf8.starts(with: Self.continuationPrefix.utf8) {
                    piece = String(token.unicodeScalars.dropFirst(Self.continuationPrefix.unicodeScalars.count))
                } else {
                    piece = " " + token
                }
            }
            text += Self.wordPieceCleanup(piece)
            index += 1
        }
        return cleanUpTokenizationSpaces ? Self.cleanUpTokenization(text) : text
    }

    /// The token string of an id (vocabulary or added token), nil when there is none.
    public func token(forID id: Int) -> String? { tokensByID[id] }

    /// The id of a token string (vocabulary entry, compared byte for byte), nil when there is none.
    public func id(forToken token: String) -> Int? { vocabulary.id(of: Array(token.utf8)) ?? addedTokens.id(of: token) }

    /// tokenizers' WordPiece decoder `cleanup`, applied to each token (with its leading space).
    static func wordPieceCleanup(_ text: String) -> String {
        replacingAll(in: text, [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")])
    }

    /// transformers' `clean_up_tokenization`.
    static func cleanUpTokenization(_ text: String) -> String {
        replacingAll(in: text, [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")])
    }

    /// Python's/Rust's `str.replace` for each pair in turn: non-overlapping, left to right, on UTF-8 bytes.
    static func replacingAll(in text: String, _ replacements: [(String, String)]) -> String {
        var bytes = Array(text.utf8)
        for (old, new) in replacements {
            let pattern = Array(old.utf8)
            let replacement = Array(new.utf8)
            guard bytes.count >= pattern.count else { continue }
            var result: [UInt8] = []
            result.reserveCapacity(bytes.count)
            var index = 0
            while index < bytes.count {
                if bytes[index] == pattern[0], bytes[index...].starts(with: pattern) {
                    result += replacement
                    index += pattern.count
                } else {
                    result.append(bytes[index])
                    index += 1
                }
            }
            bytes = result
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: - Unicode classes, as tokenizers sees them

    /// The Unicode version of the unicode_categories tables in tokenizers 0.23 (Cc/Cf/Co, Mn, P*).
    public static let categoryUnicodeVersion: Unicode.Version = (major: 8, minor: 0)
    /// The Unicode version of Rust's `char::to_lowercase` in the tokenizers 0.23 wheels.
    public static let lowercaseUnicodeVersion: Unicode.Version = (major: 17, minor: 0)
    /// The Unicode version of the unicode-normalization-alignments crate's decompositions in tokenizers 0.23.
    public static let decompositionUnicodeVersion: Unicode.Version = (major: 12, minor: 1)

    /// Canonical decomposition (NFD) as of `decompositionUnicodeVersion`: a scalar assigned later is neither
    /// decomposed nor reordered (that crate sees it as a starter), so the text is decomposed between such scalars.
    static func decomposed<Scalars: Sequence>(_ scalars: Scalars) -> [Unicode.Scalar] where Scalars.Element == Unicode.Scalar {
        var result: [Unicode.Scalar] = []
        var chunk = String.UnicodeScalarView()
        for scalar in scalars {
            if scalar.properties.age != nil && !isAssigned(scalar, by: decompositionUnicodeVersion) {
                result += nfd(chunk)
                chunk = String.UnicodeScalarView()
                result.append(scalar)
            } else {
                chunk.append(scalar)
            }
        }
        result += nfd(chunk)
        return result
    }

    private static func nfd(_ scalars: String.UnicodeScalarView) -> [Unicode.Scalar] {
        guard #available(macOS 13.0, iOS 16.0, watchOS 9.0, tvOS 16.0, *) else {
            fatalError("accent stripping needs the standard library's NFD (macOS 13 or later)")
        }
        return Array(String(scalars)._nfd)
    }

    /// Scalars assigned by Unicode 8.0 whose general category changed since, in a way that matters here: their
    /// Unicode 8.0 category (from that version's UnicodeData.txt).
    static let unicode8Categories: [UInt32: Unicode.GeneralCategory] = [
        0x166D: .otherPunctuation,  // CANADIAN SYLLABICS CHI SIGN: So since Unicode 12
        0x111C9: .otherPunctuation,  // SHARADA SANDHI MARK: Mn since Unicode 11
        0x1734: .nonspacingMark,  // HANUNOO SIGN PAMUDPOD: Mc since Unicode 14
        0x1885: .otherLetter,  // MONGOLIAN LETTER ALI GALI BALUDA: Mn since Unicode 9
        0x1886: .otherLetter,  // MONGOLIAN LETTER ALI GALI THREE BALUDA: Mn since Unicode 9
        0xA9BD: .spacingMark,  // JAVANESE CONSONANT SIGN KERET: Mn since Unicode 12
        0x1171E: .nonspacingMark,  // AHOM CONSONANT SIGN MEDIAL RA: Mc since Unicode 14
    ]

    static func isAssigned(_ scalar: Unicode.Scalar, by version: Unicode.Version) -> Bool {
        guard let age = scalar.properties.age else { return false }
        return age.major < version.major || (age.major == version.major && age.minor <= version.minor)
    }

    /// The scalar's general category in the unicode_categories tables (nil: not in any of them).
    static func tableCategory(_ scalar: Unicode.Scalar) -> Unicode.GeneralCategory? {
        if let category = unicode8Categories[scalar.value] { return category }
        guard isAssigned(scalar, by: categoryUnicodeVersion) else { return nil }
        return scalar.properties.generalCategory
    }

    /// BertNormalizer's `is_control`: Cc, Cf, Co (Unicode 8.0), except tab, newline and carriage return.
    static func isControl(_ scalar: Unicode.Scalar) -> Bool {
        if scalar == "\t" || scalar == "\n" || scalar == "\r" { return false }
        switch tableCategory(scalar) {
        case .control?, .format?, .privateUse?: return true
        default: return false
        }
    }

    /// BertNormalizer's `is_whitespace`: Rust's `char::is_whitespace` (the White_Space property).
    static func isWhitespace(_ scalar: Unicode.Scalar) -> Bool { scalar.properties.isWhitespace }

    static func isNonspacingMark(_ scalar: Unicode.Scalar) -> Bool { tableCategory(scalar) == .nonspacingMark }

    /// BertPreTokenizer's `is_bert_punc`: ASCII punctuation, or a P* category (Unicode 8.0).
    static func isPunctuation(_ scalar: Unicode.Scalar) -> Bool {
        if scalar.isASCII {
            let value = scalar.value
            return (0x21...0x2F).contains(value) || (0x3A...0x40).contains(value)
                || (0x5B...0x60).contains(value) || (0x7B...0x7E).contains(value)
        }
        switch tableCategory(scalar) {
        case .connectorPunctuation?, .dashPunctuation?, .openPunctuation?, .closePunctuation?,
             .initialPunctuation?, .finalPunctuation?, .otherPunctuation?:
            return true
        default:
            return false
        }
    }

    /// tokenizers' `is_chinese_char` (note U+2B920, not BERT's U+2B820).
    static func isChineseCharacter(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x4E00...0x9FFF, 0x3400...0x4DBF, 0x20000...0x2A6DF, 0x2A700...0x2B73F, 0x2B740...0x2B81F,
             0x2B920...0x2CEAF, 0xF900...0xFAFF, 0x2F800...0x2FA1F:
            return true
        default:
            return false
        }
    }

    /// Rust's `char::to_lowercase` (full mapping, no context), as of `lowercaseUnicodeVersion`.
    static func lowercased(_ scalar: Unicode.Scalar) -> [Unicode.Scalar] {
        if scalar.isASCII {
            return [(0x41...0x5A).contains(scalar.value) ? Unicode.Scalar(scalar.value + 0x20)! : scalar]
        }
        guard isAssigned(scalar, by: lowercaseUnicodeVersion) else { return [scalar] }
        return Array(scalar.properties.lowercaseMapping.unicodeScalars)
    }
}

// MARK: - Shared by the WordPiece and SentencePiece tokenizers

/// A byte trie over vocabulary entries: exact lookup and prefix walks, comparing UTF-8 bytes (as Rust's maps do:
/// canonically equivalent spellings are different entries, unlike Swift's `String` equality).
struct PieceTrie: Sendable {
    /// Child node by `node << 8 | byte`.
    private var children: [Int: Int32] = [:]
    /// The entry id ending at each node, -1 for none.
    private(set) var ids: [Int32] = [-1]

    /// Adds an entry; a repeated entry takes the later id.
    mutating func insert(_ bytes: [UInt8], id: Int) {
        var node = 0
        for byte in bytes {
            let key = node << 8 | Int(byte)
            if let child = children[key] {
                node = Int(child)
            } else {
                let child = ids.count
                children[key] = Int32(child)
                ids.append(-1)
                node = child
            }
        }
        ids[node] = Int32(id)
    }

    func id(of bytes: [UInt8]) -> Int? {
        var node = 0
        for byte in bytes {
            guard let child = children[node << 8 | Int(byte)] else { return nil }
            node = Int(child)
        }
        return ids[node] >= 0 ? Int(ids[node]) : nil
    }

    /// The child of `node` by `byte`, nil when there is none (node 0 is the root).
    @inline(__always)
    func child(_ node: Int, _ byte: UInt8) -> Int? {
        children[node << 8 | Int(byte)].map(Int.init)
    }

    @inline(__always)
    func entry(at node: Int) -> Int? { ids[node] >= 0 ? Int(ids[node]) : nil }

    /// The longest entry that `bytes[start...]` begins with and that ends where `isBoundary` allows.
    func longestMatch(_ bytes: [UInt8], from start: Int, where isBoundary: (Int) -> Bool) -> (id: Int, end: Int)? {
        var node = 0
        var best: (id: Int, end: Int)? = nil
        var position = start
        while position < bytes.count, let next = child(node, bytes[position]) {
            node = next
            position += 1
            if let id = entry(at: node), isBoundary(position) { best = (id, position) }
        }
        return best
    }
}

/// tokenizer_config.json (and, in the legacy layout, special_tokens_map.json) as transformers 5 reads them for the
/// WordPiece and SentencePiece tokenizers: the named special tokens, the added tokens, `model_max_length`.
///
/// - The named tokens (`unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`, `bos_token`, `eos_token`)
///   are strings or AddedToken objects; special_tokens_map.json overrides them unless tokenizer_config.json has
///   `added_tokens_decoder`; missing ones take the class's defaults.
/// - The added tokens are the `added_tokens_decoder` entries (by id), then the named tokens, then
///   `additional_special_tokens`/`extra_special_tokens`. Each takes its vocabulary id, or the next id after the
///   vocabulary when it has none. All are matched in the raw text: transformers 5 registers special tokens as not
///   normalized. `lstrip`/`rstrip` are ignored: both pre-tokenizers drop the whitespace they would strip, so they
///   cannot change an id.
struct TokenizerFolderConfig {
    let file: ConfigFile
    let modelMaxLength: Int
    /// The named special tokens' contents, by key.
    let namedTokens: [String: String]
    private let declared: [(token: AddedTokenEntry, normalized: Bool, singleWord: Bool)]
    private let extras: [String]

    static let namedKeys = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]

    init(folder: String, defaults: [String: String]) throws {
        let configPath = folder + "/tokenizer_config.json"
        file = isRegularFile(configPath) ? try ConfigFile(path: configPath) : ConfigFile(path: configPath, values: [:])
        modelMaxLength = try file.modelMaxLength()

        var named = defaults
        for key in Self.namedKeys {
            if let value = file.value(key), value != .null { named[key] = try Self.content(value, key: key, file: file.path) }
        }
        var declared: [(id: Int, token: AddedTokenEntry, normalized: Bool, singleWord: Bool)] = []
        var extras: [String] = []
        if let decoder = file.value("added_tokens_decoder"), decoder != .null {
            guard case .object(let entries) = decoder else {
                throw PEAError.invalidConfig(path: file.path, reason: "key 'added_tokens_decoder': expected an object, found \(decoder.kindDescription)")
            }
            for (idText, entry) in entries {
                guard let id = Int(idText) else {
                    throw PEAError.invalidConfig(path: file.path, reason: "key 'added_tokens_decoder': \"\(idText)\" is not an id")
                }
                guard case .object(let fields) = entry else {
                    throw PEAError.invalidConfig(path: file.path, reason: "key 'added_tokens_decoder.\(idText)': expected a token object, found \(entry.kindDescription)")
                }
                let object = ConfigFile(path: file.path, values: fields)
                guard let content = fields["content"]?.stringValue else {
                    throw PEAError.invalidConfig(path: file.path, reason: "key 'added_tokens_decoder.\(idText)': a token object needs a string 'content'")
                }
                let special = try object.optionalBool("special") ?? false
                declared.append((id, AddedTokenEntry(content: content, id: -1, special: special),
                                 try object.optionalBool("normalized") ?? !special, try object.optionalBool("single_word") ?? false))
            }
        } else {
            let mapPath = folder + "/special_tokens_map.json"
            if isRegularFile(mapPath) {
                let map = try ConfigFile(path: mapPath)
                for key in Self.namedKeys {
                    if let value = map.value(key), value != .null { named[key] = try Self.content(value, key: key, file: mapPath) }
                }
                extras += try Self.contents(map, keys: ["additional_special_tokens"])
            }
        }
        extras = try Self.contents(file, keys: ["additional_special_tokens", "extra_special_tokens"]) + extras
        declared.sort { $0.id < $1.id }
        self.declared = declared.map { ($0.token, $0.normalized, $0.singleWord) }
        self.extras = extras
        namedTokens = named
    }

    /// The added tokens with their ids: `vocabularyID` looks a content up in the model's vocabulary; `extras` are
    /// more special tokens, added last (a SentencePiece model's control and user-defined pieces).
    func resolveAddedTokens(vocabularySize: Int, extras moreExtras: [String] = [],
                            vocabularyID: (String) -> Int?) throws -> [AddedTokenEntry] {
        var resolved: [AddedTokenEntry] = []
        var nextID = vocabularySize
        func add(_ content: String, special: Bool) {
            guard !content.isEmpty else { return }
            if let index = resolved.firstIndex(where: { $0.content == content && $0.content.utf8.elementsEqual(content.utf8) }) {
                resolved[index].special = resolved[index].special || special
                return
            }
            let id: Int
            if let known = vocabularyID(content) {
                id = known
            } else {
                id = nextID
                nextID += 1
            }
            resolved.append(AddedTokenEntry(content: content, id: id, special: special))
        }
        let namedContents = Set(namedTokens.values.map { Array($0.utf8) })
        for entry in declared {
            let special = entry.token.special || namedContents.contains(Array(entry.token.content.utf8))
            if entry.singleWord {
                throw PEAError.unsupported("\(file.path): added token \"\(entry.token.content)\" is single_word, which Pea's tokenizers do not implement")
            }
            if entry.normalized && !special {
                throw PEAError.unsupported("\(file.path): added token \"\(entry.token.content)\" is matched in normalized text, which Pea's tokenizers do not implement")
            }
            add(entry.token.content, special: special)
        }
        for key in Self.namedKeys { if let content = namedTokens[key] { add(content, special: true) } }
        for content in extras + moreExtras { add(content, special: true) }
        return resolved
    }

    /// A token given as a string or an AddedToken object.
    private static func content(_ value: JSONValue, key: String, file: String) throws -> String {
        if case .string(let content) = value { return content }
        if case .object(let fields) = value, let content = fields["content"]?.stringValue { return content }
        throw PEAError.invalidConfig(path: file, reason: "key '\(key)': expected a string or a token object with a string 'content', found \(value.kindDescription)")
    }

    private static func contents(_ config: ConfigFile, keys: [String]) throws -> [String] {
        var contents: [String] = []
        for key in keys {
            guard let value = config.value(key), value != .null else { continue }
            guard case .array(let elements) = value else {
                // transformers 5 also writes `extra_special_tokens` as an object of named extras.
                if case .object(let members) = value {
                    contents += try members.keys.sorted().map { try content(members[$0]!, key: "\(key).\($0)", file: config.path) }
                    continue
                }
                throw PEAError.invalidConfig(path: config.path, reason: "key '\(key)': expected a list, found \(value.kindDescription)")
            }
            contents += try elements.enumerated().map { try content($1, key: "\(key)[\($0)]", file: config.path) }
        }
        return contents
    }
}

extension WordPieceTokenizer: FixedLengthTokenizer {
    public var endTokenID: Int { sepTokenID }
    public func truncationText(_ ids: [Int]) -> String { decode(ids) }
}
