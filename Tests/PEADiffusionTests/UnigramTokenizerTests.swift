import XCTest
@testable import PEADiffusion

/// The SentencePiece unigram tokenizer against transformers 5's `XLMRobertaTokenizer`, on the XLM-R-layout folder
/// and cases of tools/reference/make_multilingual_tokenizer_fixtures.py (a small unigram model trained with XLM-R's
/// settings: nmt_nfkc's charsmap, fairseq ids).
final class UnigramTokenizerTests: XCTestCase {
    struct Fixture {
        let maxLength: Int
        let vocabularySize: Int
        let specialTokenIDs: [String: Int]
        let cases: [(text: String, reference: WordPieceTokenizerTests.Reference)]
    }

    static let directory = fixturesDirectory() + "/tokenizers"
    static let folder = directory + "/xlmr_small"

    static func loadFixture() throws -> Fixture {
        let document = try JSONValue.parse(try XCTUnwrap(readFileBytes(directory + "/unigram_cases.json")))
        let root = try XCTUnwrap(document.objectValue)
        let cases = try XCTUnwrap(root["cases"]?.arrayValue).map { entry -> (String, WordPieceTokenizerTests.Reference) in
            let object = try XCTUnwrap(entry.objectValue)
            let result = try XCTUnwrap(object["results"]?.objectValue?["xlmr_small"])
            return (try XCTUnwrap(object["text"]?.stringValue), try WordPieceTokenizerTests.reference(result))
        }
        return Fixture(maxLength: try XCTUnwrap(root["max_length"]?.intValue),
                       vocabularySize: try XCTUnwrap(root["vocab_size"]?.intValue),
                       specialTokenIDs: try XCTUnwrap(root["special_token_ids"]?.objectValue).mapValues { try XCTUnwrap($0.intValue) },
                       cases: cases)
    }

    /// A scratch copy of xlmr_small with only the named files.
    func partialFolder(_ scratch: ScratchDirectory, _ name: String, files: [String]) throws -> String {
        let target = scratch.file(name)
        XCTAssertEqual(mkdir(target, 0o755), 0)
        for file in files {
            writeFileBytes(try XCTUnwrap(readFileBytes(Self.folder + "/" + file)), to: target + "/" + file)
        }
        return target
    }

    // MARK: - Parity with transformers

    func testEveryCaseMatchesTransformers() throws {
        let fixture = try Self.loadFixture()
        XCTAssertGreaterThanOrEqual(fixture.cases.count, 35)
        let tokenizer = try SentencePieceUnigramTokenizer(folder: Self.folder)
        XCTAssertEqual(tokenizer.source, .tokenizerJSON)
        XCTAssertEqual(tokenizer.vocabularySize, fixture.vocabularySize)
        for (text, expected) in fixture.cases {
            let what = String(reflecting: text).prefix(60)
            XCTAssertEqual(tokenizer.encode(text), expected.ids, "\(what): ids")
            let padded = tokenizer(text, maxLength: fixture.maxLength)
            XCTAssertEqual(padded.ids, expected.inputIDs, "\(what): input_ids")
            XCTAssertEqual(padded.attentionMask, expected.attentionMask, "\(what): attention_mask")
            XCTAssertEqual(padded.truncatedText.map { Array($0.unicodeScalars) }, expected.truncatedText.map { Array($0.unicodeScalars) },
                           "\(what): truncated text")
            XCTAssertEqual(Array(tokenizer.decode(expected.ids).unicodeScalars), Array(expected.decoded.unicodeScalars), "\(what): decode")
            XCTAssertEqual(Array(tokenizer.decode(expected.ids, skipSpecialTokens: true).unicodeScalars),
                           Array(expected.decodedSkippingSpecialTokens.unicodeScalars), "\(what): decode skipping special tokens")
        }
    }

    /// transformers reads the vocabulary from tokenizer.json when there is one, else converts sentencepiece.bpe.model
    /// (XLMRobertaConverter's fairseq layout); both give the same ids, with or without tokenizer_config.json.
    func testTokenizerJSONAloneAndSentencePieceModelAloneGiveTheSameIDs() throws {
        let fixture = try Self.loadFixture()
        let scratch = ScratchDirectory("pea-unigram-layouts")
        let layouts: [(name: String, files: [String], source: SentencePieceUnigramTokenizer.Source)] = [
            ("json_only", ["tokenizer.json"], .tokenizerJSON),
            ("model_only", ["sentencepiece.bpe.model"], .sentencePieceModel),
            ("model_and_config", ["sentencepiece.bpe.model", "tokenizer_config.json"], .sentencePieceModel),
        ]
        let full = try SentencePieceUnigramTokenizer(folder: Self.folder)
        for layout in layouts {
            let tokenizer = try SentencePieceUnigramTokenizer(folder: try partialFolder(scratch, layout.name, files: layout.files))
            XCTAssertEqual(tokenizer.source, layout.source, layout.name)
            XCTAssertEqual(tokenizer.vocabularySize, fixture.vocabularySize, layout.name)
            for id in 0..<tokenizer.vocabularySize {
                XCTAssertEqual(tokenizer.token(forID: id), full.token(forID: id), "\(layout.name): token \(id)")
                XCTAssertEqual(tokenizer.score(forID: id), full.score(forID: id), "\(layout.name): score \(id)")
            }
            for (text, expected) in fixture.cases {
                XCTAssertEqual(tokenizer.encode(text), expected.ids, "\(layout.name) \(String(reflecting: text).prefix(60))")
                XCTAssertEqual(tokenizer(text, maxLength: fixture.maxLength).ids, expected.inputIDs, layout.name)
            }
        }
    }

    func testSpecialTokensAreFairseqs() throws {
        let fixture = try Self.loadFixture()
        let tokenizer = try SentencePieceUnigramTokenizer(folder: Self.folder)
        XCTAssertEqual(tokenizer.bosTokenID, fixture.specialTokenIDs["bos_token"])
        XCTAssertEqual(tokenizer.eosTokenID, fixture.specialTokenIDs["eos_token"])
        XCTAssertEqual(tokenizer.padTokenID, fixture.specialTokenIDs["pad_token"])
        XCTAssertEqual(tokenizer.unknownTokenID, fixture.specialTokenIDs["unk_token"])
        XCTAssertEqual(tokenizer.maskTokenID, fixture.specialTokenIDs["mask_token"])
        XCTAssertEqual([tokenizer.bosToken, tokenizer.padToken, tokenizer.eosToken, tokenizer.unknownToken],
                       (0..<4).map { tokenizer.token(forID: $0)! })
        XCTAssertEqual(tokenizer.maskTokenID, tokenizer.vocabularySize - 1)
        XCTAssertEqual(tokenizer.modelMaxLength, 512)
        XCTAssertTrue(tokenizer.addPrefixSpace)
        let empty = tokenizer("", maxLength: fixture.maxLength)
        XCTAssertEqual(Array(empty.ids.prefix(2)), [tokenizer.bosTokenID, tokenizer.eosTokenID])
        XCTAssertEqual(Set(empty.ids.dropFirst(2)), [tokenizer.padTokenID])
        XCTAssertEqual(empty.attentionMask, [1, 1] + [Int](repeating: 0, count: fixture.maxLength - 2))
    }

    func testTruncationKeepsEndOfSequence() throws {
        let tokenizer = try SentencePieceUnigramTokenizer(folder: Self.folder)
        let text = String(repeating: "a photograph of an astronaut riding a horse, ", count: 8)
        let full = tokenizer.encode(text)
        XCTAssertGreaterThan(full.count, 77)
        let result = tokenizer(text, maxLength: 77)
        XCTAssertEqual(result.ids.count, 77)
        XCTAssertEqual(Array(result.ids.prefix(76)), Array(full.prefix(76)))
        XCTAssertEqual(result.ids.last, tokenizer.eosTokenID)
        XCTAssertEqual(result.truncatedText, tokenizer.decode(Array(full[76..<(full.count - 1)])))
        XCTAssertEqual(tokenizer(text, maxLength: 10, padding: false).ids, Array(full.prefix(9)) + [tokenizer.eosTokenID])
    }

    // MARK: - The Precompiled normalizer, scalar by scalar

    func testNormalizerMatchesTheReferenceForEveryScalar() throws {
        let document = try JSONValue.parse(try XCTUnwrap(readFileBytes(Self.directory + "/unigram_unicode.json")))
        let expected = try XCTUnwrap(document.objectValue?["normalized"]?.objectValue)
        XCTAssertGreaterThan(expected.count, 4000)
        let scratch = ScratchDirectory("pea-unigram-unicode")
        for layout in [Self.folder, try partialFolder(scratch, "model", files: ["sentencepiece.bpe.model"])] {
            let tokenizer = try SentencePieceUnigramTokenizer(folder: layout)
            var mismatches: [String] = []
            // Planes 4 to 13 are unassigned: checked in batches (their scalars cannot interact), the rest one by one.
            for start in stride(from: UInt32(0x40000), to: 0xE0000, by: 0x400) {
                let batch = String(String.UnicodeScalarView((start..<(start + 0x400)).map { Unicode.Scalar($0)! }))
                XCTAssertTrue(batch.unicodeScalars.allSatisfy { $0.properties.generalCategory == .unassigned && expected[String($0.value)] == nil })
                if !tokenizer.normalize(batch).unicodeScalars.elementsEqual(batch.unicodeScalars) {
                    mismatches.append("U+\(String(start, radix: 16))…")
                }
            }
            for value in UInt32(0)..<0x110000 where !(0x40000..<0xE0000).contains(value) {
                guard let scalar = Unicode.Scalar(value) else { continue }
                let alone = String(Character(scalar))
                let wanted = try expected[String(value)].map { try XCTUnwrap($0.stringValue) } ?? alone
                if !tokenizer.normalize(alone).unicodeScalars.elementsEqual(wanted.unicodeScalars) {
                    mismatches.append("U+\(String(value, radix: 16))")
                }
            }
            XCTAssertEqual(mismatches.count, 0, "\(layout): normalization differs: \(mismatches.prefix(20))")
        }
    }

    func testBase64() {
        XCTAssertEqual(decodeBase64(""), [])
        XCTAssertEqual(decodeBase64("TWFu"), Array("Man".utf8))
        XCTAssertEqual(decodeBase64("TWE="), Array("Ma".utf8))
        XCTAssertEqual(decodeBase64("TQ=="), Array("M".utf8))
        XCTAssertEqual(decodeBase64("+/8="), [0xFB, 0xFF])
        for invalid in ["TQ", "TQ=", "T===", "TW=u", "TWFu!", "TWFuT"] {
            XCTAssertNil(decodeBase64(invalid), invalid)
        }
    }

    // MARK: - Errors

    /// A copy of xlmr_small in a scratch folder, with some files replaced (nil removes the file).
    func modifiedFolder(_ scratch: ScratchDirectory, replacing files: [String: [UInt8]?]) throws -> String {
        for name in listDirectory(Self.folder) {
            writeFileBytes(try XCTUnwrap(readFileBytes(Self.folder + "/" + name)), to: scratch.file(name))
        }
        for (name, contents) in files {
            if let contents { scratch.write(contents, to: name) } else { unlink(scratch.file(name)) }
        }
        return scratch.path
    }

    func testMissingFilesNameTheFile() throws {
        let scratch = ScratchDirectory("pea-unigram-errors")
        let path = try modifiedFolder(scratch, replacing: ["tokenizer.json": nil, "sentencepiece.bpe.model": nil])
        assertThrowsError(containing: [path + "/tokenizer.json", "sentencepiece.bpe.model"]) {
            try SentencePieceUnigramTokenizer(folder: path)
        }
        XCTAssertThrowsError(try SentencePieceUnigramTokenizer(folder: path)) { error in
            guard case PEAError.invalidFile(let file, _) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(file, path + "/tokenizer.json")
        }
    }

    func testMalformedTokenizerJSONNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-unigram-errors")
        let original = String(decoding: try XCTUnwrap(readFileBytes(Self.folder + "/tokenizer.json")), as: UTF8.self)
        let document = try JSONValue.parse(original)
        var root = try XCTUnwrap(document.objectValue)
        var model = try XCTUnwrap(root["model"]?.objectValue)
        func replacingModel(_ key: String, _ value: JSONValue) -> String {
            var changed = model
            changed[key] = value
            var changedRoot = root
            changedRoot["model"] = .object(changed)
            return JSONValue.object(changedRoot).serialized()
        }
        let broken: [(String, String)] = [
            ("{\"model\": ", "invalid JSON"),
            ("[]", "top level"),
            ("{}", "'model'"),
            (replacingModel("vocab", .string("x")), "model.vocab"),
            (replacingModel("vocab", .array([.array([.string("a")])])), "model.vocab[0]"),
            (replacingModel("vocab", .array([.array([.string("<s>"), .number(0)])])), "vocabulary has 1 entries"),
        ]
        for (contents, fragment) in broken {
            let path = try modifiedFolder(scratch, replacing: ["tokenizer.json": Array(contents.utf8)])
            assertThrowsError(containing: [path + "/tokenizer.json", fragment]) { try SentencePieceUnigramTokenizer(folder: path) }
        }
        // Another model type is refused, naming it.
        let bpe = replacingModel("type", .string("BPE"))
        var path = try modifiedFolder(scratch, replacing: ["tokenizer.json": Array(bpe.utf8)])
        assertThrowsError(containing: [path + "/tokenizer.json", "BPE"]) { try SentencePieceUnigramTokenizer(folder: path) }
        // A charsmap that is not base64, or not a charsmap.
        model = try XCTUnwrap(root["model"]?.objectValue)
        for (charsmap, fragment) in [("not base64!", "base64"), ("AAA=", "too short"), ("AAAAAA==", "empty"), ("//8AAA==", "exceeds")] {
            root["normalizer"] = .object(["type": .string("Precompiled"), "precompiled_charsmap": .string(charsmap)])
            path = try modifiedFolder(scratch, replacing: ["tokenizer.json": Array(JSONValue.object(root).serialized().utf8)])
            assertThrowsError(containing: [path + "/tokenizer.json", fragment]) { try SentencePieceUnigramTokenizer(folder: path) }
        }
    }

    func testMalformedSentencePieceModelNamesTheFile() throws {
        let scratch = ScratchDirectory("pea-unigram-errors")
        let original = try XCTUnwrap(readFileBytes(Self.folder + "/sentencepiece.bpe.model"))
        for contents in [Array(original.prefix(original.count / 2)), [0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F], [0x08],
                         Array("not a model".utf8)] {
            let path = try modifiedFolder(scratch, replacing: ["tokenizer.json": nil, "sentencepiece.bpe.model": contents])
            assertThrowsError(containing: [path + "/sentencepiece.bpe.model"]) { try SentencePieceUnigramTokenizer(folder: path) }
        }
    }

    func testOtherTokenizerClassesAreRefused() throws {
        let scratch = ScratchDirectory("pea-unigram-errors")
        let path = try modifiedFolder(scratch, replacing: [
            "tokenizer_config.json": Array("{\"tokenizer_class\": \"T5Tokenizer\"}".utf8)])
        assertThrowsError(containing: [path + "/tokenizer_config.json", "T5Tokenizer"]) { try SentencePieceUnigramTokenizer(folder: path) }
        let malformed = try modifiedFolder(scratch, replacing: ["tokenizer_config.json": Array("{\"add_prefix_space\": 1}".utf8)])
        assertThrowsError(containing: [malformed + "/tokenizer_config.json"]) { try SentencePieceUnigramTokenizer(folder: malformed) }
    }
}
