import XCTest
@testable import PEADiffusion

/// Issue #16, numbers: a config value out of its range, or a number that is not finite as the float32 it is
/// used as, is an error naming the file and the field (or the option) where it is read, never a trap at the
/// end of generation or a division by zero.
final class RobustnessNumbersTests: XCTestCase {
    let sd1 = fixturesDirectory() + "/pipelines/sd1"

    /// The fixture's `component/config.json` (or another file) with `changes` applied, written into `scratch`
    /// under the same relative path; returns the path written.
    @discardableResult
    func writeChangedConfig(_ relativePath: String, _ changes: [String: JSONValue], in scratch: ScratchDirectory) throws -> String {
        var values = try ConfigFile(path: sd1 + "/" + relativePath).values
        values.merge(changes) { $1 }
        let folder = scratch.file(String(relativePath.split(separator: "/").dropLast().joined(separator: "/")))
        mkdir(folder, 0o755)
        return scratch.write(JSONValue.object(values).serialized(), to: relativePath)
    }

    // MARK: Class 2: config integers (and floats) checked where they are read

    func testModelConfigFieldsOutOfRangeNameTheFileAndTheKey() throws {
        let scratch = ScratchDirectory("pea-numbers")
        let cases: [(file: String, key: String, value: JSONValue, read: (ConfigFile) throws -> Any)] = [
            ("unet/config.json", "attention_head_dim", .number(0), { try UNetConfig($0) }),
            ("unet/config.json", "norm_num_groups", .number(0), { try UNetConfig($0) }),
            ("unet/config.json", "layers_per_block", .number(-1), { try UNetConfig($0) }),
            // make fuzz found this one: a model is built with that many layers before its weights are read
            ("unet/config.json", "layers_per_block", .number(1e12), { try UNetConfig($0) }),
            ("unet/config.json", "transformer_layers_per_block", .number(1e12), { try UNetConfig($0) }),
            ("unet/config.json", "norm_eps", .number(.nan), { try UNetConfig($0) }),
            ("vae/config.json", "norm_num_groups", .number(0), { try AutoencoderKLConfig($0) }),
            ("vae/config.json", "layers_per_block", .number(-1), { try AutoencoderKLConfig($0) }),
            ("vae/config.json", "layers_per_block", .number(1e12), { try AutoencoderKLConfig($0) }),
            ("vae/config.json", "scaling_factor", .number(0), { try AutoencoderKLConfig($0) }),
            ("vae/config.json", "scaling_factor", .number(1e300), { try AutoencoderKLConfig($0) }),
            ("vae/config.json", "scaling_factor", .number(1e-40), { try AutoencoderKLConfig($0) }),   // 1 / it is infinite
            ("text_encoder/config.json", "num_attention_heads", .number(0), { try CLIPTextConfig($0) }),
            ("text_encoder/config.json", "num_hidden_layers", .number(0), { try CLIPTextConfig($0) }),
            ("text_encoder/config.json", "num_hidden_layers", .number(1e12), { try CLIPTextConfig($0) }),
            ("text_encoder/config.json", "layer_norm_eps", .number(.infinity), { try CLIPTextConfig($0) }),
        ]
        for (file, key, value, read) in cases {
            let path = try writeChangedConfig(file, [key: value], in: scratch)
            assertThrowsError(containing: [path, "'\(key)'"]) { try read(ConfigFile(path: path)) }
        }
    }

    func testBertConfigCountsAreChecked() throws {
        let scratch = ScratchDirectory("pea-numbers")
        let original = try ConfigFile(path: fixturesDirectory() + "/pea/zh_encoder/config.json").values
        for (key, range) in [("num_attention_heads", "at least 1"), ("num_hidden_layers", "in 1...4096"), ("hidden_size", "at least 1")] {
            var values = original
            values[key] = .number(0)
            let path = scratch.write(JSONValue.object(values).serialized(), to: "config.json")
            assertThrowsError(containing: [path, "'\(key)'", range]) { try BertTextConfig(ConfigFile(path: path)) }
        }
    }

    func testTokenizerModelMaxLengthMustHoldStartAndEndTokens() throws {
        let scratch = ScratchDirectory("pea-numbers")
        for name in ["merges.txt", "special_tokens_map.json", "vocab.json"] {
            scratch.write(try XCTUnwrap(readFileBytes(sd1 + "/tokenizer/" + name)), to: name)
        }
        for length in [0.0, 1, 2.5] {
            var values = try ConfigFile(path: sd1 + "/tokenizer/tokenizer_config.json").values
            values["model_max_length"] = .number(length)
            let path = scratch.write(JSONValue.object(values).serialized(), to: "tokenizer_config.json")
            assertThrowsError(containing: [path, "'model_max_length'", "at least 2"]) { try CLIPTokenizer(folder: scratch.path) }
        }
    }

    func testBenchUNetConfigIsCheckedBeforeBuilding() throws {
        let scratch = ScratchDirectory("pea-numbers")
        let path = try writeChangedConfig("unet/config.json", ["attention_head_dim": .number(0)], in: scratch)
        let result = try runPea(["bench", "unet", "--config", path, "--latent", "8x8", "--repeats", "1", "--backend", "cpu"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains(path) && result.stderr.contains("'attention_head_dim'"), result.stderr)
    }

    // MARK: Class 1: non-finite numbers never reach the 8-bit conversion

    func testSchedulerBetasMustBeInTheOpenUnitInterval() throws {
        let scratch = ScratchDirectory("pea-numbers")
        let cases: [(changes: [String: JSONValue], key: String)] = [
            (["beta_start": .number(.nan)], "beta_start"),
            (["beta_schedule": .string("linear"), "beta_end": .number(1.5)], "beta_end"),
            (["beta_start": .number(0)], "beta_start"),
            (["sigma_min": .number(.nan)], "sigma_min"),
            (["trained_betas": .array(Array(repeating: .number(0.01), count: 999) + [.number(1)])], "trained_betas[999]"),
            // Every β in (0, 1), but ᾱ underflows float32 to 0 long before the last timestep.
            (["beta_schedule": .string("linear"), "beta_start": .number(0.5), "beta_end": .number(0.9)], "beta_schedule"),
        ]
        for (changes, key) in cases {
            let path = try writeChangedConfig("scheduler/scheduler_config.json", changes, in: scratch)
            // sigma_min is read only by the sigma-based schedulers.
            for scheduler in key == "sigma_min" ? ["euler", "dpmpp-2m"] : ["pndm", "ddim", "euler", "dpmpp-2m"] {
                assertThrowsError(containing: [path, "'\(key)'"]) { try makeScheduler(name: scheduler, config: ConfigFile(path: path)) }
            }
        }
    }

    func testDecodeRefusesNonFiniteLatentsAndTheConversionIsTotal() throws {
        let backend = CPUBackend()
        let pipeline = try StableDiffusionPipeline.load(folder: sd1, backend: backend)
        for bad in [Float.nan, .infinity] {
            var values = [Float](repeating: 0.1, count: 1 * 4 * 2 * 2)
            values[5] = bad
            let latents = try backend.upload(values, shape: [1, 4, 2, 2])
            assertThrowsError(containing: ["latents are not finite after the 7 denoising steps", "likely cause"]) {
                try pipeline.decode(latents, afterSteps: 7)
            }
        }
        var request = GenerationRequest(prompt: "x", width: 16, height: 16)
        request.guidance = .infinity
        assertThrowsError(containing: ["guidance must be finite"]) { try pipeline.generate(request) }
        XCTAssertEqual(eightBitSample(.nan), 0)
        XCTAssertEqual(eightBitSample(.infinity), 255)
        XCTAssertEqual(eightBitSample(-.infinity), 0)
        XCTAssertEqual(eightBitSample(0), 128)
    }

    func testAdapterWeightsMustBeFiniteInTheLoadedDType() throws {
        let scratch = ScratchDirectory("pea-numbers")
        let backend = CPUBackend()
        let adapter = try PEAAdapter.initialized(widths: [4, 8], backend: backend, seed: 1)
        for (bad, dtype) in [(Float.nan, DType.f32), (1e6, .f16)] {
            let tensors = try adapter.namedParameters.map { name, tensor in
                var values = try backend.download(tensor).floats()
                if name == "projector.0.weight" { values[3] = bad }
                return (name: name, tensor: HostTensor(values, shape: tensor.shape))
            }
            let path = scratch.file("adapter.safetensors")
            try SafeTensorsWriter.write(tensors, to: path)
            assertThrowsError(containing: [path, "'projector.0.weight'", "not finite in \(dtype)"]) {
                try PEAAdapter.load(path: path, backend: backend, dtype: dtype)
            }
        }
    }

    func testGuidanceMustBeFiniteAsAFloat() throws {
        let scratch = ScratchDirectory("pea-numbers")
        let output = scratch.file("out.png")
        let result = try runPea(["generate", "--model", sd1, "--prompt", "x", "--guidance", "1e300", "--steps", "1",
                                 "--width", "16", "--height", "16", "--output", output, "--backend", "cpu"])
        XCTAssertEqual(result.status, 2, result.stderr)
        XCTAssertTrue(result.stderr.contains("--guidance") && result.stderr.contains("finite in float32"), result.stderr)
        XCTAssertEqual(scratch.entries(), [])
    }

    // MARK: Class 11: messages that name the real problem

    func testZeroTextEncoderLayersIsAConfigErrorNotAClipSkipOne() throws {
        let scratch = ScratchDirectory("pea-numbers")
        for entry in listDirectory(sd1) where entry != "text_encoder" { symlink(sd1 + "/" + entry, scratch.file(entry)) }
        let config = try writeChangedConfig("text_encoder/config.json", ["num_hidden_layers": .number(0)], in: scratch)
        symlink(sd1 + "/text_encoder/model.safetensors", scratch.file("text_encoder/model.safetensors"))
        assertThrowsError(containing: [config, "'num_hidden_layers'", "in 1...4096"]) {
            try StableDiffusionPipeline.load(folder: scratch.path, backend: CPUBackend())
        }
        let result = try runPea(["generate", "--model", scratch.path, "--prompt", "x", "--steps", "1", "--width", "16",
                                 "--height", "16", "--output", scratch.file("out.png"), "--backend", "cpu"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains("num_hidden_layers") && !result.stderr.contains("clip"), result.stderr)
    }

    func testPromptsDirectoryIsReportedAsADirectory() throws {
        let scratch = ScratchDirectory("pea-numbers")
        let result = try runPea(["generate", "--model", sd1, "--prompts", scratch.path, "--output-dir", scratch.file("out")])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.stderr.contains(scratch.path) && result.stderr.contains("is a directory"), result.stderr)
        XCTAssertFalse(result.stderr.contains("empty"), result.stderr)
        XCTAssertEqual(scratch.entries(), [])
    }
}
