import Foundation
import XCTest
@testable import PEADiffusion

/// Single-file checkpoints (LDM / A1111 layout) against diffusers' `StableDiffusionPipeline.from_single_file`:
/// the tiny SD1, SD2 and SDXL pipelines converted to one file each by tools/reference/make_single_file_fixtures.py
/// (SDXL's with a second text encoder wider than its first, as diffusers tells them apart by width; its configs
/// and tokenizers in single_file/sdxl_config), loaded with `config=` their folder, must give diffusers' images (docs/testing.md's pipeline tolerance), from
/// the .safetensors and the .ckpt alike, and the name tables must cover every tensor.
final class SingleFileCheckpointTests: XCTestCase {
    struct Case: Decodable {
        let name, pipeline, config, checkpoint, prompt, images: String
        let negative_prompt: String?
        let steps, seed, width, height, batch: Int
        let guidance: Float
        let scheduler: String?
    }

    static let directory = fixturesDirectory() + "/single_file"
    static let sd1Folder = fixturesDirectory() + "/pipelines/sd1"
    static let checkpoints = ["sd1.safetensors", "sd1.ckpt"]
    static func folder(_ pipeline: String) -> String { fixturesDirectory() + "/pipelines/" + pipeline }

    static func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    func testEveryCaseMatchesDiffusersFromSingleFile() throws {
        let cases = try Self.cases()
        XCTAssertEqual(Set(cases.map(\.pipeline)), ["sd1", "sd2", "sdxl"])
        for c in cases {
            for checkpoint in [c.pipeline + ".safetensors", c.pipeline + ".ckpt"] {
                let (pipeline, unused) = try StableDiffusionPipeline.load(
                    checkpoint: Self.directory + "/" + checkpoint, options: SingleFileOptions(configFolder: fixturesDirectory() + "/" + c.config),
                    backend: CPUBackend(), scheduler: c.scheduler)
                XCTAssertEqual(pipeline.family, ["sd1": .sd1, "sd2": .sd2, "sdxl": .sdxl][c.pipeline])
                XCTAssertEqual(unused, [], "\(checkpoint): tensors no layer read")
                var request = GenerationRequest(prompt: c.prompt, negativePrompt: c.negative_prompt, width: c.width, height: c.height)
                request.steps = c.steps
                request.guidance = c.guidance
                request.seed = UInt64(c.seed)
                request.imagesPerPrompt = c.batch
                let images = try pipeline.generate(request)
                assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), "\(checkpoint) \(c.name)")
            }
        }
    }

    /// The tables map the file's names one to one onto the folder's diffusers names, component by component (SD2's
    /// fused open_clip q/k/v: three names from one tensor, checked by the loads above reading every tensor).
    func testNameTablesMapOntoTheFolderNames() throws {
        for pipeline in ["sd1", "sd2"] {
            let folder = Self.folder(pipeline)
            let file = try SafeTensorsFile(path: Self.directory + "/\(pipeline).safetensors")
            let unet = LDMNameTable.unet(try UNetConfig(ConfigFile(path: folder + "/unet/config.json")))
            let vae = LDMNameTable.vae(try AutoencoderKLConfig(ConfigFile(path: folder + "/vae/config.json")))
            var components: [(prefix: String, rename: (String) -> String?, folderFile: String)] = [
                (SingleFileCheckpoint.unetPrefix, unet.rename, "unet/diffusion_pytorch_model.safetensors"),
                (SingleFileCheckpoint.vaePrefix, vae.rename, "vae/diffusion_pytorch_model.safetensors"),
            ]
            if pipeline == "sd1" { components.append((SingleFileCheckpoint.clipPrefix, LDMNameTable.clipText, "text_encoder/model.safetensors")) }
            for (prefix, rename, folderFile) in components {
                let names = file.names.filter { $0.hasPrefix(prefix) }
                let mapped = names.compactMap { rename(String($0.dropFirst(prefix.count))) }
                let folderNames = try SafeTensorsFile(path: folder + "/" + folderFile).names
                let expected = prefix == SingleFileCheckpoint.clipPrefix ? folderNames.compactMap(LDMNameTable.clipText) : folderNames
                XCTAssertEqual(Set(mapped), Set(expected), "\(pipeline) \(prefix)")
                XCTAssertEqual(Set(mapped).count, names.count, "\(pipeline) \(prefix): two names mapped to one")
            }
            let textPrefix = pipeline == "sd1" ? SingleFileCheckpoint.clipPrefix : SingleFileCheckpoint.openCLIPPrefix
            XCTAssertEqual(file.names.filter { name in ![SingleFileCheckpoint.unetPrefix, SingleFileCheckpoint.vaePrefix, textPrefix].contains { name.hasPrefix($0) } },
                           [], "\(pipeline): every tensor of the file belongs to a component")
        }
        // open_clip names diffusers drops: the projection, the logit scale, layers beyond the config's.
        let table = LDMNameTable.openCLIPText(try CLIPTextConfig(ConfigFile(path: Self.folder("sd2") + "/text_encoder/config.json")),
                                              projection: false)
        XCTAssertNil(table.rename("text_projection"))
        XCTAssertNil(table.rename("logit_scale"))
        XCTAssertNil(table.rename("transformer.resblocks.3.ln_1.weight"))
        XCTAssertEqual(table.rename("transformer.resblocks.2.attn.in_proj_weight"), "text_model.encoder.layers.2.self_attn.in_proj.weight")
        XCTAssertEqual(table.rename("positional_embedding"), "text_model.embeddings.position_embedding.weight")
    }

    /// The family from the tensors, as diffusers' infer_diffusers_model_type: SDXL by its embedders, SD2 by a
    /// 1024-wide context or open_clip's tower, SD1 otherwise; SDXL refiners and inpainting refused; no UNet at all
    /// is not a checkpoint.
    func testFamilyInference() throws {
        let unetKey = SingleFileCheckpoint.unetPrefix + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
        let convIn = SingleFileCheckpoint.unetPrefix + "input_blocks.0.0.weight"
        func family(_ names: [String], context: Int = 768, inChannels: Int = 4) throws -> ModelFamily {
            try SingleFileCheckpoint.inferFamily(path: "x.safetensors", names: Set(names + [convIn]),
                                                 shape: { $0 == unetKey ? [320, context] : $0 == convIn ? [320, inChannels, 3, 3] : nil })
        }
        XCTAssertEqual(try family([unetKey, "first_stage_model.encoder.conv_in.weight"]), .sd1)
        XCTAssertEqual(try family([unetKey], context: 1024), .sd2)
        XCTAssertEqual(try family([unetKey, "cond_stage_model.model.token_embedding.weight"]), .sd2)
        XCTAssertEqual(try family([unetKey, "conditioner.embedders.1.model.ln_final.weight"]), .sdxl)
        XCTAssertThrowsError(try family([unetKey, "conditioner.embedders.0.model.ln_final.weight"])) { XCTAssertTrue("\($0)".contains("refiner")) }
        XCTAssertThrowsError(try family([unetKey], inChannels: 9)) { XCTAssertTrue("\($0)".contains("inpainting"), "\($0)") }
        XCTAssertThrowsError(try SingleFileCheckpoint.inferFamily(path: "x.safetensors", names: ["first_stage_model.encoder.conv_in.weight"],
                                                                  shape: { _ in nil })) {
            XCTAssertTrue("\($0)".contains("cannot tell the model family: no model.diffusion_model.* tensors"), "\($0)")
        }
    }

    /// `pea generate --model FILE --config DIR`: diffusers' image, from the .safetensors and the .ckpt.
    func testGenerateCommandWithASingleFile() throws {
        let scratch = ScratchDirectory("pea-single-file")
        let c = try XCTUnwrap(Self.cases().first { $0.pipeline == "sd1" && $0.batch == 1 && $0.negative_prompt == nil })
        let expected = try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images").integers()!
        for checkpoint in Self.checkpoints {
            let output = scratch.file(checkpoint + ".png")
            var arguments = ["generate", "--model", Self.directory + "/" + checkpoint, "--config", Self.sd1Folder,
                             "--prompt", c.prompt, "--steps", String(c.steps), "--guidance", String(c.guidance),
                             "--seed", String(c.seed), "--width", String(c.width), "--height", String(c.height),
                             "--output", output, "--backend", "cpu"]
            if let scheduler = c.scheduler { arguments += ["--scheduler", scheduler] }
            let result = try runPea(arguments)
            XCTAssertEqual(result.status, 0, result.stderr)
            XCTAssertEqual(result.stdout, output + "\n")
            let image = try PNGReader.read(path: output)
            let worst = zip(image.pixels, expected).map { abs(Int($0) - $1) }.max() ?? 0
            XCTAssertLessThanOrEqual(worst, 1, "\(checkpoint): differs from diffusers")
        }
        // --prediction-type reaches the scheduler: v-prediction makes another image from the same file.
        let v = scratch.file("v.png")
        let result = try runPea(["generate", "--model", Self.directory + "/sd1.safetensors", "--config", Self.sd1Folder,
                                 "--prompt", c.prompt, "--steps", "2", "--seed", "1", "--width", "16", "--height", "16",
                                 "--prediction-type", "v_prediction", "--output", v, "--backend", "cpu"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let (pipeline, _) = try StableDiffusionPipeline.load(
            checkpoint: Self.directory + "/sd1.safetensors",
            options: SingleFileOptions(configFolder: Self.sd1Folder, predictionType: "v_prediction"), backend: CPUBackend())
        XCTAssertEqual(try pipeline.schedulerConfig.optionalString("prediction_type"), "v_prediction")
    }

    /// `--vae FILE`: the sd1 folder's VAE as a released VAE file (LDM names, no prefix; the script asserts that
    /// diffusers' AutoencoderKL.from_single_file reads it as the folder's VAE), and the folder's own diffusers-named
    /// VAE file, swapped into the folder's pipeline, give diffusers' image of the folder (pipelines/sd1_pndm).
    func testVAEFromASingleFile() throws {
        let scratch = ScratchDirectory("pea-single-file")
        let expected = try SafeTensorsFile(path: fixturesDirectory() + "/pipelines/sd1_pndm.safetensors").tensor("images").integers()!
        for vae in [Self.directory + "/sd1_vae.safetensors", Self.sd1Folder + "/vae/diffusion_pytorch_model.safetensors"] {
            let config = try AutoencoderKLConfig(ConfigFile(path: Self.sd1Folder + "/vae/config.json"))
            XCTAssertEqual(try AutoencoderKL.load(file: vae, config: config, backend: CPUBackend()).unusedWeights, [], vae)
            let output = scratch.file("vae.png")
            let result = try runPea(["generate", "--model", Self.sd1Folder, "--vae", vae, "--prompt", "a red fox in the snow, photo",
                                     "--steps", "4", "--seed", "42", "--width", "32", "--height", "24", "--output", output,
                                     "--backend", "cpu"])
            XCTAssertEqual(result.status, 0, result.stderr)
            let image = try PNGReader.read(path: output)
            XCTAssertLessThanOrEqual(zip(image.pixels, expected).map { abs(Int($0) - $1) }.max() ?? 0, 1, vae)
        }
        try assertPeaFails([
            (["generate", "--model", Self.sd1Folder, "--vae", Self.sd1Folder + "/unet/diffusion_pytorch_model.safetensors",
              "--prompt", "x", "--output", scratch.file("bad.png"), "--backend", "cpu"], 1, ["not a VAE"]),
        ], leavesNo: scratch.file("bad.png"))
    }

    /// The built-in configs (from_single_file's defaults per family) parse into the model configs, with the
    /// published models' sizes.
    func testBuiltInConfigs() throws {
        for family in [ModelFamily.sd1, .sd2, .sdxl] {
            let unet = try UNetConfig(SingleFileCheckpoint.defaultConfig(family, "unet"))
            XCTAssertEqual(unet.crossAttentionDim[0], ["SD1": 768, "SD2": 1024, "SDXL": 2048][family.rawValue])
            XCTAssertEqual(unet.textTime != nil, family == .sdxl)
            _ = try AutoencoderKLConfig(SingleFileCheckpoint.defaultConfig(family, "vae"))
            let encoders = try family.textComponents.map { try CLIPTextConfig(SingleFileCheckpoint.defaultConfig(family, $0.encoder)) }
            XCTAssertEqual(encoders.map(\.hiddenSize).reduce(0, +), unet.crossAttentionDim[0], family.rawValue)
            let scheduler = try SingleFileCheckpoint.defaultConfig(family, "scheduler")
            XCTAssertEqual(try scheduler.optionalString("prediction_type"), family == .sd2 ? "v_prediction" : "epsilon")
            _ = try makeScheduler(name: nil, config: scheduler)
        }
    }

    /// The built-in configs that have a published copy in benchmarks/configs (SD1.5's UNet; SDXL base 1.0's UNet,
    /// VAE, text encoders and scheduler, byte for byte from the hub, provenance in its README): every key the
    /// built-in sets has the published value. (The published files also spell out defaults the built-ins leave to
    /// the parsers, e.g. SDXL's `upcast_attention: null`; those are not compared here.)
    func testBuiltInConfigsAgreeWithThePublishedOnes() throws {
        let configs = fixturesDirectory() + "/../../benchmarks/configs/"
        for (family, component, file) in [(ModelFamily.sd1, "unet", "sd15_unet.json"), (.sdxl, "unet", "sdxl_unet.json"),
                                          (.sdxl, "vae", "sdxl_vae.json"), (.sdxl, "text_encoder", "sdxl_text_encoder.json"),
                                          (.sdxl, "text_encoder_2", "sdxl_text_encoder_2.json"), (.sdxl, "scheduler", "sdxl_scheduler.json")] {
            let builtIn = try SingleFileCheckpoint.defaultConfig(family, component).values
            let published = try ConfigFile(path: configs + file).values
            for (key, value) in builtIn {
                XCTAssertEqual(value, published[key], "\(family.rawValue) \(component): '\(key)' differs from \(file)")
            }
            XCTAssertGreaterThan(builtIn.count, 5, "\(family.rawValue) \(component)")
        }
    }

    /// Bad single files: clear errors naming the file, a non-zero exit, no output.
    func testBadSingleFilesFailClearlyAndWriteNothing() throws {
        let inputs = ScratchDirectory("pea-single-file-inputs")
        let out = ScratchDirectory("pea-single-file")
        let output = out.file("out.png")
        let good = Self.directory + "/sd1.safetensors"
        let bytes = readFileBytes(good)!
        let truncated = inputs.write(Array(bytes[..<(bytes.count - 100)]), to: "truncated.safetensors")
        let file = try SafeTensorsFile(path: good)
        let dropped = SingleFileCheckpoint.unetPrefix + "out.2.weight"
        let missing = inputs.file("missing.safetensors")
        try SafeTensorsWriter.write(file.names.filter { $0 != dropped }.map { (name: $0, tensor: try file.tensor($0)) }, to: missing)
        let notCheckpoint = Self.sd1Folder + "/unet/diffusion_pytorch_model.safetensors"
        let config = ["--config", Self.sd1Folder]
        func run(_ model: String, _ extra: [String]) -> [String] {
            ["generate", "--model", model, "--prompt", "x", "--steps", "1", "--width", "16", "--height", "16",
             "--output", output, "--backend", "cpu"] + extra
        }
        try assertPeaFails([
            (run(notCheckpoint, config), 1, [notCheckpoint, "cannot tell the model family: no model.diffusion_model.* tensors"]),
            (run(truncated, config), 1, [truncated]),
            (run(missing, config), 1, [missing, "missing tensor 'conv_out.weight'"]),
            (run(good, []), 2, [good, "--tokenizer DIR"]),
            // --tokenizer without --config: the built-in full-size SD1.5 configs meet the tiny tensors.
            (run(good, ["--tokenizer", Self.sd1Folder + "/tokenizer"]), 1, [good, "input_blocks.0.0.weight", "the model expects [320, 4, 3, 3]"]),
            (run(good, config + ["--prediction-type", "sample"]), 2, ["--prediction-type"]),
            (run(Self.sd1Folder, config), 2, ["--config applies to a single-file --model FILE"]),
            (run(good, ["--config", Self.sd1Folder + "/unet"]), 1, ["model_index.json"]),
        ], leavesNo: output)
        XCTAssertEqual(out.entries(), [])
    }
}
