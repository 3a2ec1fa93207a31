import Foundation
import XCTest
@testable import PEADiffusion

/// `pea eval` as a user runs it: the built executable on the diffusers fixtures, its output file compared
/// with diffusers, and bad input turned into a clear error, a non-zero exit and no output file.
final class EvalCommandTests: XCTestCase {
    func model(_ name: String) -> String { fixturesDirectory() + "/models/" + name }

    func testEvalUNetWritesOutputAndFeaturesMatchingDiffusers() throws {
        let scratch = ScratchDirectory("pea-eval")
        let output = scratch.file("out.safetensors")
        let io = model("unet_sdxl") + "/io.safetensors"
        let result = try runPea(["eval", "unet", "--model", model("unet_sdxl"), "--inputs", io, "--output", output,
                                 "--features", "--backend", "cpu", "--threads", "2"])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines), output)
        let written = try SafeTensorsFile(path: output), reference = try SafeTensorsFile(path: io)
        let expectedNames = reference.names.filter { $0.hasPrefix("out.") }.map { String($0.dropFirst(4)) }
        XCTAssertEqual(Set(written.names), Set(expectedNames))
        for name in expectedNames {
            let actual = try written.tensor(name), expected = try reference.tensor("out." + name)
            XCTAssertEqual(actual.dtype, .f32)
            XCTAssertEqual(actual.shape, expected.shape, name)
            assertClose(actual.floats(), expected.floats(), .f32, "eval unet \(name)")
        }
    }

    func testEvalVAEEncodeAndDecodeFromAPipelineRoot() throws {
        // A pipeline root (model_index.json + vae/) is accepted wherever a component is.
        let scratch = ScratchDirectory("pea-eval")
        scratch.write("{\"_class_name\": \"StableDiffusionPipeline\", \"vae\": [\"diffusers\", \"AutoencoderKL\"]}", to: "model_index.json")
        try FileManager.default.createSymbolicLink(atPath: scratch.file("vae"), withDestinationPath: model("vae"))
        let io = model("vae") + "/io.safetensors"
        let reference = try SafeTensorsFile(path: io)
        for (command, outputs) in [("vae-encode", [("latent_mean", "latent_mean"), ("latent_logvar", "latent_logvar")]),
                                   ("vae-decode", [("sample", "sample")])] {
            let output = scratch.file("\(command).safetensors")
            let result = try runPea(["eval", command, "--model", scratch.path, "--inputs", io, "--output", output])
            XCTAssertEqual(result.status, 0, result.stderr)
            let written = try SafeTensorsFile(path: output)
            for (name, referenceName) in outputs {
                assertClose(try written.tensor(name).floats(), try reference.tensor("out." + referenceName).floats(), .f32, "\(command) \(name)")
            }
        }
    }

    func testBadInputsFailClearlyAndLeaveNoOutput() throws {
        let scratch = ScratchDirectory("pea-eval")
        let output = scratch.file("out.safetensors")
        let vaeInputs = model("vae") + "/io.safetensors"
        let truncated = scratch.write(Array(readFileBytes(vaeInputs)!.prefix(100)), to: "truncated.safetensors")
        let cases: [(arguments: [String], status: Int32, mentions: String)] = [
            (["eval", "unet", "--model", model("unet_sd1"), "--inputs", vaeInputs, "--output", output], 1, "sample"),
            (["eval", "vae-decode", "--model", model("vae"), "--inputs", truncated, "--output", output], 1, "truncated.safetensors"),
            (["eval", "vae-decode", "--model", scratch.path, "--inputs", vaeInputs, "--output", output], 1, scratch.path),
            (["eval", "unet", "--model", model("unet_sd1"), "--inputs", vaeInputs, "--output", output, "--bogus"], 2, "--bogus"),
            (["eval", "vae-decode", "--model", model("vae"), "--inputs", vaeInputs, "--output", output, "--precision", "fp16", "--backend", "cpu"], 2, "fp32"),
            (["eval", "unet", "--model", model("vae"), "--inputs", vaeInputs, "--output", output], 1, "config.json"),
        ]
        for (arguments, status, mentions) in cases {
            let result = try runPea(arguments)
            XCTAssertEqual(result.status, status, "\(arguments): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains("pea: error:") && result.stderr.contains(mentions), "\(arguments): \(result.stderr)")
            XCTAssertFalse(FileManager.default.fileExists(atPath: output), "\(arguments) left an output file")
            XCTAssertEqual(scratch.entries().filter { $0.hasPrefix("out") }, [], "\(arguments) left a temporary file")
        }
    }
}
