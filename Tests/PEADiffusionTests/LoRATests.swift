import Foundation
import XCTest
@testable import PEADiffusion

/// `--lora FILE[:SCALE]` against diffusers' `load_lora_weights` + `fuse_lora(lora_scale=…)` on the tiny SD1
/// and SDXL pipelines (tools/reference/make_lora_fixtures.py): PEFT- and kohya-named files for both (SDXL's kohya
/// file in the LDM UNet layout with lora_te1_/lora_te2_), linear, 1×1 and 3×3 (LoCon) LoRAs, UNet and text
/// encoders, alpha ≠ rank, two scales of each kind, two files at once. Images within docs/testing.md's pipeline
/// tolerance.
final class LoRATests: XCTestCase {
    struct Case: Decodable {
        struct File: Decodable {
            let file: String
            let scale: Float
        }
        let name, pipeline, prompt, images: String
        let loras: [File]
        let steps, seed, width, height: Int
        let guidance: Float
    }

    static let directory = fixturesDirectory() + "/lora"
    static let pipeline = fixturesDirectory() + "/pipelines/sd1"

    static func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    func testEveryCaseMatchesDiffusersFuseLoRA() throws {
        let cases = try Self.cases()
        XCTAssertEqual(cases.map(\.pipeline), ["sd1", "sd1", "sd1", "sdxl", "sdxl", "sdxl"])
        for c in cases {
            let lora = try LoRASet(c.loras.map { LoRASpec(path: Self.directory + "/" + $0.file, scale: $0.scale) })
            let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/" + c.pipeline, backend: CPUBackend(),
                                                            lora: lora)
            var request = GenerationRequest(prompt: c.prompt, width: c.width, height: c.height)
            request.steps = c.steps
            request.guidance = c.guidance
            request.seed = UInt64(c.seed)
            let images = try pipeline.generate(request)
            assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
        }
    }

    /// The command line: two --lora options, one with a scale, through `pea generate`'s PNG.
    func testGenerateCommandTakesRepeatedLoRAs() throws {
        let c = try XCTUnwrap(try Self.cases().first { $0.loras.count == 2 })
        let scratch = ScratchDirectory()
        let output = scratch.file("lora.png")
        var arguments = ["generate", "--model", Self.pipeline, "--prompt", c.prompt, "--steps", "\(c.steps)",
                         "--guidance", "\(c.guidance)", "--seed", "\(c.seed)", "--width", "\(c.width)", "--height", "\(c.height)",
                         "--backend", "cpu", "--output", output]
        for file in c.loras { arguments += ["--lora", Self.directory + "/" + file.file + ":\(file.scale)"] }
        let result = try runPea(arguments)
        XCTAssertEqual(result.status, 0, result.stderr)
        let image = try PNGDecoder.decode(path: output).rgb()
        assertSameImages([image], try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
    }

    /// A single-file checkpoint holding the same weights (Tests/Fixtures/single_file/sd1.safetensors, the SD1 folder in
    /// the LDM layout): the LoRA merges into the weights the LDM name tables map, giving the folder's images.
    func testSingleFileCheckpointTakesLoRAs() throws {
        for c in try Self.cases() where c.pipeline == "sd1" {
            let lora = try LoRASet(c.loras.map { LoRASpec(path: Self.directory + "/" + $0.file, scale: $0.scale) })
            let pipeline = try StableDiffusionPipeline.load(checkpoint: fixturesDirectory() + "/single_file/sd1.safetensors",
                                                            options: SingleFileOptions(configFolder: Self.pipeline),
                                                            backend: CPUBackend(), lora: lora).pipeline
            var request = GenerationRequest(prompt: c.prompt, width: c.width, height: c.height)
            request.steps = c.steps
            request.guidance = c.guidance
            request.seed = UInt64(c.seed)
            assertSameImages(try pipeline.generate(request), try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"),
                             "single file " + c.name)
        }
    }

    /// The merge itself, against plain loops over the file's tensors: W + scale · alpha/rank · up·down in f32; with
    /// half-size weights (`CPUBackend(halfWeights:)`, `--weights bf16`) that f32 sum rounded once to bf16.
    func testMergeAddsScaledUpTimesDownAndRoundsHalfWeightsOnce() throws {
        let unet = try SafeTensorsCollection.open(folder: Self.pipeline + "/unet", baseName: "diffusion_pytorch_model", variant: nil)
        let kohya = try SafeTensorsFile(path: Self.directory + "/kohya.safetensors")
        let lora = try LoRASet([LoRASpec(path: kohya.path, scale: 0.7)])
        let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
        let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight"
        let shape = try unet.info(name).shape
        let (out, inner) = (shape[0], shape[1])
        let down = try kohya.tensor(key + ".lora_down.weight").converted(to: .f32).floats()
        let up = try kohya.tensor(key + ".lora_up.weight").converted(to: .f32).floats()
        let alpha = try kohya.tensor(key + ".alpha").converted(to: .f32).floats()[0]
        let rank = down.count / inner
        XCTAssertNotEqual(alpha, Float(rank), "the fixture's alpha differs from its rank")
        var expected = try unet.tensor(name).converted(to: .f32).floats()
        for o in 0..<out {
            for i in 0..<inner {
                var sum: Float = 0
                for k in 0..<rank { sum += up[o * rank + k] * down[k * inner + i] }
                expected[o * inner + i] += 0.7 * alpha / Float(rank) * sum
            }
        }
        let f32 = CPUBackend(), half = CPUBackend(halfWeights: .bf16)
        let merged = try lora.weights(SafeTensorsWeights(unet, backend: f32), component: "unet").matrix(name, shape: shape)
        XCTAssertEqual(merged.dtype, .f32)
        let values = try f32.downloadFloats(merged)
        XCTAssertLessThan(zip(values, expected).map { abs($0 - $1) }.max()!, 1e-5)
        let mergedHalf = try lora.weights(SafeTensorsWeights(unet, backend: half), component: "unet").matrix(name, shape: shape)
        XCTAssertEqual(mergedHalf.dtype, .bf16)
        XCTAssertEqual(try half.download(mergedHalf).bytes, HostTensor(values, shape: shape).converted(to: .bf16).bytes)
    }

    /// The merge on the (emulated) CUDA backend — its GEMM and casts — gives the CPU's merged weight, in f32 and for a
    /// model loading in f16 (`--precision fp16`: merged in f32, stored in f16).
    func testMergeOnTheCUDABackendMatchesTheCPU() throws {
        let cuda = try CUDABackendParityTests.sharedCUDA(), cpu = CPUBackend()
        let unet = try SafeTensorsCollection.open(folder: Self.pipeline + "/unet", baseName: "diffusion_pytorch_model", variant: nil)
        let lora = try LoRASet([LoRASpec(path: Self.directory + "/kohya.safetensors", scale: 0.7)])
        for name in ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight", "up_blocks.1.resnets.1.conv2.weight"] {
            let shape = try unet.info(name).shape
            let reference = try cpu.downloadFloats(lora.weights(SafeTensorsWeights(unet, backend: cpu), component: "unet").matrix(name, shape: shape))
            for dtype in [DType.f32, .f16] {
                let merged = try lora.weights(SafeTensorsWeights(unet, backend: cuda, dtype: dtype), component: "unet").matrix(name, shape: shape)
                XCTAssertEqual(merged.dtype, dtype)
                let values = try cuda.downloadFloats(dtype == .f32 ? merged : cuda.cast(merged, to: .f32))
                let tolerance: Float = dtype == .f32 ? 1e-5 : 2e-3
                XCTAssertLessThan(zip(values, reference).map { abs($0 - $1) }.max()!, tolerance, "\(name) \(dtype)")
            }
        }
    }

    func testScaleParsing() throws {
        XCTAssertEqual(try LoRASpec(parsing: "a.safetensors"), LoRASpec(path: "a.safetensors", scale: 1))
        XCTAssertEqual(try LoRASpec(parsing: "dir/a.safetensors:0.75"), LoRASpec(path: "dir/a.safetensors", scale: 0.75))
        XCTAssertEqual(try LoRASpec(parsing: "a.safetensors:-1"), LoRASpec(path: "a.safetensors", scale: -1))
        for bad in ["a.safetensors:x", "a.safetensors:", "a.safetensors:inf", ":0.5", ""] {
            XCTAssertThrowsError(try LoRASpec(parsing: bad), bad)
        }
    }

    /// Broken and misfitting LoRA files: a clear error naming the file (and the tensor), non-zero exit, no image.
    func testBadLoRAsFailClearly() throws {
        let scratch = ScratchDirectory()
        let output = scratch.file("never.png")
        let good = try SafeTensorsFile(path: Self.directory + "/kohya.safetensors")
        func variant(_ name: String, _ change: (String, HostTensor) -> (String, HostTensor)?) throws -> String {
            let path = scratch.file(name)
            try SafeTensorsWriter.write(try good.names.compactMap { n in change(n, try good.tensor(n)).map { (name: $0.0, tensor: $0.1) } }, to: path)
            return path
        }
        let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
        let bytes = readFileBytes(Self.directory + "/kohya.safetensors")!
        let truncated = scratch.write(Array(bytes.prefix(bytes.count - 100)), to: "truncated.safetensors")
        // rank mismatch: the down factor loses a row
        let rank = try variant("rank.safetensors") { name, t in
            guard name == q + ".lora_down.weight" else { return (name, t) }
            let inner = t.shape[1]
            return (name, HostTensor(Array(t.floats().prefix((t.shape[0] - 1) * inner)), shape: [t.shape[0] - 1, inner]))
        }
        // the right rank, the wrong module size (in 8 → 16)
        let size = try variant("size.safetensors") { name, t in
            guard name == q + ".lora_down.weight" else { return (name, t) }
            return (name, HostTensor(t.floats() + t.floats(), shape: [t.shape[0], t.shape[1] * 2]))
        }
        let nowhere = try variant("nowhere.safetensors") { name, t in
            (name.replacingOccurrences(of: "down_blocks_0_attentions_0", with: "down_blocks_7_attentions_0"), t)
        }
        let foreign = try variant("foreign.safetensors") { name, t in (name.replacingOccurrences(of: "lora_unet_", with: "lycoris_"), t) }
        let halfPair = try variant("half.safetensors") { name, t in name == q + ".lora_up.weight" ? nil : (name, t) }
        let base = ["generate", "--model", Self.pipeline, "--prompt", "x", "--steps", "1", "--backend", "cpu", "--output", output]
        try assertPeaFails([
            (base + ["--lora", truncated], 1, [truncated]),
            (base + ["--lora", rank], 1, [rank, q + ".lora_down.weight"]),
            (base + ["--lora", size], 1, [size, q + ".lora_down.weight", "do not fit"]),
            (base + ["--lora", nowhere], 1, [nowhere, "matches no module"]),
            (base + ["--lora", foreign], 1, [foreign, "lycoris_"]),
            (base + ["--lora", halfPair], 1, [halfPair, q]),
            (base + ["--lora", Self.directory + "/kohya.safetensors:big"], 2, ["'big' is not a scale"]),
            (base + ["--lora", scratch.file("missing.safetensors")], 1, ["missing.safetensors", "no such file"]),
        ], leavesNo: output)
    }
}

extension LoRATests {
    /// With a PEA language encoder the LoRA's text-encoder part has nowhere to go: one warning, the UNet part merged.
    func testPEAEncoderWarnsAndMergesTheUNetPart() throws {
        let pea = fixturesDirectory() + "/pea"
        let scratch = ScratchDirectory()
        let output = scratch.file("zh.png")
        let result = try runPea(["generate", "--model", Self.pipeline, "--prompt", "一只猫", "--steps", "2", "--seed", "1",
                                 "--width", "16", "--height", "16", "--backend", "cpu", "--output", output,
                                 "--text-encoder", pea + "/zh_encoder", "--adapter", pea + "/adapter_sd1.safetensors",
                                 "--lora", Self.directory + "/kohya.safetensors"])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(result.stderr.components(separatedBy: "text-encoder part").count - 1, 1, result.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: output))
    }
}

/// A LoRA saved by diffusers' own writer with its PEFT config in the header (`lora_adapter_metadata`,
/// tools/reference/make_lora_metadata_fixtures.py): r 4 / lora_alpha 8 with a rank_pattern and an alpha_pattern for
/// the UNet, rsLoRA for the text encoder. The config sets each module's scale, as in diffusers' load_lora_weights.
extension LoRATests {
    struct MetadataCase: Decodable {
        let name, file, prompt, images: String
        let scale, guidance: Float
        let steps, seed, width, height: Int
    }

    func testLoRAAdapterMetadataSetsTheScalesAsDiffusers() throws {
        let directory = fixturesDirectory() + "/lora_metadata"
        let cases = try JSONDecoder().decode([MetadataCase].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
        XCTAssertFalse(cases.isEmpty)
        for c in cases {
            let lora = try LoRASet([LoRASpec(path: directory + "/" + c.file, scale: c.scale)])
            let pipeline = try StableDiffusionPipeline.load(folder: Self.pipeline, backend: CPUBackend(), lora: lora)
            var request = GenerationRequest(prompt: c.prompt, width: c.width, height: c.height)
            request.steps = c.steps
            request.guidance = c.guidance
            request.seed = UInt64(c.seed)
            assertSameImages(try pipeline.generate(request), try SafeTensorsFile(path: directory + "/" + c.images).tensor("images"), c.name)
        }
    }

    /// PEFT's pattern lookup: a key names the module or a dotted suffix of it, `^key` the whole name, `.` any character.
    func testPEFTPatternsMatchAsPEFTDoes() throws {
        let config = try XCTUnwrap(try PEFTLoRAConfig.read("""
            {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": false,
             "unet.rank_pattern": {"attn2.to_q": 2, "^mid_block.attn.to_k": 6},
             "unet.alpha_pattern": {"b.to_v": 3}}
            """, path: "x")["unet"])
        XCTAssertEqual(config.rankAndAlpha(module: "down_blocks.0.attn2.to_q").0, 2)
        XCTAssertEqual(config.rankAndAlpha(module: "down_blocks.0.xattn2.to_q").0, 4, "a suffix must start after a dot")
        XCTAssertEqual(config.rankAndAlpha(module: "mid_block.attn.to_k").0, 6)
        XCTAssertEqual(config.rankAndAlpha(module: "up.mid_block.attn.to_k").0, 4, "^ anchors at the start")
        XCTAssertEqual(config.rankAndAlpha(module: "a.b_to_v").1, 3, "'.' in a key is any character")
        XCTAssertEqual(config.rankAndAlpha(module: "a.c.to_v").1, 8)
        for bad in [#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"attn(1|2)": 2}}"#,
                    #"{"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": true}"#, #"{"unet.lora_alpha": 8}"#, "[1"] {
            XCTAssertThrowsError(try PEFTLoRAConfig.read(bad, path: "lora.safetensors"), bad) { error in
                XCTAssertTrue("\(error)".contains("lora.safetensors"), "\(error)")
            }
        }
    }
}
