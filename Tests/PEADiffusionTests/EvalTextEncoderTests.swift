import Foundation
import XCTest
@testable import PEADiffusion

/// `pea eval text-encoder` on the pipelines' CLIP encoders against transformers
/// (Tests/Fixtures/pipelines/<pipeline>_text_encoders.safetensors, from make_pipeline_fixtures.py).
final class EvalTextEncoderTests: XCTestCase {
    let pipelines = fixturesDirectory() + "/pipelines"

    func check(model: String, encoder: String, reference name: String) throws {
        let reference = try SafeTensorsFile(path: pipelines + "/\(name)_text_encoders.safetensors")
        let prompts = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(reference.metadata["prompts"]!.utf8)) as? [String])
        let scratch = ScratchDirectory("pea-eval-text")
        let output = scratch.file("out.safetensors")
        let result = try runPea(["eval", "text-encoder", "--model", model, "--output", output] + prompts.flatMap { ["--prompt", $0] })
        XCTAssertEqual(result.status, 0, result.stderr)
        let written = try SafeTensorsFile(path: output)
        XCTAssertEqual(try written.tensor("input_ids"), try reference.tensor("\(encoder).input_ids"), "\(model) input_ids")
        for key in ["last_hidden_state", "text_embeds"] where reference.contains("\(encoder).\(key)") {
            let expected = try reference.tensor("\(encoder).\(key)"), actual = try written.tensor(key)
            XCTAssertEqual(actual.shape, expected.shape, "\(model) \(key)")
            assertClose(actual.floats(), expected.floats(), .f32, "\(model) \(key)")
        }
        XCTAssertEqual(written.contains("text_embeds"), reference.contains("\(encoder).text_embeds"))
    }

    func testPipelineRootUsesItsTextEncoder() throws {
        try check(model: pipelines + "/sd1", encoder: "text_encoder", reference: "sd1")
    }

    func testSD2EncoderFolderFindsItsSiblingTokenizer() throws {
        try check(model: pipelines + "/sd2/text_encoder", encoder: "text_encoder", reference: "sd2")
    }

    func testSDXLSecondEncoderWithProjection() throws {
        try check(model: pipelines + "/sdxl/text_encoder_2", encoder: "text_encoder_2", reference: "sdxl")
    }

    func testMissingPromptOrFolderFailsClearly() throws {
        let scratch = ScratchDirectory("pea-eval-text")
        let output = scratch.file("out.safetensors")
        var result = try runPea(["eval", "text-encoder", "--model", pipelines + "/sd1", "--output", output])
        XCTAssertEqual(result.status, 2, result.stderr)
        XCTAssertTrue(result.stderr.contains("--prompt"), result.stderr)
        result = try runPea(["eval", "text-encoder", "--model", scratch.path, "--prompt", "x", "--output", output])
        XCTAssertEqual(result.status, 1, result.stderr)
        XCTAssertTrue(result.stderr.contains(scratch.path), result.stderr)
        XCTAssertEqual(scratch.entries(), [])
    }
}
