import Foundation
import XCTest
@testable import PEADiffusion

/// PEA at inference, against diffusers: a Chinese prompt through a Chinese-CLIP tower and a PEA adapter in
/// front of the tiny SD1 and SDXL pipelines (tools/reference/make_pea_pipeline_fixtures.py), images within
/// docs/testing.md's 8-bit tolerance.
final class PEAPipelineParityTests: XCTestCase {
    struct Case: Decodable {
        let name, pipeline, adapter, prompt, images: String
        let negative_prompt: String?
        let steps, seed, width, height, batch: Int
        let guidance: Float
        let scheduler: String?
    }

    let directory = fixturesDirectory() + "/pea"

    func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    func maxDifference(_ images: [[UInt8]], _ expected: HostTensor) -> Int {
        let reference = expected.integers()!
        var worst = 0
        for (n, pixels) in images.enumerated() {
            for (i, value) in pixels.enumerated() { worst = max(worst, abs(Int(value) - reference[n * pixels.count + i])) }
        }
        return worst
    }

    func testAdaptedChinesePromptsMatchDiffusers() throws {
        let backend = CPUBackend()
        let encoder = try LanguageEncoders.load(folder: directory + "/zh_encoder", backend: backend)
        for c in try cases() {
            let conditioner = try PEAConditioner(encoder: encoder, adapter: PEAAdapter.load(path: directory + "/" + c.adapter, backend: backend))
            let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/" + c.pipeline, backend: backend,
                                                            scheduler: c.scheduler, conditioner: conditioner)
            var request = GenerationRequest(prompt: c.prompt, negativePrompt: c.negative_prompt, width: c.width, height: c.height)
            request.steps = c.steps
            request.guidance = c.guidance
            request.seed = UInt64(c.seed)
            request.imagesPerPrompt = c.batch
            let images = try pipeline.generate(request)
            let expected = try SafeTensorsFile(path: directory + "/" + c.images).tensor("images")
            XCTAssertEqual(images.count, expected.shape[0], c.name)
            XCTAssertLessThanOrEqual(maxDifference(images.map(\.pixels), expected), 1, "\(c.name): max |Δ| in 8-bit steps")
        }
    }

    func testGenerateCommandWithTextEncoderAndAdapter() throws {
        let c = try XCTUnwrap(try cases().first { $0.name == "sdxl_zh" })
        let scratch = ScratchDirectory("pea-generate-zh")
        let output = scratch.file("zh.png")
        let result = try runPea(["generate", "--model", fixturesDirectory() + "/pipelines/sdxl", "--prompt", c.prompt,
                                 "--text-encoder", directory + "/zh_encoder", "--adapter", directory + "/" + c.adapter,
                                 "--steps", "\(c.steps)", "--guidance", "\(c.guidance)", "--seed", "\(c.seed)",
                                 "--width", "\(c.width)", "--height", "\(c.height)", "--output", output])
        XCTAssertEqual(result.status, 0, result.stderr)
        let image = try PNGReader.read(path: output)
        XCTAssertLessThanOrEqual(maxDifference([image.pixels], try SafeTensorsFile(path: directory + "/" + c.images).tensor("images")), 1)
        XCTAssertTrue(try XCTUnwrap(image.text("parameters")).hasPrefix(c.prompt))

        let unpaired = try runPea(["generate", "--model", fixturesDirectory() + "/pipelines/sdxl", "--prompt", "x",
                                   "--adapter", directory + "/" + c.adapter, "--output", output + ".2.png"])
        XCTAssertEqual(unpaired.status, 2, unpaired.stderr)
    }

    func testEvalTextEncoderOnChineseCLIP() throws {
        let scratch = ScratchDirectory("pea-eval-zh")
        let output = scratch.file("zh.safetensors")
        let result = try runPea(["eval", "text-encoder", "--model", directory + "/zh_encoder", "--prompt", "一只猫",
                                 "--prompt", "", "--output", output])
        XCTAssertEqual(result.status, 0, result.stderr)
        let written = try SafeTensorsFile(path: output)
        XCTAssertEqual(try written.tensor("input_ids").shape, [2, 52])
        XCTAssertEqual(try written.tensor("attention_mask").shape, [2, 52])
        XCTAssertEqual(try written.tensor("last_hidden_state").shape, [2, 52, 16])
    }
}
