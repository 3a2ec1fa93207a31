import Foundation
import XCTest
@testable import PEADiffusion

/// `pea generate` as a user runs it: PNGs equal to diffusers' images, the parameters chunk, paths on stdout,
/// and clear errors with nothing written for bad requests.
final class GenerateCommandTests: XCTestCase {
    let pipelines = fixturesDirectory() + "/pipelines"

    func testGenerateWritesDiffusersImagesWithParameters() throws {
        let scratch = ScratchDirectory("pea-generate")
        let output = scratch.file("batch.png")
        // The fixture case sd1_euler_a_negative_batch, through the command line.
        let result = try runPea(["generate", "--model", pipelines + "/sd1", "--prompt", "an astronaut riding a horse",
                                 "--negative-prompt", "blurry, low quality", "--steps", "5", "--guidance", "6.0",
                                 "--seed", "7", "--width", "24", "--height", "32", "--batch", "2", "--scheduler", "euler-a",
                                 "--output", output, "--backend", "cpu"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let paths = result.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(paths, [scratch.file("batch-1.png"), scratch.file("batch-2.png")])
        let expected = try SafeTensorsFile(path: pipelines + "/sd1_euler_a_negative_batch.safetensors").tensor("images").integers()!
        for (n, path) in paths.enumerated() {
            let image = try PNGReader.read(path: path)
            XCTAssertEqual([image.width, image.height, image.channels], [24, 32, 3])
            let reference = expected[(n * image.pixels.count)..<((n + 1) * image.pixels.count)]
            let worst = zip(image.pixels, reference).map { abs(Int($0) - $1) }.max() ?? 0
            XCTAssertLessThanOrEqual(worst, 1, "\(path) differs from diffusers")
            let parameters = try XCTUnwrap(image.text("parameters"))
            XCTAssertTrue(parameters.hasPrefix("an astronaut riding a horse\nNegative prompt: blurry, low quality\nSteps: 5, Sampler: Euler a, CFG scale: 6.0, Seed: 7, Size: 24x32"), parameters)
        }
        XCTAssertTrue(result.stderr.contains("5 steps"), result.stderr)
    }

    func testPromptsFileAndNonLatinParameters() throws {
        let scratch = ScratchDirectory("pea-generate")
        let prompts = scratch.write("一只戴墨镜的猫\n\n  mountains at dawn  \n", to: "prompts.txt")
        let out = scratch.file("out")
        let result = try runPea(["generate", "--model", pipelines + "/sdxl", "--prompts", prompts, "--steps", "2",
                                 "--width", "16", "--height", "16", "--seed", "1", "--output-dir", out])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(result.stdout.split(separator: "\n").map(String.init), [out + "/000000.png", out + "/000001.png"])
        let first = try PNGReader.read(path: out + "/000000.png")
        XCTAssertTrue(try XCTUnwrap(first.text("parameters")).hasPrefix("一只戴墨镜的猫\nSteps: 2"))
        XCTAssertTrue(try XCTUnwrap(first.text("parameters")).contains("Seed: 1,"))
        let second = try XCTUnwrap(PNGReader.read(path: out + "/000001.png").text("parameters"))
        XCTAssertTrue(second.hasPrefix("mountains at dawn\n") && second.contains("Seed: 2,"), second)
    }

    func testBadRequestsFailClearlyAndWriteNothing() throws {
        let scratch = ScratchDirectory("pea-generate")
        let output = scratch.file("out.png")
        let sd1 = pipelines + "/sd1"
        let cases: [(model: String, extra: [String], status: Int32, mentions: String)] = [
            (sd1, ["--width", "30"], 2, "multiple of 8"),
            (sd1, ["--steps", "0"], 2, "--steps"),
            (sd1, ["--scheduler", "lms"], 2, "lms"),
            (sd1, ["--frobnicate"], 2, "--frobnicate"),
            (scratch.path, [], 1, "model_index.json"),
        ]
        for (model, extra, status, mentions) in cases {
            let arguments = ["generate", "--model", model, "--prompt", "x", "--output", output] + extra
            let result = try runPea(arguments)
            XCTAssertEqual(result.status, status, "\(extra): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains("pea: error:") && result.stderr.contains(mentions), "\(extra): \(result.stderr)")
            XCTAssertEqual(scratch.entries(), [], "\(extra) left files behind")
        }
    }
}
