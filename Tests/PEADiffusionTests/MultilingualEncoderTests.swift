import XCTest
@testable import PEADiffusion

/// Chinese-CLIP (BERT) and multilingual CLIP (XLM-R) text towers against transformers, on the tiny folders of
/// tools/reference/make_multilingual_fixtures.py (padded rows: the padding rows of the embeddings are read from
/// the file, as cn_clip and open_clip do, not zeroed as transformers 5 does on load).
final class MultilingualEncoderTests: XCTestCase {
    let backend = CPUBackend()
    let root = fixturesDirectory() + "/multilingual"

    func rows(_ tensor: HostTensor) -> [[Int]] {
        let values = tensor.integers()!
        return (0..<tensor.shape[0]).map { Array(values[($0 * tensor.shape[1])..<(($0 + 1) * tensor.shape[1])]) }
    }

    func check(_ output: Tensor, io ioPath: String, _ what: String) throws {
        let expected = try SafeTensorsFile(path: ioPath).tensor("out.last_hidden_state")
        XCTAssertEqual(output.shape, expected.shape, what)
        assertClose(try backend.downloadFloats(output), expected.floats(), .f32, what)
    }

    func checkBert(_ name: String, io: String? = nil) throws -> BertTextModel {
        let folder = "\(root)/\(name)"
        let (model, unused) = try BertTextModel.load(folder: folder, backend: backend)
        XCTAssertEqual(unused, [], "\(name): tower weights the model did not use")
        let ioPath = io ?? "\(folder)/io.safetensors"
        let file = try SafeTensorsFile(path: ioPath)
        let output = try model(ids: file.tensor("input_ids"), attentionMask: rows(file.tensor("attention_mask")))
        try check(output, io: ioPath, name)
        return model
    }

    func testChineseCLIPTextModel() throws {
        let model = try checkBert("chinese_clip_text")
        XCTAssertEqual(model.config.modelType, "chinese_clip_text_model")
        XCTAssertEqual(model.config.positionIDs, .absolute)
        XCTAssertEqual(model.config.layerNormEps, 1e-12)
    }

    func testFullChineseCLIPModelReadsTextConfigAndPrefix() throws {
        let model = try checkBert("chinese_clip_full")
        XCTAssertEqual(model.config.hiddenSize, 24)
        XCTAssertEqual(model.config.layers, 3)
        XCTAssertEqual(model.config.layerNormEps, 1e-5)
    }

    func testBertUnderPretrainingPrefix() throws {
        _ = try checkBert("bert_prefixed")
    }

    func testBertFromTorchSaveFile() throws {
        _ = try checkBert("bert_bin", io: "\(root)/bert_prefixed/io.safetensors")
    }

    /// cn_clip's own layout: its `text_*` model config and a training checkpoint (.pt, state_dict under
    /// `module.bert.` beside the vision tower). The same weights as chinese_clip_text.
    func testCNCLIPCheckpointLayout() throws {
        let folder = "\(root)/cn_clip_pt"
        let (model, unused) = try BertTextModel.load(config: "\(folder)/RoBERTa-wwm-ext-tiny-chinese.json",
                                                     weights: "\(folder)/clip_cn_tiny.pt", backend: backend)
        XCTAssertEqual(unused, [])
        XCTAssertEqual(model.config.hiddenSize, 32)
        XCTAssertEqual(model.config.layerNormEps, 1e-12)
        let io = try SafeTensorsFile(path: "\(root)/chinese_clip_text/io.safetensors")
        let output = try model(ids: io.tensor("input_ids"), attentionMask: rows(io.tensor("attention_mask")))
        try check(output, io: "\(root)/chinese_clip_text/io.safetensors", "cn_clip .pt")
    }

    func testXLMRobertaWithPaddingAwarePositions() throws {
        let folder = "\(root)/xlm_roberta"
        let (model, unused) = try XLMRobertaTextModel.load(folder: folder, backend: backend)
        XCTAssertEqual(unused, [])
        XCTAssertEqual(model.config.positionIDs, .paddingAware(paddingIndex: 1))
        XCTAssertEqual(model.config.maxSequenceLength, 14)
        let io = try SafeTensorsFile(path: "\(folder)/io.safetensors")
        let output = try model(ids: io.tensor("input_ids"), attentionMask: rows(io.tensor("attention_mask")))
        try check(output, io: "\(folder)/io.safetensors", "xlm_roberta")
    }

    /// transformers 5 zeroes the padding rows on load; the checkpoint's values are the truth.
    func testPaddingRowsKeepTheFileValues() throws {
        let folder = "\(root)/chinese_clip_text"
        let (model, _) = try BertTextModel.load(folder: folder, backend: backend)
        let file = try SafeTensorsFile(path: "\(folder)/model.safetensors").tensor("embeddings.word_embeddings.weight")
        let width = file.shape[1]
        let padRow = Array(try backend.downloadFloats(model.wordEmbeddings)[0..<width])
        XCTAssertEqual(padRow, Array(file.floats()[0..<width]))
        XCTAssertTrue(padRow.contains { $0 != 0 })
    }

    func testPipelineRootFolder() throws {
        let scratch = ScratchDirectory()
        scratch.write("{}", to: "model_index.json")
        XCTAssertEqual(symlink("\(root)/chinese_clip_text", scratch.file("text_encoder")), 0)
        let (model, _) = try BertTextModel.load(folder: scratch.path, backend: backend)
        XCTAssertEqual(model.config.hiddenSize, 32)
    }

    func testRefusals() throws {
        assertThrowsError(containing: ["'model_type': \"chinese_clip_text_model\" is not an XLM-R model"]) {
            try XLMRobertaTextModel.load(folder: "\(root)/chinese_clip_text", backend: backend)
        }
        let (model, _) = try BertTextModel.load(folder: "\(root)/chinese_clip_text", backend: backend)
        assertThrowsError(containing: ["token id 128 is outside the vocabulary of 128"]) {
            try model(ids: HostTensor(ids: [101, 128], shape: [1, 2]))
        }
        assertThrowsError(containing: ["17 tokens, more than the 16"]) {
            try model(ids: HostTensor(ids: Array(repeating: 5, count: 17), shape: [1, 17]))
        }
        assertThrowsError(containing: ["attention mask must be [1, 2]"]) {
            try model(ids: HostTensor(ids: [101, 102], shape: [1, 2]), attentionMask: [[1, 1, 1]])
        }
        let scratch = ScratchDirectory()
        scratch.write(#"{"model_type": "t5", "vocab_size": 10}"#, to: "config.json")
        assertThrowsError(containing: ["'model_type': \"t5\" is not a BERT or XLM-R text encoder"]) {
            try BertTextModel.load(folder: scratch.path, backend: backend)
        }
        scratch.write(#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "position_embedding_type": "relative_key"}"#, to: "config.json")
        assertThrowsError(containing: ["'position_embedding_type': \"relative_key\""]) {
            try BertTextModel.load(folder: scratch.path, backend: backend)
        }
        scratch.write(#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#, to: "config.json")
        assertThrowsError(containing: ["no weights found", "model.safetensors", "pytorch_model.bin"]) {
            try BertTextModel.load(folder: scratch.path, backend: backend)
        }
    }

    // MARK: Encoder + tokenizer + adapter

    /// Stands in for the WordPiece tokenizer: the fixture's rows for three texts ("" is [CLS] [SEP] + padding).
    struct FixtureTokenizer: PaddingTokenizer {
        let rows: [String: (ids: [Int], mask: [Int])]
        func callAsFunction(_ text: String, maxLength: Int) -> (ids: [Int], attentionMask: [Int], truncatedText: String?) {
            let row = rows[text]!
            precondition(row.ids.count == maxLength)
            return (row.ids, row.mask, text == "long" ? "cut" : nil)
        }
    }

    func fixtureEncoder() throws -> (TokenizedTextEncoder<FixtureTokenizer>, SafeTensorsFile) {
        let io = try SafeTensorsFile(path: "\(root)/pea_conditioning.safetensors")
        let ids = rows(try io.tensor("input_ids")), masks = rows(try io.tensor("attention_mask"))
        let tokenizer = FixtureTokenizer(rows: ["first": (ids[0], masks[0]), "long": (ids[1], masks[1]), "": (ids[2], masks[2])])
        let (model, _) = try BertTextModel.load(folder: "\(root)/chinese_clip_text", backend: backend)
        return (try TokenizedTextEncoder(tokenizer: tokenizer, model: model, maxLength: ids[0].count, displayName: "Chinese-CLIP"), io)
    }

    func slice(_ tensor: HostTensor, rows selected: [Int]) -> [Float] {
        let values = tensor.floats(), width = tensor.count / tensor.shape[0]
        return selected.flatMap { values[($0 * width)..<(($0 + 1) * width)] }
    }

    func testPEAConditionerMatchesReferenceEndToEnd() throws {
        let (encoder, io) = try fixtureEncoder()
        for form in ["sd1", "sdxl"] {
            let adapter = try PEAAdapter.load(path: "\(root)/adapter_\(form)/pytorch_model.bin", backend: backend)
            let conditioner = try PEAConditioner(encoder: encoder, adapter: adapter)
            var warnings: [String] = []
            let result = try conditioner.encode(["first", "long", ""], warn: { warnings.append($0) })
            XCTAssertEqual(warnings, ["The following part of your input was truncated because Chinese-CLIP can only handle sequences up to 12 tokens: cut"])
            let sequence = try io.tensor("out.\(form).sequence")
            XCTAssertEqual(result.states.shape, sequence.shape)
            assertClose(try backend.downloadFloats(result.states), sequence.floats(), .f32, "\(form) sequence")
            if form == "sdxl" {
                let pooled = try io.tensor("out.sdxl.pooled")
                let actual = try XCTUnwrap(result.pooled)
                XCTAssertEqual(actual.shape, pooled.shape)
                assertClose(try backend.downloadFloats(actual), pooled.floats(), .f32, "sdxl pooled")
            } else {
                XCTAssertNil(result.pooled)
            }
            // No negative prompt → the adapted empty prompt (row 2), never zeros.
            let negative = try conditioner.encodeNegative(nil, count: 2, warn: { _ in })
            assertClose(try backend.downloadFloats(negative.states), slice(sequence, rows: [2, 2]), .f32, "\(form) empty prompt")
            if form == "sdxl" {
                assertClose(try backend.downloadFloats(XCTUnwrap(negative.pooled)), slice(try io.tensor("out.sdxl.pooled"), rows: [2, 2]), .f32, "sdxl empty pooled")
            }
            let explicit = try conditioner.encodeNegative(["first"], count: 1, warn: { _ in })
            assertClose(try backend.downloadFloats(explicit.states), slice(sequence, rows: [0]), .f32, "\(form) explicit negative")
        }
    }

    func testTokenizeGivesIdsAndMasks() throws {
        let (encoder, io) = try fixtureEncoder()
        let tokens = encoder.tokenize(["first", ""])
        XCTAssertEqual(tokens.ids.integers()!, Array(try io.tensor("input_ids").integers()![0..<12]) + Array(try io.tensor("input_ids").integers()![24..<36]))
        XCTAssertEqual(tokens.attentionMask.shape, [2, 12])
        XCTAssertEqual(tokens.truncated.count, 2)
        assertThrowsError(containing: ["maxLength must be in 2...16"]) {
            try TokenizedTextEncoder(tokenizer: encoder.tokenizer, model: encoder.model, maxLength: 17, displayName: "x")
        }
    }

    /// The factories with the real tokenizers (the tokenizer fixtures' cn_clip vocab.txt and XLM-R files) beside the
    /// tiny models, in a pipeline-style folder (tokenizer/ + text_encoder/). The empty prompt tokenizes to the
    /// fixtures' third row ([CLS] [SEP] / <s> </s>, then padding), so its states are transformers'.
    func testLanguageEncodersWithRealTokenizers() throws {
        for (tokenizer, model, kind) in [("cn_clip", "chinese_clip_text", "Chinese-CLIP"), ("xlmr_small", "xlm_roberta", "XLM-R")] {
            let scratch = ScratchDirectory()
            scratch.write("{}", to: "model_index.json")
            XCTAssertEqual(symlink(fixturesDirectory() + "/tokenizers/\(tokenizer)", scratch.file("tokenizer")), 0)
            XCTAssertEqual(symlink("\(root)/\(model)", scratch.file("text_encoder")), 0)
            let encoder = try LanguageEncoders.load(folder: scratch.path, backend: backend, maxLength: 12)
            let states = try encoder.encode(["", ""], warn: { XCTFail("\(kind): \($0)") })
            let expected = try SafeTensorsFile(path: "\(root)/\(model)/io.safetensors").tensor("out.last_hidden_state")
            XCTAssertEqual(states.shape, [2, 12, encoder.hiddenSize], kind)
            assertClose(try backend.downloadFloats(states), slice(expected, rows: [2, 2]), .f32, "\(kind) empty prompt")
        }
        assertThrowsError(containing: ["no tokenizer files (vocab.txt)"]) {
            try LanguageEncoders.chineseCLIP(folder: "\(root)/chinese_clip_text", backend: backend)
        }
    }

    func testConditionerRefusesMismatchedWidths() throws {
        let (model, _) = try BertTextModel.load(folder: "\(root)/chinese_clip_full", backend: backend)   // 24 wide
        let encoder = try TokenizedTextEncoder(tokenizer: FixtureTokenizer(rows: [:]), model: model, maxLength: 12, displayName: "x")
        let adapter = try PEAAdapter.load(path: "\(root)/adapter_sd1/adapter.safetensors", backend: backend)     // reads 32
        assertThrowsError(containing: ["24 wide", "reads 32"]) { try PEAConditioner(encoder: encoder, adapter: adapter) }
    }
}
