import XCTest
@testable import PEADiffusion

/// CLIP text encoders against transformers, on the tiny folders of tools/reference/make_text_encoder_fixtures.py.
final class TextEncoderParityTests: XCTestCase {
    let backend = CPUBackend()

    func checkCLIP(_ name: String) throws {
        let folder = fixturesDirectory() + "/models/" + name
        let (model, unused) = try CLIPTextModel.load(folder: folder, backend: backend)
        XCTAssertEqual(unused, [], "\(name): weights the model did not use")
        let io = try SafeTensorsFile(path: folder + "/io.safetensors")
        let ids = try io.tensor("input_ids")
        let mask: [[Int]]? = try io.contains("attention_mask")
            ? { let m = try io.tensor("attention_mask"); let v = m.integers()!; return (0..<m.shape[0]).map { Array(v[($0 * m.shape[1])..<(($0 + 1) * m.shape[1])]) } }()
            : nil
        let output = try model(ids: ids, attentionMask: mask, keepHiddenStates: true)
        func check(_ actual: Tensor?, _ key: String) throws {
            let expected = try io.tensor("out." + key)
            let actual = try XCTUnwrap(actual, "\(name) \(key)")
            XCTAssertEqual(actual.shape, expected.shape, "\(name) \(key)")
            assertClose(try backend.downloadFloats(actual), expected.floats(), .f32, "\(name) \(key)")
        }
        try check(output.lastHiddenState, "last_hidden_state")
        if io.contains("out.pooler_output") { try check(output.pooled, "pooler_output") }
        if io.contains("out.text_embeds") { try check(output.textEmbeds, "text_embeds") }
        XCTAssertEqual(output.hiddenStates.count, model.config.layers + 1)
        for (i, h) in output.hiddenStates.enumerated() { try check(h, "hidden_states.\(i)") }
    }

    func testCLIPTextModelWithLegacyEOSPooling() throws { try checkCLIP("clip_text_sd1") }

    func testCLIPTextModelWithProjectionAndPaddingMask() throws { try checkCLIP("clip_text_proj") }
}
