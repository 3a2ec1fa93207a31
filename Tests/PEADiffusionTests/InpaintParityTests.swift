import Foundation
import XCTest
@testable import PEADiffusion

/// Inpainting against diffusers' StableDiffusionInpaintPipeline (tools/reference/make_inpaint_fixtures.py): a tiny
/// 9-channel inpainting UNet (mask and masked image latents beside the latents) and the ordinary tiny SD1 pipeline
/// (a 4-channel UNet: latent blending after every step), and StableDiffusionXLInpaintPipeline on the tiny SDXL
/// pipeline (blending), at strength 1 (pure noise) and 0.6, with Euler ancestral, DPM++ 2M and DDIM (add_noise by
/// timestep), batches, a greyscale and an RGB mask, and PEA conditioning. Images
/// within docs/testing.md's pipeline tolerance (max |Δ| ≤ 1/255, mean |Δ| ≤ 0.02/255).
final class InpaintParityTests: XCTestCase {
    typealias Case = Img2ImgParityTests.Case

    static let directory = fixturesDirectory() + "/inpaint"

    static func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    /// The case's request: init images are named from Tests/Fixtures, masks from this folder.
    static func request(_ c: Case) throws -> GenerationRequest {
        try Img2ImgParityTests.request(c, images: fixturesDirectory(), masks: directory)
    }

    func testEveryCaseMatchesDiffusers() throws {
        let backend = CPUBackend()
        let cases = try Self.cases()
        XCTAssertEqual(Set(cases.map(\.pipeline)), ["inpaint/sd1_inpainting", "pipelines/sd1", "pipelines/sdxl"])
        XCTAssertEqual(Set(cases.map(\.strength)), [1, 0.6, 0.7])
        let pea = fixturesDirectory() + "/pea"
        let encoder = try LanguageEncoders.load(folder: pea + "/zh_encoder", backend: backend)
        for c in cases {
            let conditioner = try c.adapter.map { try PEAConditioner(encoder: encoder, adapter: PEAAdapter.load(path: pea + "/" + $0, backend: backend)) }
            let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/" + c.pipeline, backend: backend,
                                                            scheduler: c.scheduler, conditioner: conditioner)
            XCTAssertEqual(StableDiffusionPipeline.isInpaintingUNet(pipeline.denoiser, vae: pipeline.vae), c.pipeline.hasPrefix("inpaint/"), c.name)
            XCTAssertEqual(pipeline.latentChannels, 4, c.name)
            var progress: [Int] = []
            let images = try pipeline.generate(Self.request(c), progress: { step, _ in progress.append(step) })
            assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
            XCTAssertEqual(progress, Array(1...c.steps_run), c.name)
        }
    }

    /// A mask as diffusers' mask processor makes it, then torch's nearest resize to the latent grid: every value 0
    /// or 1; a grey level of 127 is kept and 128 repainted; cell (i, j) reads pixel (8i, 8j).
    func testMaskIsBinarizedAndSampledAtCellCorners() throws {
        let mask = try ImageDecoder.decodeRGB(path: Self.directory + "/mask_32x24.png")
        let binary = StableDiffusionPipeline.binaryMask(mask)
        XCTAssertEqual(Set(binary), [0, 1])
        for p in binary.indices {
            XCTAssertEqual(binary[p], mask.pixels[3 * p] >= 128 ? 1 : 0, "pixel \(p): a grey PNG's luma is its grey level")
        }
        let cells = StableDiffusionPipeline.nearestResized(binary, width: 32, height: 24, toWidth: 4, toHeight: 3)
        XCTAssertEqual(cells, (0..<12).map { binary[($0 / 4) * 8 * 32 + ($0 % 4) * 8] })
    }

    func testBadRequestsAreRefused() throws {
        let cases = try Self.cases()
        let inpainting = try XCTUnwrap(cases.first { $0.pipeline.hasPrefix("inpaint/") })
        let blend = try XCTUnwrap(cases.first { $0.pipeline == "pipelines/sd1" && $0.init_image == inpainting.init_image })
        let nine = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/" + inpainting.pipeline, backend: CPUBackend())
        let four = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/" + blend.pipeline, backend: CPUBackend())
        var noMask = try Self.request(inpainting), noImage = try Self.request(blend), malformed = try Self.request(blend)
        noMask.mask = nil
        noImage.initImage = nil
        malformed.mask!.pixels.removeLast()
        for (pipeline, bad, mentions) in [(nine, noMask, "inpainting UNet"), (nine, GenerationRequest(prompt: "x", width: 32, height: 24), "inpainting UNet"),
                                          (four, noImage, "--init-image"), (four, malformed, "3 per pixel")] {
            XCTAssertThrowsError(try pipeline.generate(bad)) { error in
                XCTAssertTrue("\(error)".contains(mentions), "\(error)")
            }
        }
        var img2img = try Self.request(blend)
        img2img.mask = nil
        XCTAssertThrowsError(try four.generate([try Self.request(blend), img2img])) { error in
            XCTAssertTrue("\(error)".contains("all be inpainting"), "\(error)")
        }
    }

    /// `pea generate --init-image --mask` end to end: with PEA's --text-encoder/--adapter on the inpainting model,
    /// and without --strength, whose default with a mask is diffusers' inpainting 1.0.
    func testGenerateCommand() throws {
        let cases = try Self.cases()
        let pea = fixturesDirectory() + "/pea"
        let scratch = ScratchDirectory("pea-inpaint")
        for c in [try XCTUnwrap(cases.first { $0.adapter != nil }), try XCTUnwrap(cases.first { $0.name == "sd1_inpainting_dpmpp_s1" })] {
            let output = scratch.file(c.name + ".png"), mask = Self.directory + "/" + (c.mask ?? "")
            var arguments = ["generate", "--model", fixturesDirectory() + "/" + c.pipeline, "--prompt", c.prompt,
                             "--init-image", fixturesDirectory() + "/" + c.init_image, "--mask", mask,
                             "--steps", "\(c.steps)", "--guidance", "\(c.guidance)", "--seed", "\(c.seed)", "--output", output]
            if let adapter = c.adapter { arguments += ["--text-encoder", pea + "/zh_encoder", "--adapter", pea + "/" + adapter] }
            if c.strength != 1 { arguments += ["--strength", "\(c.strength)"] }
            if let scheduler = c.scheduler { arguments += ["--scheduler", scheduler] }
            let result = try runPea(arguments)
            XCTAssertEqual(result.status, 0, result.stderr)
            let image = try PNGReader.read(path: output)
            assertSameImages([RGBImage(width: image.width, height: image.height, pixels: image.pixels)],
                             try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
            let parameters = try XCTUnwrap(image.text("parameters"))
            XCTAssertTrue(parameters.contains("Denoising strength: \(c.strength)"), parameters)
        }
    }

    /// Every mistake in an inpainting command line is a clear error with a non-zero exit and no output file.
    func testBadInpaintCommandsFailAndWriteNothing() throws {
        let scratch = ScratchDirectory("pea-inpaint-bad")
        let output = scratch.file("out.png")
        let image = fixturesDirectory() + "/img2img/init_32x24.png", mask = Self.directory + "/mask_32x24.png"
        let missing = scratch.file("missing.png"), notImage = scratch.file("notes.png")
        let prompts = scratch.file("prompts.txt")
        try "not an image".write(toFile: notImage, atomically: true, encoding: .utf8)
        try "x\n".write(toFile: prompts, atomically: true, encoding: .utf8)
        func base(_ pipeline: String) -> [String] {
            ["generate", "--model", fixturesDirectory() + "/" + pipeline, "--prompt", "x", "--steps", "2", "--output", output]
        }
        try assertPeaFails([
            (base("pipelines/sd1") + ["--mask", mask], 2, ["--mask needs --init-image"]),
            (base("pipelines/sd1") + ["--init-image", image, "--mask", missing], 1, [missing]),
            (base("pipelines/sd1") + ["--init-image", image, "--mask", notImage], 1, [notImage, "not a JPEG or PNG"]),
            (base("pipelines/sd1") + ["--init-image", image, "--mask", mask, "--mask-blur", "-3"], 2, ["--mask-blur", "0...1000"]),
            (base("pipelines/sd1") + ["--init-image", image, "--mask", mask, "--strength", "0"], 2, ["--strength", "(0, 1]"]),
            (base("inpaint/sd1_inpainting"), 2, ["inpainting UNet", "--mask"]),
            (base("inpaint/sd1_inpainting") + ["--init-image", image], 2, ["inpainting UNet", "--mask"]),
            (["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", prompts, "--output-dir", scratch.file("job"),
              "--mask", mask], 2, ["--mask is for a single --prompt"]),
        ], leavesNo: output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: scratch.file("job")))
    }

    /// Prompt-file items with "mask" beside "init_image": each image the one diffusers makes (a strength given,
    /// and the inpainting default 1.0), beside an img2img and a text-to-image item; results.jsonl records the mask.
    func testPromptFileItemsWithMasks() throws {
        let cases = try Self.cases()
        let scratch = ScratchDirectory("pea-inpaint-job")
        _ = scratch.write(try XCTUnwrap(readFileBytes(Self.directory + "/mask_24x32.png")), to: "mask.png")
        func line(_ c: Case, id: String, mask: String, strength: Bool) -> String {
            var object: [String: JSONValue] = ["prompt": .string(c.prompt), "id": .string(id), "init_image": .string(fixturesDirectory() + "/" + c.init_image),
                                               "mask": .string(mask), "seed": .number(Double(c.seed)), "batch": .number(Double(c.batch)),
                                               "steps": .number(Double(c.steps)), "guidance": .number(Double(c.guidance))]
            if strength { object["strength"] = .number(c.strength) }
            if let scheduler = c.scheduler { object["scheduler"] = .string(scheduler) }
            if let negative = c.negative_prompt { object["negative_prompt"] = .string(negative) }
            var bytes: [UInt8] = []
            JSONValue.object(object).serialize(into: &bytes)
            return String(decoding: bytes, as: UTF8.self)
        }
        let blend = try XCTUnwrap(cases.first { $0.name == "sd1_blend_euler_a_s06_batch" })
        let blendFull = try XCTUnwrap(cases.first { $0.name == "sd1_blend_dpmpp_s1" })
        let inpainting = try XCTUnwrap(cases.first { $0.name == "sd1_inpainting_dpmpp_s1" })
        for (folder, jobCases, extra) in [("pipelines/sd1", [(blend, "blend", true), (blendFull, "full", false)],
                                           [#"{"prompt": "x", "id": "img2img", "init_image": "\#(fixturesDirectory())/img2img/init_32x24.png", "steps": 2}"#,
                                            #"{"prompt": "x", "id": "plain", "width": 16, "height": 16, "steps": 2}"#]),
                                          ("inpaint/sd1_inpainting", [(inpainting, "inpainting", false)], [])] {
            let lines = jobCases.map { line($0.0, id: $0.1, mask: $0.0.mask == "mask_24x32.png" ? "mask.png" : Self.directory + "/" + ($0.0.mask ?? ""), strength: $0.2) }
            let prompts = scratch.write((lines + extra).joined(separator: "\n"), to: "\(jobCases[0].1).jsonl")
            let out = scratch.file("out-" + jobCases[0].1)
            let result = try runPea(["generate", "--model", fixturesDirectory() + "/" + folder, "--prompts", prompts, "--output-dir", out,
                                     "--batch-size", "4", "--backend", "cpu"])
            XCTAssertEqual(result.status, 0, result.stderr)
            for (c, key, _) in jobCases {
                let files = c.batch == 1 ? [key] : (1...c.batch).map { "\(key)-\($0)" }
                let images = try files.map { name -> RGBImage in
                    let png = try PNGReader.read(path: out + "/" + name + ".png")
                    return RGBImage(width: png.width, height: png.height, pixels: png.pixels)
                }
                assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), "job item \(key)")
            }
            let results = String(decoding: try XCTUnwrap(readFileBytes(out + "/results.jsonl")), as: UTF8.self)
            let records = results.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8)).objectValue }
            let first = try XCTUnwrap(records.first { $0["id"]?.stringValue == jobCases[0].1 })
            XCTAssertTrue(first["mask"]?.stringValue?.hasSuffix(jobCases[0].0.mask == "mask_24x32.png" ? "/mask.png" : "/" + (jobCases[0].0.mask ?? "")) ?? false, "\(first)")
            XCTAssertEqual(first["strength"]?.doubleValue, jobCases[0].0.strength)
            if !extra.isEmpty { XCTAssertNil(try XCTUnwrap(records.first { $0["id"]?.stringValue == "img2img" })["mask"]) }
        }
    }

    func testBadPromptFileItemsWithMasks() throws {
        let defaults = JobDefaults(negativePrompt: nil, baseSeed: 0, width: 0, height: 0, steps: 4, guidance: 7.5, scheduler: nil, batch: 1)
        for (text, message) in [(#"{"prompt": "a", "mask": "m.png"}"#, "'mask' goes with 'init_image'"),
                                (#"{"prompt": "a", "init_image": "x.png", "mask": ""}"#, "'mask' must be a non-empty path"),
                                (#"{"prompt": "a", "init_image": "x.png", "mask": 3}"#, "'mask' must be a string")] {
            assertThrowsError(containing: ["p.jsonl", "line 1", message]) { try PromptFile.parse(text, path: "p.jsonl", jsonLines: true, defaults: defaults) }
        }
        // A missing or unreadable mask fails the job before its folder exists.
        let scratch = ScratchDirectory("pea-inpaint-job-bad")
        let image = fixturesDirectory() + "/img2img/init_32x24.png", notImage = scratch.write("not an image", to: "notes.png"), out = scratch.file("out")
        var files = 0
        func job(_ line: String) -> [String] {
            files += 1
            return ["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", scratch.write(line, to: "p\(files).jsonl"),
                    "--output-dir", out, "--steps", "2"]
        }
        try assertPeaFails([
            (job(#"{"prompt": "a", "init_image": "\#(image)", "mask": "missing.png"}"#), 1, [scratch.file("missing.png")]),
            (job(#"{"prompt": "a", "init_image": "\#(image)", "mask": "notes.png"}"#), 1, [notImage, "not a JPEG or PNG"]),
        ], leavesNo: out)
    }

    func testHelpDocumentsMask() throws {
        let help = try runPea(["generate", "--help"])
        XCTAssertEqual(help.status, 0)
        for fragment in ["--mask PATH", "StableDiffusionInpaintPipeline", "default is 1.0", "9 input channels", "not pasted back", "Default: no blur"] {
            XCTAssertTrue(help.stdout.contains(fragment), "'\(fragment)' not in the help")
        }
    }
}

/// Init images and masks that need diffusers' preprocessing (tools/reference/make_image_prep_fixtures.py): a 70×52
/// init image (not a multiple of 8), a 40×30 mask (another size and aspect), mask blurs of 3 and 1.5, sizes by
/// default (rounded down to 64×48) and given (32×40). diffusers resized and binarised them itself and blurred
/// the mask with mask_processor.blur; Pea must make the same images.
enum ImagePrepCases {
    struct Case: Decodable {
        let name, pipeline, init_image, prompt, scheduler, images: String
        let mask, negative_prompt: String?
        let mask_blur: Double?
        let width, height: Int?
        let steps, seed: Int
        let strength, guidance: Double
    }

    static let directory = fixturesDirectory() + "/image_prep"

    static func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    static func expected(_ c: Case) throws -> HostTensor {
        try SafeTensorsFile(path: directory + "/" + c.images).tensor("images")
    }

    /// `pea generate` with the case's files and settings; its image, decoded.
    static func generated(_ c: Case, scratch: ScratchDirectory) throws -> RGBImage {
        let output = scratch.file(c.name + ".png")
        var arguments = ["generate", "--model", fixturesDirectory() + "/" + c.pipeline, "--prompt", c.prompt,
                         "--init-image", directory + "/" + c.init_image, "--strength", "\(c.strength)", "--steps", "\(c.steps)",
                         "--guidance", "\(c.guidance)", "--seed", "\(c.seed)", "--scheduler", c.scheduler, "--output", output]
        if let negative = c.negative_prompt { arguments += ["--negative-prompt", negative] }
        if let mask = c.mask { arguments += ["--mask", directory + "/" + mask] }
        if let blur = c.mask_blur { arguments += ["--mask-blur", "\(blur)"] }
        if let width = c.width, let height = c.height { arguments += ["--width", "\(width)", "--height", "\(height)"] }
        let result = try runPea(arguments)
        XCTAssertEqual(result.status, 0, "\(c.name): \(result.stderr)")
        let image = try PNGReader.read(path: output)
        return RGBImage(width: image.width, height: image.height, pixels: image.pixels)
    }
}

extension InpaintParityTests {
    /// `pea generate --init-image --mask [--mask-blur]` with a mask of another size than the (odd-sized) image.
    func testMasksOfAnotherSizeAndBlurredMasksMatchDiffusers() throws {
        let scratch = ScratchDirectory("pea-image-prep")
        let cases = try ImagePrepCases.cases().filter { $0.mask != nil }
        XCTAssertEqual(Set(cases.map(\.pipeline)), ["pipelines/sd1", "inpaint/sd1_inpainting"])
        XCTAssertTrue(cases.contains { $0.width == nil } && cases.contains { $0.width != nil })
        for c in cases {
            assertSameImages([try ImagePrepCases.generated(c, scratch: scratch)], try ImagePrepCases.expected(c), c.name)
        }
    }

    /// The pipeline itself resizes an init image and a mask of any size to the request's size (the caller blurs).
    func testPipelineResizesInitImageAndMask() throws {
        let c = try XCTUnwrap(try ImagePrepCases.cases().first { $0.pipeline == "inpaint/sd1_inpainting" })
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/" + c.pipeline, backend: CPUBackend(), scheduler: c.scheduler)
        var request = GenerationRequest(prompt: c.prompt, negativePrompt: c.negative_prompt, width: try XCTUnwrap(c.width),
                                        height: try XCTUnwrap(c.height))
        (request.steps, request.guidance, request.seed, request.strength) = (c.steps, Float(c.guidance), UInt64(c.seed), c.strength)
        request.initImage = try ImageDecoder.decodeRGB(path: ImagePrepCases.directory + "/" + c.init_image)
        let mask = try ImageDecoder.decodeRGB(path: ImagePrepCases.directory + "/" + XCTUnwrap(c.mask))
        request.mask = VaeImageProcessor.blur(mask, radius: try XCTUnwrap(c.mask_blur))
        assertSameImages(try pipeline.generate(request), try ImagePrepCases.expected(c), c.name)
    }
}

extension InpaintParityTests {
    /// A prompt-file item with an odd-sized init image, a mask of another size and "mask_blur": the image diffusers
    /// makes, its size the image's rounded down; results.jsonl records the blur.
    func testPromptFileItemWithMaskBlurMatchesDiffusers() throws {
        let c = try XCTUnwrap(try ImagePrepCases.cases().first { $0.pipeline == "pipelines/sd1" && $0.mask != nil })
        let blur = try XCTUnwrap(c.mask_blur)
        let scratch = ScratchDirectory("pea-image-prep-job")
        let item: [String: Any] = ["prompt": c.prompt, "id": "prep", "seed": c.seed, "steps": c.steps, "guidance": c.guidance,
                                   "scheduler": c.scheduler, "strength": c.strength, "mask_blur": blur,
                                   "init_image": ImagePrepCases.directory + "/" + c.init_image,
                                   "mask": ImagePrepCases.directory + "/" + (c.mask ?? "")]
        let line = String(decoding: try JSONSerialization.data(withJSONObject: item), as: UTF8.self)
        let prompts = scratch.write(line + "\n", to: "prompts.jsonl"), out = scratch.file("out")
        let result = try runPea(["generate", "--model", fixturesDirectory() + "/" + c.pipeline, "--prompts", prompts, "--output-dir", out])
        XCTAssertEqual(result.status, 0, result.stderr)
        let image = try PNGReader.read(path: out + "/prep.png")
        assertSameImages([RGBImage(width: image.width, height: image.height, pixels: image.pixels)], try ImagePrepCases.expected(c), c.name)
        let results = String(decoding: try XCTUnwrap(readFileBytes(out + "/results.jsonl")), as: UTF8.self)
        let record = try XCTUnwrap(try JSONValue.parse(Array(results.split(separator: "\n")[0].utf8)).objectValue)
        XCTAssertEqual(record["mask_blur"]?.doubleValue, blur)
        XCTAssertEqual([record["width"]?.intValue, record["height"]?.intValue], [64, 48])
    }
}

extension InpaintParityTests {
    /// "mask_blur" and --mask-blur in prompt files: the item's own, else the default, only for items with a mask;
    /// the results' canonical JSON names it only when set (older jobs keep their digests).
    func testPromptFileMaskBlurDefaults() throws {
        var defaults = JobDefaults(negativePrompt: nil, baseSeed: 0, width: 0, height: 0, steps: 4, guidance: 7.5, scheduler: nil, batch: 1)
        defaults.maskBlur = 2
        let text = #"""
            {"prompt": "a", "init_image": "x.png", "mask": "m.png"}
            {"prompt": "b", "init_image": "x.png", "mask": "m.png", "mask_blur": 0.5}
            {"prompt": "c", "init_image": "x.png"}
            {"prompt": "d"}
            """#
        let items = try PromptFile.parse(text, path: "p.jsonl", jsonLines: true, defaults: defaults)
        XCTAssertEqual(items.map(\.maskBlur), [2, 0.5, nil, nil])
        defaults.maskBlur = nil
        let plain = try PromptFile.parse(text, path: "p.jsonl", jsonLines: true, defaults: defaults)
        XCTAssertEqual(plain.map(\.maskBlur), [nil, 0.5, nil, nil])
        XCTAssertNil(JobOutput.itemJSON(plain[0]).objectValue?["mask_blur"])
        XCTAssertEqual(JobOutput.itemJSON(plain[1]).objectValue?["mask_blur"]?.doubleValue, 0.5)
    }
}
