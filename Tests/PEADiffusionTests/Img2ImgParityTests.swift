import Foundation
import XCTest
@testable import PEADiffusion

/// Image-to-image against diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline, on the
/// tiny pipelines (tools/reference/make_img2img_fixtures.py): the same init image, strength, seed and settings must
/// give the same 8-bit images (docs/testing.md: max |Δ| ≤ 1/255, mean |Δ| ≤ 0.02/255). The cases start mid-schedule
/// with every kind of scheduler: Euler, Euler ancestral, DPM++ 2M (its first-order first step), DDIM and PNDM
/// (its warm-up from the begin index); with a batch (one latent sample shared, noise per image), and with PEA
/// conditioning.
final class Img2ImgParityTests: XCTestCase {
    /// A case of tools/reference/make_img2img_fixtures.py, or of make_inpaint_fixtures.py (which adds `mask`).
    struct Case: Decodable {
        let name, pipeline, init_image, prompt, images: String
        let negative_prompt, scheduler, adapter, mask: String?
        let steps, seed, batch, steps_run: Int
        let strength: Double
        let guidance: Float
    }

    static let directory = fixturesDirectory() + "/img2img"

    static func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    /// The case's request: its init image read from `images/init_image` and its mask, if any, from `masks/mask`.
    static func request(_ c: Case, images: String = directory, masks: String = directory) throws -> GenerationRequest {
        let image = try ImageDecoder.decodeRGB(path: images + "/" + c.init_image)
        var request = GenerationRequest(prompt: c.prompt, negativePrompt: c.negative_prompt, width: image.width, height: image.height)
        request.steps = c.steps
        request.guidance = c.guidance
        request.seed = UInt64(c.seed)
        request.imagesPerPrompt = c.batch
        request.initImage = image
        request.mask = try c.mask.map { try ImageDecoder.decodeRGB(path: masks + "/" + $0) }
        request.strength = c.strength
        return request
    }

    func testEveryCaseMatchesDiffusers() throws {
        let backend = CPUBackend()
        let cases = try Self.cases()
        XCTAssertEqual(Set(cases.map(\.pipeline)), ["sd1", "sdxl"])
        let pea = fixturesDirectory() + "/pea"
        let encoder = try LanguageEncoders.load(folder: pea + "/zh_encoder", backend: backend)
        for c in cases {
            let conditioner = try c.adapter.map { try PEAConditioner(encoder: encoder, adapter: PEAAdapter.load(path: pea + "/" + $0, backend: backend)) }
            let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/" + c.pipeline, backend: backend,
                                                            scheduler: c.scheduler, conditioner: conditioner)
            var progress: [(Int, Int)] = []
            let images = try pipeline.generate(Self.request(c), progress: { progress.append(($0, $1)) })
            assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
            // The loop runs the timesteps from get_timesteps' begin index on: diffusers' count, and PNDM's
            // repeated second timestep once more.
            let evaluations = c.steps_run + (pipeline.scheduler is PNDMScheduler ? 1 : 0)
            XCTAssertEqual(progress.map(\.0), Array(1...evaluations), c.name)
            XCTAssertEqual(Set(progress.map(\.1)), [evaluations], c.name)
        }
    }

    /// Every scheduler's add_noise after set_begin_index(k), at the first, a middle and the last timestep, built
    /// from the SD1 (PNDM), SD2 (v-prediction DDIM) and SDXL (Euler, leading) configs as the folder's own or by
    /// name: DDPM-type ᾱ for DDIM and PNDM, σ at the begin index for Euler (a), α_t/σ_t of σ for DPM-Solver.
    func testAddNoiseMatchesDiffusers() throws {
        struct AddNoiseCase: Decodable {
            let name, pipeline: String
            let scheduler: String?
            let steps, begin: Int
            let timestep: Double
        }
        let file = try SafeTensorsFile(path: Self.directory + "/add_noise.safetensors")
        let cases = try JSONDecoder().decode([AddNoiseCase].self, from: Data(XCTUnwrap(file.metadata["cases"]).utf8))
        XCTAssertEqual(cases.count, 3 * 7 * 3)
        let backend = CPUBackend()
        let x0 = try backend.upload(file.tensor("x0")), noise = try backend.upload(file.tensor("noise"))
        for c in cases {
            let config = try ConfigFile(path: fixturesDirectory() + "/pipelines/\(c.pipeline)/scheduler/scheduler_config.json")
            var scheduler = try makeScheduler(name: c.scheduler, config: config)
            try scheduler.setTimesteps(c.steps)
            XCTAssertEqual(scheduler.timesteps[c.begin], c.timestep, accuracy: 1e-3, c.name)
            let noisy = try scheduler.addNoise(x0, noise: noise, stepIndex: c.begin)
            assertClose(try backend.download(noisy).floats(), try file.tensor("out." + c.name).floats(), .f32, c.name)
        }
    }

    /// get_timesteps: the last int(steps × strength) steps run, strength multiplied as a Python float.
    func testBeginIndexIsDiffusersGetTimesteps() throws {
        for c in try Self.cases() {
            XCTAssertEqual(try StableDiffusionPipeline.img2imgBeginIndex(steps: c.steps, strength: c.strength), c.steps - c.steps_run, c.name)
        }
        XCTAssertThrowsError(try StableDiffusionPipeline.img2imgBeginIndex(steps: 4, strength: 0.2)) { error in
            XCTAssertTrue("\(error)".contains("too low"), "\(error)")
        }
    }

    func testBadRequestsAreRefused() throws {
        let c = try XCTUnwrap(try Self.cases().first { $0.name == "sd1_pndm_s05" })
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: CPUBackend())
        var lowStrength = try Self.request(c), zero = try Self.request(c), above = try Self.request(c), nan = try Self.request(c), malformed = try Self.request(c)
        lowStrength.strength = 0.2
        zero.strength = 0
        above.strength = 1.5
        nan.strength = .nan
        malformed.initImage!.pixels.removeLast()
        for (bad, mentions) in [(lowStrength, "too low"), (zero, "(0, 1]"), (above, "(0, 1]"), (nan, "(0, 1]"), (malformed, "3 per pixel")] {
            XCTAssertThrowsError(try pipeline.generate(bad)) { error in
                XCTAssertTrue("\(error)".contains(mentions), "\(error)")
            }
        }
        // Batched requests share where the loop starts.
        var other = try Self.request(c)
        other.strength = 0.75
        XCTAssertThrowsError(try pipeline.generate([try Self.request(c), other])) { error in
            XCTAssertTrue("\(error)".contains("same strength"), "\(error)")
        }
        XCTAssertThrowsError(try pipeline.generate([try Self.request(c), GenerationRequest(prompt: "x", width: 32, height: 24)]))
    }

    /// `pea generate --init-image` end to end, with PEA's --text-encoder/--adapter: the PNG diffusers makes, the
    /// strength in its parameters.
    func testGenerateCommandWithInitImageAndAdapter() throws {
        let c = try XCTUnwrap(try Self.cases().first { $0.adapter != nil })
        let scratch = ScratchDirectory("pea-img2img")
        let output = scratch.file("out.png")
        let pea = fixturesDirectory() + "/pea"
        var arguments = ["generate", "--model", fixturesDirectory() + "/pipelines/" + c.pipeline, "--prompt", c.prompt,
                         "--text-encoder", pea + "/zh_encoder", "--adapter", pea + "/" + c.adapter!,
                         "--init-image", Self.directory + "/" + c.init_image, "--strength", "\(c.strength)",
                         "--steps", "\(c.steps)", "--guidance", "\(c.guidance)", "--seed", "\(c.seed)", "--output", output]
        if let scheduler = c.scheduler { arguments += ["--scheduler", scheduler] }
        let result = try runPea(arguments)
        XCTAssertEqual(result.status, 0, result.stderr)
        let image = try PNGReader.read(path: output)
        assertSameImages([RGBImage(width: image.width, height: image.height, pixels: image.pixels)],
                         try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
        let parameters = try XCTUnwrap(image.text("parameters"))
        XCTAssertTrue(parameters.contains("Denoising strength: \(c.strength)") && parameters.contains("Size: 32x24"), parameters)
    }

    /// Every mistake in an img2img command line is a clear error with a non-zero exit and no output file.
    func testBadImg2ImgCommandsFailAndWriteNothing() throws {
        let scratch = ScratchDirectory("pea-img2img-bad")
        let output = scratch.file("out.png")
        let good = Self.directory + "/init_32x24.png"
        let notImage = scratch.file("notes.png"), tiny = scratch.file("tiny.png"), prompts = scratch.file("prompts.txt")
        try "not an image".write(toFile: notImage, atomically: true, encoding: .utf8)
        try "x\n".write(toFile: prompts, atomically: true, encoding: .utf8)
        try PNGWriter.write(rgb: [UInt8](repeating: 128, count: 30 * 7 * 3), width: 30, height: 7, to: tiny)
        let base = ["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompt", "x", "--steps", "4", "--output", output]
        let missing = scratch.file("missing.png")
        try assertPeaFails([
            (base + ["--init-image", missing], 1, [missing]),
            (base + ["--init-image", notImage], 1, [notImage, "not a JPEG or PNG"]),
            (base + ["--init-image", tiny], 1, [tiny, "30×7", "at least 8×8"]),
            (base + ["--init-image", good, "--strength", "0"], 2, ["--strength", "(0, 1]"]),
            (base + ["--init-image", good, "--strength", "1.5"], 2, ["--strength", "(0, 1]"]),
            (base + ["--init-image", good, "--strength", "nan"], 2, ["--strength"]),
            (base + ["--init-image", good, "--strength", "0.2"], 2, ["too low"]),
            (base + ["--init-image", good, "--mask-blur", "2"], 2, ["--mask-blur goes with --mask"]),
            (base + ["--init-image", good, "--mask", good, "--mask-blur", "-1"], 2, ["--mask-blur", "0...1000"]),
            (base + ["--init-image", good, "--mask", good, "--mask-blur", "nan"], 2, ["--mask-blur"]),
            (base + ["--init-image", good, "--mask", good, "--mask-blur", "1e9"], 2, ["--mask-blur", "0...1000"]),
            (base + ["--strength", "0.5"], 2, ["--strength goes with --init-image"]),
            (["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", prompts, "--output-dir", scratch.file("job"),
              "--init-image", good], 2, ["--init-image is for a single --prompt"]),
        ], leavesNo: output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: scratch.file("job")))
    }

    /// Prompt-file items with "init_image" (relative to the file's folder, or absolute) and "strength": each image
    /// the one diffusers makes, beside a text-to-image item; results.jsonl and the PNG parameters record them.
    func testPromptFileItemsWithInitImages() throws {
        let cases = try Self.cases()
        let batch = try XCTUnwrap(cases.first { $0.name == "sd1_euler_a_s05_batch" }), pndm = try XCTUnwrap(cases.first { $0.name == "sd1_pndm_s05" })
        let scratch = ScratchDirectory("pea-img2img-job")
        _ = scratch.write(try XCTUnwrap(readFileBytes(Self.directory + "/" + batch.init_image)), to: "init.png")
        func line(_ c: Case, id: String, image: String) -> String {
            var object: [String: JSONValue] = ["prompt": .string(c.prompt), "id": .string(id), "init_image": .string(image),
                                               "strength": .number(c.strength), "seed": .number(Double(c.seed)), "batch": .number(Double(c.batch)),
                                               "steps": .number(Double(c.steps)), "guidance": .number(Double(c.guidance))]
            if let scheduler = c.scheduler { object["scheduler"] = .string(scheduler) }
            var bytes: [UInt8] = []
            JSONValue.object(object).serialize(into: &bytes)
            return String(decoding: bytes, as: UTF8.self)
        }
        let prompts = scratch.write([line(batch, id: "fox", image: "init.png"), line(pndm, id: "lighthouse", image: Self.directory + "/" + pndm.init_image),
                                     #"{"prompt": "mountains at dawn", "id": "plain", "width": 32, "height": 24, "steps": 2}"#].joined(separator: "\n"),
                                    to: "p.jsonl")
        let out = scratch.file("out")
        let result = try runPea(["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", prompts, "--output-dir", out,
                                 "--batch-size", "4", "--backend", "cpu"])
        XCTAssertEqual(result.status, 0, result.stderr)
        for (c, key) in [(batch, "fox"), (pndm, "lighthouse")] {
            let files = c.batch == 1 ? [key] : (1...c.batch).map { "\(key)-\($0)" }
            let images = try files.map { name -> RGBImage in
                let png = try PNGReader.read(path: out + "/" + name + ".png")
                XCTAssertTrue(png.text("parameters")?.contains("Denoising strength: \(c.strength)") ?? false, name)
                return RGBImage(width: png.width, height: png.height, pixels: png.pixels)
            }
            assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), "job item \(key)")
        }
        XCTAssertTrue(fileExists(out + "/plain.png"))
        let results = String(decoding: try XCTUnwrap(readFileBytes(out + "/results.jsonl")), as: UTF8.self)
        let fox = try XCTUnwrap(results.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8)).objectValue }
            .first { $0["key"]?.stringValue == "fox-1" })
        XCTAssertEqual(fox["init_image"]?.stringValue, scratch.path + "/init.png")
        XCTAssertEqual(fox["strength"]?.doubleValue, batch.strength)
        XCTAssertEqual([fox["width"]?.intValue, fox["height"]?.intValue], [32, 24], "the init image's size")
    }

    func testBadPromptFileItemsWithInitImages() throws {
        let defaults = JobDefaults(negativePrompt: nil, baseSeed: 0, width: 0, height: 0, steps: 4, guidance: 7.5, scheduler: nil, batch: 1)
        let cases: [(String, String)] = [
            (#"{"prompt": "a", "strength": 0.5}"#, "'strength' goes with 'init_image'"),
            (#"{"prompt": "a", "init_image": "x.png", "strength": 0}"#, "'strength' must be a number in (0, 1]"),
            (#"{"prompt": "a", "init_image": "x.png", "strength": "high"}"#, "'strength' must be a number in (0, 1]"),
            (#"{"prompt": "a", "init_image": "x.png", "strength": 0.2}"#, "too low"),
            (#"{"prompt": "a", "init_image": ""}"#, "'init_image' must be a non-empty path"),
            (#"{"prompt": "a", "init_image": 3}"#, "'init_image' must be a string"),
            (#"{"prompt": "a", "init_image": "x.png", "mask_blur": 2}"#, "'mask_blur' goes with 'mask'"),
            (#"{"prompt": "a", "init_image": "x.png", "mask": "m.png", "mask_blur": -1}"#, "'mask_blur' must be a number in 0...1000"),
            (#"{"prompt": "a", "init_image": "x.png", "mask": "m.png", "mask_blur": "soft"}"#, "'mask_blur' must be a number"),
        ]
        for (text, message) in cases {
            assertThrowsError(containing: ["p.jsonl", "line 1", message]) { try PromptFile.parse(text, path: "p.jsonl", jsonLines: true, defaults: defaults) }
        }
        // Missing, odd-sized or mis-sized images fail the job before its folder exists.
        let scratch = ScratchDirectory("pea-img2img-job-bad")
        let tiny = scratch.file("tiny.png")
        try PNGWriter.write(rgb: [UInt8](repeating: 9, count: 7 * 24 * 3), width: 7, height: 24, to: tiny)
        let good = Self.directory + "/init_32x24.png", out = scratch.file("out")
        var files = 0
        func job(_ line: String, _ extra: [String] = []) -> [String] {
            files += 1
            return ["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", scratch.write(line, to: "p\(files).jsonl"),
                    "--output-dir", out, "--steps", "2"] + extra
        }
        try assertPeaFails([
            (job(#"{"prompt": "a", "init_image": "missing.png"}"#), 1, [scratch.file("missing.png")]),
            (job(#"{"prompt": "a", "init_image": "tiny.png"}"#), 1, ["line 1", tiny, "at least 8×8"]),
            (job(#"{"prompt": "a", "init_image": "\#(good)", "mask": "missing-mask.png"}"#), 1, [scratch.file("missing-mask.png")]),
            (job(#"{"prompt": "a", "init_image": "\#(good)", "mask": "\#(good)"}"#, ["--mask-blur", "-2"]), 2, ["--mask-blur", "0...1000"]),
            (job(#"{"prompt": "a", "init_image": "\#(good)"}"#, ["--strength", "2"]), 2, ["--strength", "(0, 1]"]),
        ], leavesNo: out)
    }

    /// `pea generate --init-image` with a 70×52 image: resized (Lanczos) to 64×48, diffusers' default size.
    func testInitImageNotAMultipleOf8IsResizedAsDiffusers() throws {
        let c = try XCTUnwrap(try ImagePrepCases.cases().first { $0.mask == nil })
        XCTAssertNil(c.width)
        let image = try ImagePrepCases.generated(c, scratch: ScratchDirectory("pea-image-prep"))
        XCTAssertEqual([image.width, image.height], [64, 48])
        assertSameImages([image], try ImagePrepCases.expected(c), c.name)
    }

    /// The help says what the options do.
    func testHelpDocumentsInitImageAndStrength() throws {
        let help = try runPea(["generate", "--help"])
        XCTAssertEqual(help.status, 0)
        for fragment in ["--init-image PATH", "--strength S", "(default 0.8)", "int(steps × S)", "Lanczos", "rounded down to multiples of 8",
                         "--mask-blur R", "GaussianBlur", "\"mask_blur\""] {
            XCTAssertTrue(help.stdout.contains(fragment), "'\(fragment)' not in the help")
        }
    }
}
