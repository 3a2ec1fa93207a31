import XCTest
@testable import PEADiffusion

/// The CLIP tokenizer against transformers 5's `CLIPTokenizer` (the class diffusers loads), on the folders and
/// cases of tools/reference/make_tokenizer_fixtures.py.
final class CLIPTokenizerTests: XCTestCase {
    /// What transformers returned for one text and one tokenizer folder.
    struct Reference {
        let ids: [Int]
        let inputIDs: [Int]
        let attentionMask: [Int]
        let decoded: String
        let truncatedText: String?
    }

    struct Case {
        let text: String
        let results: [(folder: String, reference: Reference)]
    }

    struct Fixture {
        let maxLength: Int
        let padTokenIDs: [String: Int]
        let cases: [Case]
        let variantCases: [Case]
    }

    static let directory = fixturesDirectory() + "/tokenizers"

    static func loadFixture() throws -> Fixture {
        let document = try JSONValue.parse(try XCTUnwrap(readFileBytes(directory + "/clip_cases.json")))
        let root = try XCTUnwrap(document.objectValue)
        func ints(_ value: JSONValue?) throws -> [Int] {
            try XCTUnwrap(value?.arrayValue).map { try XCTUnwrap($0.intValue) }
        }
        func cases(_ key: String) throws -> [Case] {
            try XCTUnwrap(root[key]?.arrayValue).map { entry in
                let object = try XCTUnwrap(entry.objectValue)
                let results = try XCTUnwrap(object["results"]?.objectValue).sorted { $0.key < $1.key }.map { folder, value in
                    let result = try XCTUnwrap(value.objectValue)
                    let reference = Reference(ids: try ints(result["ids"]), inputIDs: try ints(result["input_ids"]),
                                              attentionMask: try ints(result["attention_mask"]),
                                              decoded: try XCTUnwrap(result["decoded"]?.stringValue),
                                              truncatedText: result["truncated_text"]?.stringValue)
                    return (folder, reference)
                }
                return Case(text: try XCTUnwrap(object["text"]?.stringValue), results: results)
            }
        }
        let padIDs = try XCTUnwrap(root["pad_token_ids"]?.objectValue).mapValues { try XCTUnwrap($0.intValue) }
        return Fixture(maxLength: try XCTUnwrap(root["max_length"]?.intValue), padTokenIDs: padIDs,
                       cases: try cases("cases"), variantCases: try cases("variant_cases"))
    }

    func folder(_ name: String) -> String { Self.directory + "/" + name }

    /// Every result of a case against the tokenizer of its folder.
    func check(_ testCase: Case, tokenizers: [String: CLIPTokenizer], maxLength: Int,
               file: StaticString = #filePath, line: UInt = #line) throws {
        for (name, expected) in testCase.results {
            let tokenizer = try XCTUnwrap(tokenizers[name], "no tokenizer for \(name)")
            let what = "\(name) \(String(reflecting: testCase.text).prefix(60))"
            XCTAssertEqual(tokenizer.encode(testCase.text), expected.ids, "\(what): ids", file: file, line: line)
            let padded = tokenizer(testCase.text, maxLength: maxLength)
            XCTAssertEqual(padded.ids, expected.inputIDs, "\(what): input_ids", file: file, line: line)
            XCTAssertEqual(padded.attentionMask, expected.attentionMask, "\(what): attention_mask", file: file, line: line)
            XCTAssertEqual(padded.truncatedText, expected.truncatedText, "\(what): truncated text", file: file, line: line)
            XCTAssertEqual(tokenizer.decode(expected.ids), expected.decoded, "\(what): decode", file: file, line: line)
        }
    }

    // MARK: - Parity with transformers

    func testEveryCaseMatchesTransformers() throws {
        let fixture = try Self.loadFixture()
        XCTAssertGreaterThanOrEqual(fixture.cases.count, 25)
        let tokenizers = try Dictionary(uniqueKeysWithValues: ["clip_small", "clip_small_pad0"].map {
            ($0, try CLIPTokenizer(folder: folder($0)))
        })
        for testCase in fixture.cases {
            XCTAssertEqual(Set(testCase.results.map(\.folder)), Set(tokenizers.keys))
            try check(testCase, tokenizers: tokenizers, maxLength: fixture.maxLength)
        }
        // The default length is the config's model_max_length.
        for tokenizer in tokenizers.values {
            XCTAssertEqual(tokenizer.modelMaxLength, fixture.maxLength)
            XCTAssertEqual(tokenizer("a cat").ids, tokenizer("a cat", maxLength: fixture.maxLength).ids)
        }
    }

    /// A folder as transformers 5 saves it (tokenizer.json only) tokenizes exactly as the one it was saved from.
    func testTokenizerJSONFolderMatchesItsSource() throws {
        let fixture = try Self.loadFixture()
        let saved = folder("clip_small_pad0_tokenizer_json")
        XCTAssertFalse(isRegularFile(saved + "/vocab.json"))
        let tokenizers = ["clip_small_pad0": try CLIPTokenizer(folder: saved)]
        for testCase in fixture.cases {
            let only = Case(text: testCase.text, results: testCase.results.filter { $0.folder == "clip_small_pad0" })
            try check(only, tokenizers: tokenizers, maxLength: fixture.maxLength)
        }
    }

    /// The other ways real folders declare their special tokens (legacy special_tokens_map.json overriding the
    /// pad token, added_tokens.json, added_tokens_decoder, nothing at all), each beside clip_small's vocabulary.
    func testConfigVariantsMatchTransformers() throws {
        let fixture = try Self.loadFixture()
        let scratch = ScratchDirectory("pea-clip-variants")
        var tokenizers: [String: CLIPTokenizer] = [:]
        let variantsRoot = folder("clip_config_variants")
        let variants = listDirectory(variantsRoot)
        XCTAssertEqual(variants.count, 4)
        for name in variants {
            let target = scratch.file(name)
            XCTAssertEqual(mkdir(target, 0o755), 0)
            for file in ["vocab.json", "merges.txt"] {
                writeFileBytes(try XCTUnwrap(readFileBytes(folder("clip_small/" + file))), to: target + "/" + file)
            }
            for file in listDirectory(variantsRoot + "/" + name) {
                writeFileBytes(try XCTUnwrap(readFileBytes(variantsRoot + "/" + name + "/" + file)), to: target + "/" + file)
            }
            tokenizers[name] = try CLIPTokenizer(folder: target)
        }
        for testCase in fixture.variantCases {
            XCTAssertEqual(Set(testCase.results.map(\.folder)), Set(tokenizers.keys))
            try check(testCase, tokenizers: tokenizers, maxLength: fixture.maxLength)
        }
        for (name, tokenizer) in tokenizers {
            XCTAssertEqual(tokenizer.padTokenID, fixture.padTokenIDs[name], "\(name): pad token id")
        }
    }

    func testPadTokensFollowTheConfig() throws {
        let fixture = try Self.loadFixture()
        let sd1 = try CLIPTokenizer(folder: folder("clip_small"))
        let pad0 = try CLIPTokenizer(folder: folder("clip_small_pad0"))
        XCTAssertEqual(sd1.padTokenID, fixture.padTokenIDs["clip_small"])
        XCTAssertEqual(pad0.padTokenID, fixture.padTokenIDs["clip_small_pad0"])
        XCTAssertEqual(sd1.padToken, sd1.eosToken)
        XCTAssertEqual(pad0.padToken, "!")
        XCTAssertEqual(sd1.bosTokenID, pad0.bosTokenID)
        XCTAssertEqual(sd1.eosTokenID, pad0.eosTokenID)
        XCTAssertEqual(sd1.id(forToken: "<|startoftext|>"), sd1.bosTokenID)
        XCTAssertEqual(sd1.token(forID: sd1.eosTokenID), "<|endoftext|>")
    }

    // MARK: - Truncation and decoding

    func testTruncationKeepsEndOfTextAndReportsTheCutText() throws {
        let tokenizer = try CLIPTokenizer(folder: folder("clip_small"))
        let animals = ["cat", "dog", "butterfly", "horse", "owl", "elephant", "fox", "giraffe"]
        let text = (0..<100).map { animals[$0 % animals.count] }.joined(separator: " ")
        let full = tokenizer.encode(text)
        XCTAssertGreaterThan(full.count, 77)
        let result = tokenizer(text)
        XCTAssertEqual(result.ids.count, 77)
        XCTAssertEqual(result.ids.last, tokenizer.eosTokenID)
        XCTAssertEqual(Array(result.ids.prefix(76)), Array(full.prefix(76)))
        XCTAssertEqual(result.attentionMask, [Int](repeating: 1, count: 77))
        // The reported text is the removed ids decoded: the end of the prompt, after what was kept.
        let cut = try XCTUnwrap(result.truncatedText)
        XCTAssertEqual(cut, tokenizer.decode(Array(full[76..<(full.count - 1)])))
        XCTAssertTrue(text.hasSuffix(cut), "'\(cut)' is not the end of the prompt")
        XCTAssertTrue(text.hasPrefix(tokenizer.decode(Array(full[1..<76]))))

        // A shorter maxLength truncates there; no padding leaves short prompts short.
        let short = tokenizer(text, maxLength: 10, padding: false)
        XCTAssertEqual(short.ids, Array(full.prefix(9)) + [tokenizer.eosTokenID])
        XCTAssertNil(tokenizer("a cat", padding: false).truncatedText)
        XCTAssertEqual(tokenizer("a cat", padding: false).ids, tokenizer.encode("a cat"))
    }

    func testDecodeRoundTripsPlainText() throws {
        for name in ["clip_small", "clip_small_pad0"] {
            let tokenizer = try CLIPTokenizer(folder: folder(name))
            for text in ["a photograph of an astronaut riding a horse", "an oil painting, 4k, trending on artstation",
                         "café naïve ångström", "中文 日本語 한국어", "😀 👍🏽", "12 3.5"] {
                let ids = tokenizer.encode(text)
                XCTAssertEqual(ids.first, tokenizer.bosTokenID)
                XCTAssertEqual(ids.last, tokenizer.eosTokenID)
                let decoded = tokenizer.decode(Array(ids.dropFirst().dropLast()))
                // Decoding puts a space after each word, so punctuation and digits come back spaced; re-encoding
                // the decoded text gives the same ids.
                XCTAssertEqual(tokenizer.encode(decoded), ids, "\(name): \(text) -> \(decoded)")
                if !text.contains(where: { $0.isPunctuation || $0.isNumber }) {
                    XCTAssertEqual(decoded, text, name)
                }
            }
            XCTAssertEqual(tokenizer.decode([]), "")
            XCTAssertEqual(tokenizer.decode([1_000_000]), "", "unknown ids are skipped")
        }
    }

    // MARK: - Unicode classes and normalization, scalar by scalar

    /// Every scalar's class in the split patterns and its normalization alone, against the reference's own
    /// pre-tokenizer and normalizer (clip_unicode.json).
    func testUnicodeClassesAndNormalizationMatchTheReference() throws {
        let document = try JSONValue.parse(try XCTUnwrap(readFileBytes(Self.directory + "/clip_unicode.json")))
        let root = try XCTUnwrap(document.objectValue)
        let runs = try XCTUnwrap(root["classes"]?.arrayValue).map { run -> (start: UInt32, kind: String) in
            let pair = try XCTUnwrap(run.arrayValue)
            return (UInt32(try XCTUnwrap(pair[0].intValue)), try XCTUnwrap(pair[1].stringValue))
        }
        var mismatches: [String] = []
        for (index, run) in runs.enumerated() {
            let end = index + 1 < runs.count ? runs[index + 1].start : 0x110000
            for value in run.start..<end {
                guard let scalar = Unicode.Scalar(value) else { continue }
                let kind: String
                switch CLIPTokenizer.scalarClass(scalar) {
                case .letter: kind = "L"
                case .number: kind = "N"
                case .whitespace: kind = "S"
                case .other: kind = "P"
                }
                if kind != run.kind { mismatches.append("U+\(String(value, radix: 16)) \(kind), expected \(run.kind)") }
            }
        }
        XCTAssertEqual(mismatches.count, 0, "scalar classes differ: \(mismatches.prefix(20))")

        let normalized = try XCTUnwrap(root["normalized"]?.objectValue)
        XCTAssertGreaterThan(normalized.count, 2000)
        var normalizationMismatches: [String] = []
        for value in UInt32(0)..<0x110000 {
            guard let scalar = Unicode.Scalar(value) else { continue }
            let alone = String(Character(scalar))
            let expected = try normalized[String(value)].map { try XCTUnwrap($0.stringValue) } ?? alone
            let actual = CLIPTokenizer.normalize(alone)
            if actual != expected || !actual.unicodeScalars.elementsEqual(expected.unicodeScalars) {
                normalizationMismatches.append("U+\(String(value, radix: 16))")
            }
        }
        XCTAssertEqual(normalizationMismatches.count, 0, "normalization differs: \(normalizationMismatches.prefix(20))")
    }

    // MARK: - Errors

    /// A copy of clip_small in a scratch folder, with some files replaced (nil removes the file).
    func modifiedFolder(_ scratch: ScratchDirectory, replacing files: [String: String?]) throws -> String {
        for name in listDirectory(folder("clip_small")) {
            writeFileBytes(try XCTUnwrap(readFileBytes(folder("clip_small/" + name))), to: scratch.file(name))
        }
        for (name, contents) in files {
            if let contents {
                scratch.write(contents, to: name)
            } else {
                unlink(scratch.file(name))
            }
        }
        return scratch.path
    }

    func testMissingVocabularyNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-clip-errors")
        let path = try modifiedFolder(scratch, replacing: ["vocab.json": nil])
        assertThrowsError(containing: [path + "/vocab.json", "cannot open"]) { try CLIPTokenizer(folder: path) }
        XCTAssertThrowsError(try CLIPTokenizer(folder: path)) { error in
            guard case PEAError.invalidFile(let file, _) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(file, path + "/vocab.json")
        }
    }

    func testMissingMergesNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-clip-errors")
        let path = try modifiedFolder(scratch, replacing: ["merges.txt": nil])
        assertThrowsError(containing: [path + "/merges.txt"]) { try CLIPTokenizer(folder: path) }
    }

    func testInvalidVocabularyNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-clip-errors")
        for contents in ["{\"a\": 0,", "[1, 2]", "{\"a\": \"zero\"}", "{\"a\": -1}"] {
            let path = try modifiedFolder(scratch, replacing: ["vocab.json": contents])
            XCTAssertThrowsError(try CLIPTokenizer(folder: path), contents) { error in
                guard case PEAError.invalidFile(let file, _) = error else { return XCTFail("\(error)") }
                XCTAssertEqual(file, path + "/vocab.json")
            }
        }
    }

    func testMalformedMergesNameTheFileAndLine() throws {
        let scratch = ScratchDirectory("pea-clip-errors")
        let original = String(decoding: try XCTUnwrap(readFileBytes(folder("clip_small/merges.txt"))), as: UTF8.self)
        var lines = original.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        // Line 3 of the file (the header is line 1) broken three ways.
        for (broken, fragment) in [("i n t", "line 3: expected two symbols"), ("in", "line 3: expected two symbols"),
                                   ("", "line 3: expected two symbols"), ("q@ zz", "line 3: \"q@\" is not in vocab.json")] {
            lines[2] = broken
            let path = try modifiedFolder(scratch, replacing: ["merges.txt": lines.joined(separator: "\n")])
            assertThrowsError(containing: [path + "/merges.txt", fragment]) { try CLIPTokenizer(folder: path) }
            XCTAssertThrowsError(try CLIPTokenizer(folder: path)) { error in
                guard case PEAError.invalidFile(let file, _) = error else { return XCTFail("\(error)") }
                XCTAssertEqual(file, path + "/merges.txt")
            }
        }
        // Not UTF-8 at all.
        let path = try modifiedFolder(scratch, replacing: [:])
        scratch.write([0x23, 0xFF, 0xFE, 0x0A], to: "merges.txt")
        assertThrowsError(containing: [path + "/merges.txt", "UTF-8"]) { try CLIPTokenizer(folder: path) }
    }

    func testMalformedTokenizerConfigNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-clip-errors")
        for contents in ["{", "[]", "{\"pad_token\": 3}", "{\"model_max_length\": \"77\"}",
                         "{\"added_tokens_decoder\": {\"x\": {\"content\": \"a\"}}}"] {
            let path = try modifiedFolder(scratch, replacing: ["tokenizer_config.json": contents])
            assertThrowsError(containing: [path + "/tokenizer_config.json"]) { try CLIPTokenizer(folder: path) }
        }
    }
}
