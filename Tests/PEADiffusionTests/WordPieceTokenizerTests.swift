import XCTest
@testable import PEADiffusion

/// The WordPiece tokenizer against transformers 5's `BertTokenizer` on cn_clip's real vocab.txt, with the folders and
/// cases of tools/reference/make_multilingual_tokenizer_fixtures.py.
final class WordPieceTokenizerTests: XCTestCase {
    /// What transformers returned for one text and one tokenizer folder.
    struct Reference {
        let ids: [Int]
        let inputIDs: [Int]
        let attentionMask: [Int]
        let decoded: String
        let decodedSkippingSpecialTokens: String
        let truncatedText: String?
    }

    struct Case {
        let text: String
        let results: [String: Reference]
    }

    struct Fixture {
        let maxLength: Int
        let vocabularySize: Int
        let padTokenID: Int
        let cases: [Case]
    }

    static let directory = fixturesDirectory() + "/tokenizers"
    static let variantNames = ["cased", "cased_strip_accents", "keep_accents", "no_chinese_split"]

    static func loadFixture() throws -> Fixture {
        let document = try JSONValue.parse(try XCTUnwrap(readFileBytes(directory + "/wordpiece_cases.json")))
        let root = try XCTUnwrap(document.objectValue)
        let cases = try XCTUnwrap(root["cases"]?.arrayValue).map { entry -> Case in
            let object = try XCTUnwrap(entry.objectValue)
            let results = try XCTUnwrap(object["results"]?.objectValue).mapValues { try reference($0) }
            return Case(text: try XCTUnwrap(object["text"]?.stringValue), results: results)
        }
        return Fixture(maxLength: try XCTUnwrap(root["max_length"]?.intValue),
                       vocabularySize: try XCTUnwrap(root["vocab_size"]?.intValue),
                       padTokenID: try XCTUnwrap(root["pad_token_id"]?.intValue), cases: cases)
    }

    static func reference(_ value: JSONValue) throws -> Reference {
        let result = try XCTUnwrap(value.objectValue)
        func ints(_ key: String) throws -> [Int] { try XCTUnwrap(result[key]?.arrayValue).map { try XCTUnwrap($0.intValue) } }
        return Reference(ids: try ints("ids"), inputIDs: try ints("input_ids"), attentionMask: try ints("attention_mask"),
                         decoded: try XCTUnwrap(result["decoded"]?.stringValue),
                         decodedSkippingSpecialTokens: try XCTUnwrap(result["decoded_skip"]?.stringValue),
                         truncatedText: result["truncated_text"]?.stringValue)
    }

    func folder(_ name: String) -> String { Self.directory + "/" + name }

    /// A scratch folder with cn_clip's vocab.txt and the given files (name → contents or a fixture path to copy).
    func assembledFolder(_ scratch: ScratchDirectory, _ name: String, copying files: [String: String] = [:],
                         writing contents: [String: String] = [:]) throws -> String {
        let target = scratch.file(name)
        XCTAssertEqual(mkdir(target, 0o755), 0)
        writeFileBytes(try XCTUnwrap(readFileBytes(folder("cn_clip/vocab.txt"))), to: target + "/vocab.txt")
        for (file, source) in files { writeFileBytes(try XCTUnwrap(readFileBytes(source)), to: target + "/" + file) }
        for (file, text) in contents { writeFileBytes(Array(text.utf8), to: target + "/" + file) }
        return target
    }

    func check(_ tokenizer: WordPieceTokenizer, _ text: String, _ expected: Reference, maxLength: Int, what: String,
               file: StaticString = #filePath, line: UInt = #line) {
        let what = "\(what) \(String(reflecting: text).prefix(60))"
        XCTAssertEqual(tokenizer.encode(text), expected.ids, "\(what): ids", file: file, line: line)
        let padded = tokenizer(text, maxLength: maxLength)
        XCTAssertEqual(padded.ids, expected.inputIDs, "\(what): input_ids", file: file, line: line)
        XCTAssertEqual(padded.attentionMask, expected.attentionMask, "\(what): attention_mask", file: file, line: line)
        XCTAssertEqual(padded.truncatedText.map { Array($0.unicodeScalars) }, expected.truncatedText.map { Array($0.unicodeScalars) },
                       "\(what): truncated text", file: file, line: line)
        // Scalar by scalar: String equality would accept canonically equivalent spellings.
        XCTAssertEqual(Array(tokenizer.decode(expected.ids).unicodeScalars), Array(expected.decoded.unicodeScalars),
                       "\(what): decode", file: file, line: line)
        XCTAssertEqual(Array(tokenizer.decode(expected.ids, skipSpecialTokens: true).unicodeScalars),
                       Array(expected.decodedSkippingSpecialTokens.unicodeScalars), "\(what): decode skipping special tokens",
                       file: file, line: line)
    }

    // MARK: - Parity with transformers

    func testCnClipFolderMatchesTransformers() throws {
        let fixture = try Self.loadFixture()
        XCTAssertGreaterThanOrEqual(fixture.cases.count, 35)
        let tokenizer = try WordPieceTokenizer(folder: folder("cn_clip"))
        XCTAssertEqual(tokenizer.vocabularySize, fixture.vocabularySize)
        XCTAssertEqual(tokenizer.vocabularySize, 21128, "cn_clip's vocab.txt is the RoBERTa-wwm-ext vocabulary")
        XCTAssertEqual(tokenizer.padTokenID, fixture.padTokenID)
        XCTAssertTrue(tokenizer.doLowerCase && tokenizer.stripAccents && tokenizer.tokenizeChineseChars)
        for testCase in fixture.cases {
            check(tokenizer, testCase.text, try XCTUnwrap(testCase.results["cn_clip"]), maxLength: fixture.maxLength, what: "cn_clip")
        }
    }

    /// do_lower_case, strip_accents and tokenize_chinese_chars each changed, beside cn_clip's vocabulary.
    func testConfigVariantsMatchTransformers() throws {
        let fixture = try Self.loadFixture()
        let scratch = ScratchDirectory("pea-wordpiece-variants")
        XCTAssertEqual(listDirectory(folder("wordpiece_config_variants")), Self.variantNames)
        for name in Self.variantNames {
            let path = try assembledFolder(scratch, name, copying: [
                "tokenizer_config.json": folder("wordpiece_config_variants/\(name)/tokenizer_config.json")])
            let tokenizer = try WordPieceTokenizer(folder: path)
            for testCase in fixture.cases {
                check(tokenizer, testCase.text, try XCTUnwrap(testCase.results[name]), maxLength: fixture.maxLength, what: name)
            }
        }
    }

    /// A folder with vocab.txt alone takes BertTokenizer's defaults, which are cn_clip's settings.
    func testVocabularyAloneTakesBertDefaults() throws {
        let fixture = try Self.loadFixture()
        let scratch = ScratchDirectory("pea-wordpiece-bare")
        let tokenizer = try WordPieceTokenizer(folder: try assembledFolder(scratch, "bare"))
        XCTAssertEqual(tokenizer.modelMaxLength, Int.max)
        XCTAssertFalse(tokenizer.cleanUpTokenizationSpaces)
        for testCase in fixture.cases {
            let expected = try XCTUnwrap(testCase.results["cn_clip"])
            XCTAssertEqual(tokenizer.encode(testCase.text), expected.ids, testCase.text)
            XCTAssertEqual(tokenizer(testCase.text, maxLength: fixture.maxLength).ids, expected.inputIDs, testCase.text)
        }
    }

    func testSpecialTokensAndPadding() throws {
        let fixture = try Self.loadFixture()
        let tokenizer = try WordPieceTokenizer(folder: folder("cn_clip"))
        XCTAssertEqual(tokenizer.id(forToken: "[CLS]"), tokenizer.clsTokenID)
        XCTAssertEqual(tokenizer.id(forToken: "[SEP]"), tokenizer.sepTokenID)
        XCTAssertEqual(tokenizer.id(forToken: "[PAD]"), tokenizer.padTokenID)
        XCTAssertEqual(tokenizer.id(forToken: "[UNK]"), tokenizer.unknownTokenID)
        XCTAssertEqual(tokenizer.id(forToken: "[MASK]"), tokenizer.maskTokenID)
        XCTAssertEqual(tokenizer.token(forID: tokenizer.padTokenID), "[PAD]")
        XCTAssertEqual(tokenizer.modelMaxLength, 512)
        for testCase in fixture.cases {
            let reference = try XCTUnwrap(testCase.results["cn_clip"])
            XCTAssertEqual(reference.ids.first, tokenizer.clsTokenID)
            XCTAssertEqual(reference.ids.last, tokenizer.sepTokenID)
            XCTAssertEqual(reference.inputIDs.count, fixture.maxLength)
        }
        // Without padding a short prompt keeps its length; the default length is model_max_length.
        let short = tokenizer("一只猫", maxLength: fixture.maxLength, padding: false)
        XCTAssertEqual(short.ids, tokenizer.encode("一只猫"))
        XCTAssertEqual(short.attentionMask, [1, 1, 1, 1, 1])
        XCTAssertEqual(tokenizer("一只猫").ids.count, 512)
    }

    func testTruncationKeepsSeparatorAndReportsTheCutText() throws {
        let tokenizer = try WordPieceTokenizer(folder: folder("cn_clip"))
        let text = String(repeating: "一只猫坐在月球上，", count: 10)
        let full = tokenizer.encode(text)
        XCTAssertGreaterThan(full.count, 52)
        let result = tokenizer(text, maxLength: 52)
        XCTAssertEqual(result.ids.count, 52)
        XCTAssertEqual(Array(result.ids.prefix(51)), Array(full.prefix(51)))
        XCTAssertEqual(result.ids.last, tokenizer.sepTokenID)
        XCTAssertEqual(result.attentionMask, [Int](repeating: 1, count: 52))
        let cut = try XCTUnwrap(result.truncatedText)
        XCTAssertEqual(cut, tokenizer.decode(Array(full[51..<(full.count - 1)])))
        XCTAssertNil(tokenizer(String(repeating: "猫", count: 50), maxLength: 52).truncatedText)
        XCTAssertNotNil(tokenizer(String(repeating: "猫", count: 51), maxLength: 52).truncatedText)
    }

    // MARK: - Unicode classes and normalization, scalar by scalar

    /// Every scalar's class and normalizations against the reference's own normalizers and pre-tokenizer.
    func testUnicodeClassesAndNormalizationMatchTheReference() throws {
        let document = try JSONValue.parse(try XCTUnwrap(readFileBytes(Self.directory + "/wordpiece_unicode.json")))
        let root = try XCTUnwrap(document.objectValue)
        let runs = try XCTUnwrap(root["classes"]?.arrayValue).map { run -> (start: UInt32, kind: String) in
            let pair = try XCTUnwrap(run.arrayValue)
            return (UInt32(try XCTUnwrap(pair[0].intValue)), try XCTUnwrap(pair[1].stringValue))
        }
        var kinds = [Character](repeating: "?", count: 0x110000)
        for (index, run) in runs.enumerated() {
            let end = index + 1 < runs.count ? runs[index + 1].start : 0x110000
            for value in run.start..<end { kinds[Int(value)] = Character(run.kind) }
        }
        var mismatches: [String] = []
        for value in UInt32(0)..<0x110000 {
            guard let scalar = Unicode.Scalar(value) else { continue }
            let kind: Character
            if value == 0 || value == 0xFFFD || WordPieceTokenizer.isControl(scalar) {
                kind = "X"
            } else if WordPieceTokenizer.isWhitespace(scalar) {
                kind = "S"
            } else if WordPieceTokenizer.isChineseCharacter(scalar) {
                kind = "C"
            } else if WordPieceTokenizer.isPunctuation(scalar) {
                kind = "P"
            } else {
                kind = "L"
            }
            if kind != kinds[Int(value)] { mismatches.append("U+\(String(value, radix: 16)) \(kind), expected \(kinds[Int(value)])") }
        }
        XCTAssertEqual(mismatches.count, 0, "scalar classes differ: \(mismatches.prefix(20))")

        let scratch = ScratchDirectory("pea-wordpiece-unicode")
        let normalizers: [(key: String, variant: String)] = [
            ("lowercased", "keep_accents"), ("stripped", "cased_strip_accents"), ("lowercased_stripped", "cn_clip")]
        let digests = try XCTUnwrap(root["hangul_syllables_fnv1a64"]?.objectValue)
        for (key, variant) in normalizers {
            let tokenizer = variant == "cn_clip"
                ? try WordPieceTokenizer(folder: folder("cn_clip"))
                : try WordPieceTokenizer(folder: try assembledFolder(scratch, variant, copying: [
                    "tokenizer_config.json": folder("wordpiece_config_variants/\(variant)/tokenizer_config.json")]))
            let expected = try XCTUnwrap(root[key]?.objectValue)
            XCTAssertGreaterThan(expected.count, 1000, key)
            let hangulDigest = digests[key]?.stringValue
            var digest: UInt64 = 0xCBF29CE484222325
            var normalizationMismatches: [String] = []
            // Planes 4 to 13 are unassigned: checked in batches (their scalars cannot interact), the rest one by one.
            for start in stride(from: UInt32(0x40000), to: 0xE0000, by: 0x400) {
                let batch = (start..<(start + 0x400)).map { Unicode.Scalar($0)! }
                XCTAssertTrue(batch.allSatisfy { $0.properties.generalCategory == .unassigned && kinds[Int($0.value)] == "L" && expected[String($0.value)] == nil })
                if tokenizer.normalize(String(String.UnicodeScalarView(batch))) != batch {
                    normalizationMismatches.append("U+\(String(start, radix: 16))…")
                }
            }
            for value in UInt32(0)..<0x110000 where !(0x40000..<0xE0000).contains(value) {
                guard let scalar = Unicode.Scalar(value), kinds[Int(value)] == "P" || kinds[Int(value)] == "L" else { continue }
                let actual = tokenizer.normalize(String(Character(scalar)))
                if hangulDigest != nil && (0xAC00...0xD7A3).contains(value) {
                    for byte in String(String.UnicodeScalarView(actual)).utf8 + [0] {
                        digest = (digest ^ UInt64(byte)) &* 0x100000001B3
                    }
                    continue
                }
                let wanted = try expected[String(value)].map { Array(try XCTUnwrap($0.stringValue).unicodeScalars) } ?? [scalar]
                if actual != wanted {
                    normalizationMismatches.append("U+\(String(value, radix: 16)) \(actual.map { String($0.value, radix: 16) }) expected \(wanted.map { String($0.value, radix: 16) })")
                }
            }
            XCTAssertEqual(normalizationMismatches.count, 0, "\(key) differs: \(normalizationMismatches.prefix(20))")
            if let hangulDigest {
                XCTAssertEqual(String(digest, radix: 16).leftPadded(to: 16), hangulDigest, "\(key): Hangul syllables")
            }
        }
    }

    // MARK: - Errors

    /// A copy of cn_clip in a scratch folder, with some files replaced (nil removes the file).
    func modifiedFolder(_ scratch: ScratchDirectory, replacing files: [String: [UInt8]?]) throws -> String {
        for name in listDirectory(folder("cn_clip")) {
            writeFileBytes(try XCTUnwrap(readFileBytes(folder("cn_clip/" + name))), to: scratch.file(name))
        }
        for (name, contents) in files {
            if let contents { scratch.write(contents, to: name) } else { unlink(scratch.file(name)) }
        }
        return scratch.path
    }

    func testMissingVocabularyNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-wordpiece-errors")
        let path = try modifiedFolder(scratch, replacing: ["vocab.txt": nil])
        assertThrowsError(containing: [path + "/vocab.txt", "cannot open"]) { try WordPieceTokenizer(folder: path) }
        XCTAssertThrowsError(try WordPieceTokenizer(folder: path)) { error in
            guard case PEAError.invalidFile(let file, _) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(file, path + "/vocab.txt")
        }
    }

    func testMalformedVocabularyNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-wordpiece-errors")
        for (contents, fragment) in [([UInt8](arrayLiteral: 0x61, 0x0A, 0xFF, 0xFE, 0x0A), "UTF-8"),
                                     (Array("".utf8), "empty"),
                                     (Array("[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n".utf8), "[UNK]")] {
            let path = try modifiedFolder(scratch, replacing: ["vocab.txt": contents])
            assertThrowsError(containing: [path + "/vocab.txt", fragment]) { try WordPieceTokenizer(folder: path) }
        }
    }

    func testMalformedConfigNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-wordpiece-errors")
        for contents in ["{", "[]", "{\"do_lower_case\": \"yes\"}", "{\"model_max_length\": 52.5}",
                         "{\"unk_token\": 3}", "{\"added_tokens_decoder\": {\"x\": {\"content\": \"a\"}}}",
                         "{\"added_tokens_decoder\": {\"5\": \"[PAD]\"}}"] {
            let path = try modifiedFolder(scratch, replacing: ["tokenizer_config.json": Array(contents.utf8)])
            assertThrowsError(containing: [path + "/tokenizer_config.json"]) { try WordPieceTokenizer(folder: path) }
        }
        let path = try modifiedFolder(scratch, replacing: [
            "tokenizer_config.json": Array("{\"tokenizer_class\": \"BertTokenizer\"}".utf8),
            "special_tokens_map.json": Array("{\"pad_token\": [1]}".utf8)])
        assertThrowsError(containing: [path + "/special_tokens_map.json"]) { try WordPieceTokenizer(folder: path) }
    }

    func testUnsupportedAddedTokensAreRefused() throws {
        let scratch = ScratchDirectory("pea-wordpiece-errors")
        for (entry, fragment) in [("{\"content\": \"[MASK]\", \"single_word\": true, \"special\": true}", "single_word"),
                                  ("{\"content\": \"foo\", \"normalized\": true, \"special\": false}", "normalized")] {
            let config = "{\"added_tokens_decoder\": {\"103\": \(entry)}}"
            let path = try modifiedFolder(scratch, replacing: ["tokenizer_config.json": Array(config.utf8)])
            assertThrowsError(containing: [path + "/tokenizer_config.json", fragment]) { try WordPieceTokenizer(folder: path) }
        }
    }
}

extension String {
    func leftPadded(to length: Int, with pad: Character = "0") -> String {
        count >= length ? self : String(repeating: pad, count: length - count) + self
    }
}
