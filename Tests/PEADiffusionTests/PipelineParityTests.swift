import Foundation
import XCTest
@testable import PEADiffusion

/// Whole text-to-image runs against diffusers, on the tiny pipelines of tools/reference/make_pipeline_fixtures.py:
/// the same folder, prompt, seed and settings must give the same 8-bit image (docs/testing.md: max |Δ| ≤ 1/255,
/// mean |Δ| ≤ 0.02/255).
final class PipelineParityTests: XCTestCase {
    struct Case: Decodable {
        let name, pipeline, prompt, images: String
        let negative_prompt: String?
        let steps, seed, width, height, batch: Int
        let guidance: Float
        let scheduler: String?

        /// The generation the case asks for.
        var request: GenerationRequest {
            var request = GenerationRequest(prompt: prompt, negativePrompt: negative_prompt, width: width, height: height)
            request.steps = steps
            request.guidance = guidance
            request.seed = UInt64(seed)
            request.imagesPerPrompt = batch
            return request
        }
    }

    static let directory = fixturesDirectory() + "/pipelines"

    static func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    /// Reference pixels [N, H, W, 3].
    func expectedImages(_ c: Case) throws -> HostTensor {
        try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images")
    }

    func testEveryCaseMatchesDiffusers() throws {
        let backend = CPUBackend()
        let cases = try Self.cases()
        XCTAssertEqual(Set(cases.map(\.pipeline)), ["sd1", "sd2", "sdxl"])
        XCTAssertEqual(Set(cases.compactMap(\.scheduler)).union(["pndm", "euler"]), Set(SchedulerName.allCases.map(\.rawValue)),
                       "every scheduler runs in at least one case (PNDM and Euler as the SD1 and SDXL folders' own)")
        for c in cases {
            let pipeline = try StableDiffusionPipeline.load(folder: Self.directory + "/" + c.pipeline, backend: backend, scheduler: c.scheduler)
            XCTAssertEqual(pipeline.family, ["sd1": .sd1, "sd2": .sd2, "sdxl": .sdxl][c.pipeline])
            let request = c.request
            var warnings: [String] = []
            let images = try pipeline.generate(request, warn: { warnings.append($0) })
            assertSameImages(images, try expectedImages(c), c.name)
            if c.name.contains("long_prompt") {
                XCTAssertTrue(warnings.contains { $0.contains("truncated") }, "\(c.name): no truncation warning")
            }
        }
    }

    /// diffusers called with lists of prompts and negative prompts and a list of generators
    /// (tools/reference/make_batched_pipeline_fixtures.py): one request per prompt, denoised together, each with
    /// its own seed, its own negative prompt; a repeated prompt is encoded once and still makes its own image.
    func testBatchedRequestsMatchDiffusersListOfGenerators() throws {
        let cases = try Self.batchedCases()
        XCTAssertEqual(cases.count, 3)
        for c in cases {
            let pipeline = try StableDiffusionPipeline.load(folder: Self.directory + "/" + c.pipeline, backend: CPUBackend(), scheduler: c.scheduler)
            let images = try pipeline.generate(c.requests)
            XCTAssertEqual(images.map(\.count), Array(repeating: 1, count: c.prompts.count), c.name)
            assertSameImages(images.flatMap { $0 }, try c.expectedImages(), c.name)
        }
    }

    /// A case of tools/reference/make_batched_pipeline_fixtures.py: diffusers called once with lists of prompts
    /// and negative prompts and one generator per prompt.
    struct BatchedCase: Decodable {
        let name, pipeline, images: String
        let prompts: [String]
        let negative_prompts: [String]?
        let seeds: [Int]
        let steps, width, height: Int
        let guidance: Float
        let scheduler: String?

        var requests: [GenerationRequest] {
            prompts.indices.map { i in
                var request = GenerationRequest(prompt: prompts[i], negativePrompt: negative_prompts?[i], width: width, height: height)
                request.steps = steps
                request.guidance = guidance
                request.seed = UInt64(seeds[i])
                return request
            }
        }

        /// Reference pixels [N, H, W, 3].
        func expectedImages() throws -> HostTensor {
            try SafeTensorsFile(path: PipelineParityTests.directory + "/batched/" + images).tensor("images")
        }
    }

    static func batchedCases() throws -> [BatchedCase] {
        try JSONDecoder().decode([BatchedCase].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/batched/cases.json")))
    }

    func testRequestsOfDifferentSizesAreNotDenoisedTogether() throws {
        let pipeline = try StableDiffusionPipeline.load(folder: Self.directory + "/sd1", backend: CPUBackend())
        let requests = [GenerationRequest(prompt: "x", width: 32, height: 32), GenerationRequest(prompt: "y", width: 24, height: 32)]
        XCTAssertThrowsError(try pipeline.generate(requests)) { error in
            XCTAssertTrue("\(error)".contains("must share size, steps and guidance"), "\(error)")
        }
    }

    func testSizesThatAreNotMultiplesOf8AreRejected() throws {
        let pipeline = try StableDiffusionPipeline.load(folder: Self.directory + "/sd1", backend: CPUBackend())
        for (width, height) in [(30, 24), (24, 12), (0, 16)] {
            XCTAssertThrowsError(try pipeline.generate(GenerationRequest(prompt: "x", width: width, height: height))) { error in
                XCTAssertTrue("\(error)".contains("multiple"), "\(error)")
            }
        }
    }
}
