import Foundation
import XCTest
@testable import PEADiffusion

/// ControlNet against diffusers' ControlNetModel, StableDiffusionControlNetPipeline and
/// StableDiffusionXLControlNetPipeline on the tiny pipelines (tools/reference/make_controlnet_fixtures.py): the
/// model's residuals within f32 tolerance, and the same 8-bit images (docs/testing.md: max |Δ| ≤ 1/255, mean |Δ| ≤
/// 0.02/255) at two scales and several schedulers, with start/end, two ControlNets at once (one reading BGR), a
/// batch, PEA conditioning (SD1 and SDXL), and control images diffusers resizes (44×36 to its default 40×32, or to
/// a given 24×32); then the model on the emulated CUDA backend, and `pea generate`.
final class ControlNetTests: XCTestCase {
    /// A case of make_controlnet_fixtures.py.
    struct Case: Decodable {
        let name, pipeline, prompt, images: String
        let negative_prompt, scheduler, adapter: String?
        let controlnets, control_images: [String]
        let scales, starts, ends: [Double]
        let steps, seed, batch, width, height: Int
        let guidance: Float
        /// Whether diffusers was given width/height; if not, `width`×`height` is the size it took from the image.
        let size_given: Bool
    }

    static let directory = fixturesDirectory() + "/controlnet"

    static func cases() throws -> [Case] {
        try JSONDecoder().decode([Case].self, from: Data(contentsOf: URL(fileURLWithPath: directory + "/cases.json")))
    }

    static func request(_ c: Case, backend: any ComputeBackend, models: inout [String: ControlNetModel]) throws -> GenerationRequest {
        var request = GenerationRequest(prompt: c.prompt, negativePrompt: c.negative_prompt, width: c.width, height: c.height)
        request.steps = c.steps
        request.guidance = c.guidance
        request.seed = UInt64(c.seed)
        request.imagesPerPrompt = c.batch
        for (k, name) in c.controlnets.enumerated() {
            if models[name] == nil { models[name] = try ControlNetModel.load(folder: directory + "/" + name, backend: backend).model }
            let image = try ImageDecoder.decodeRGB(path: directory + "/" + c.control_images[k])
            request.controls.append(ControlInput(controlnet: models[name]!, image: image, scale: c.scales[k], start: c.starts[k], end: c.ends[k]))
        }
        return request
    }

    /// ControlNetModel's down residuals and mid residual for the fixture's inputs, on `backend`.
    func checkModels(on backend: any ComputeBackend, _ names: [String], tolerance: ParityTolerance = .f32) throws {
        let file = try SafeTensorsFile(path: Self.directory + "/models.safetensors")
        for name in names {
            let (model, unused) = try ControlNetModel.load(folder: Self.directory + "/" + name, backend: backend)
            XCTAssertEqual(unused, [], name)
            func input(_ key: String) throws -> Tensor? {
                file.names.contains(name + "." + key) ? try backend.upload(file.tensor(name + "." + key)) : nil
            }
            let inputs = DenoisingInputs(sample: try XCTUnwrap(input("sample")), timestep: try XCTUnwrap(input("timestep")),
                                         encoderHiddenStates: try XCTUnwrap(input("encoder_hidden_states")),
                                         textEmbeds: try input("text_embeds"), timeIds: try input("time_ids"))
            let residuals = try model(inputs, condition: XCTUnwrap(input("cond")), scale: 0.7)
            let downs = file.names.filter { $0.hasPrefix(name + ".down.") }.count
            XCTAssertEqual(residuals.down.count, downs, name)
            for (i, down) in residuals.down.enumerated() {
                assertClose(try backend.download(down).floats(), try file.tensor("\(name).down.\(i)").floats(), tolerance, "\(name) down \(i)")
            }
            assertClose(try backend.download(residuals.mid).floats(), try file.tensor(name + ".mid").floats(), tolerance, "\(name) mid")
        }
    }

    func testModelResidualsMatchDiffusers() throws {
        try checkModels(on: CPUBackend(), ["sd1_a", "sd1_b", "sdxl_a"])
    }

    func testEveryCaseMatchesDiffusers() throws {
        let backend = CPUBackend()
        let cases = try Self.cases()
        XCTAssertEqual(Set(cases.map(\.pipeline)), ["sd1", "sdxl"])
        let pea = fixturesDirectory() + "/pea"
        let encoder = try LanguageEncoders.load(folder: pea + "/zh_encoder", backend: backend)
        var models: [String: ControlNetModel] = [:]
        for c in cases {
            let conditioner = try c.adapter.map { try PEAConditioner(encoder: encoder, adapter: PEAAdapter.load(path: pea + "/" + $0, backend: backend)) }
            let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/" + c.pipeline, backend: backend,
                                                            scheduler: c.scheduler, conditioner: conditioner)
            let images = try pipeline.generate(Self.request(c, backend: backend, models: &models))
            assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
        }
    }

    /// The fixtures can tell a ControlNet that is ignored or wired wrong: without it the image is another one.
    func testTheControlNetChangesTheImage() throws {
        let backend = CPUBackend()
        let c = try XCTUnwrap(try Self.cases().first { $0.name == "sd1_dpmpp_scale13" })
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: backend, scheduler: c.scheduler)
        var models: [String: ControlNetModel] = [:]
        var request = try Self.request(c, backend: backend, models: &models)
        request.controls = []
        let plain = try pipeline.generate(request)[0].pixels
        let expected = try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images").integers()!
        let differing = zip(plain, expected).filter { abs(Int($0) - $1) > 8 }.count
        XCTAssertGreaterThan(differing, plain.count / 4, "the ControlNet hardly changes the image")
    }

    /// The step window: diffusers' keep = 1 − (i/N < start or (i+1)/N > end), as Python compares doubles.
    func testConditioningScalePerStep() throws {
        let model = try ControlNetModel.load(folder: Self.directory + "/sd1_a", backend: CPUBackend()).model
        let image = RGBImage(width: 1, height: 1, pixels: [0, 0, 0])
        let control = ControlInput(controlnet: model, image: image, scale: 1.3, start: 0.2, end: 0.7)
        XCTAssertEqual((0..<10).map { control.scale(step: $0, of: 10) }, [0, 0, 1.3, 1.3, 1.3, 1.3, 1.3, 0, 0, 0])
    }

    /// Requests that cannot be run are refused with a message that says why, before anything is denoised.
    func testBadRequestsAreRefused() throws {
        let backend = CPUBackend()
        let c = try XCTUnwrap(try Self.cases().first { $0.name == "sd1_dpmpp_scale13" })
        let sd1 = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: backend)
        var models: [String: ControlNetModel] = [:]
        let good = try Self.request(c, backend: backend, models: &models)
        let sdxlNet = try ControlNetModel.load(folder: Self.directory + "/sdxl_a", backend: backend).model
        var wrongFamily = good, broken = good, window = good, img2img = good, huge = good
        wrongFamily.controls[0].controlnet = sdxlNet
        broken.controls[0].image = RGBImage(width: 4, height: 4, pixels: [0, 0, 0])
        window.controls[0].start = 0.7
        window.controls[0].end = 0.7
        img2img.initImage = good.controls[0].image
        huge.controls[0].scale = 1e300   // finite as a Double, infinite as the Float the residuals are scaled by
        for (bad, mentions) in [(wrongFamily, [Self.directory + "/sdxl_a", "cross_attention_dim 32, the UNet's 16"]),
                                (broken, ["control image holds 3 bytes", "4×4"]),
                                (window, ["0 ≤ start < end ≤ 1"]), (img2img, ["text-to-image only"]),
                                (huge, ["scale must be finite in float32"])] {
            assertThrowsError(containing: mentions) { _ = try sd1.generate(bad) }
        }
        // An SD1 ControlNet in front of the SDXL UNet: another text width and no text_time embedding.
        let sdxl = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sdxl", backend: backend)
        var sd1Net = try Self.request(try XCTUnwrap(try Self.cases().first { $0.name == "sdxl_euler_a_scale05" }), backend: backend, models: &models)
        sd1Net.controls[0].controlnet = models["sd1_a"]!
        assertThrowsError(containing: ["sd1_a", "does not fit the pipeline's UNet"]) { _ = try sdxl.generate(sd1Net) }
        // Requests denoised together share their ControlNets.
        var other = good
        other.controls[0].scale = 0.5
        assertThrowsError(containing: ["same ControlNets"]) { _ = try sd1.generate([good, other]) }
    }

    /// A whole ControlNet pipeline on the emulated CUDA backend gives diffusers' image.
    func testPipelineOnEmulatedCUDAMatchesDiffusers() throws {
        let cuda = try CUDABackendParityTests.sharedCUDA()
        let c = try XCTUnwrap(try Self.cases().first { $0.name == "sd1_dpmpp_scale13" })
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: cuda, scheduler: c.scheduler)
        var models: [String: ControlNetModel] = [:]
        let images = try pipeline.generate(Self.request(c, backend: cuda, models: &models))
        assertSameImages(images, try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name + " (emulated CUDA)")
    }

    /// The model on the emulated CUDA backend (the kernels the GPU runs, emulated on the CPU) gives diffusers' residuals.
    func testModelOnEmulatedCUDAMatchesDiffusers() throws {
        try checkModels(on: CUDABackendParityTests.sharedCUDA(), ["sd1_b", "sdxl_a"])
    }

    /// `pea generate --controlnet` end to end with PEA's --text-encoder/--adapter: the PNG diffusers makes, its size
    /// the control image's.
    func testGenerateCommandWithControlNetAndAdapter() throws {
        let c = try XCTUnwrap(try Self.cases().first { $0.name == "sd1_zh_euler_a" })
        let scratch = ScratchDirectory("pea-controlnet")
        let output = scratch.file("out.png")
        let pea = fixturesDirectory() + "/pea"
        var arguments = ["generate", "--model", fixturesDirectory() + "/pipelines/" + c.pipeline, "--prompt", c.prompt,
                         "--text-encoder", pea + "/zh_encoder", "--adapter", pea + "/" + c.adapter!,
                         "--controlnet", Self.directory + "/" + c.controlnets[0], "--control-image", Self.directory + "/" + c.control_images[0],
                         "--control-scale", "\(c.scales[0])", "--steps", "\(c.steps)", "--guidance", "\(c.guidance)", "--seed", "\(c.seed)",
                         "--output", output]
        if let scheduler = c.scheduler { arguments += ["--scheduler", scheduler] }
        let result = try runPea(arguments)
        XCTAssertEqual(result.status, 0, result.stderr)
        assertSameImages([try ImageDecoder.decodeRGB(path: output)], try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
    }

    /// `pea generate --controlnet` with control images diffusers resizes: 44×36 gives a 40×32 image (the default size,
    /// rounded down to multiples of 8), and with --width/--height it is resized to them; the PNGs diffusers makes.
    func testGenerateCommandResizesControlImages() throws {
        let cases = try Self.cases().filter { $0.control_images[0] == "control_44x36.png" }
        XCTAssertEqual(Set(cases.map(\.size_given)), [false, true])
        let scratch = ScratchDirectory("pea-controlnet-resize")
        for c in cases {
            let output = scratch.file(c.name + ".png")
            var arguments = ["generate", "--model", fixturesDirectory() + "/pipelines/" + c.pipeline, "--prompt", c.prompt,
                             "--controlnet", Self.directory + "/" + c.controlnets[0], "--control-image", Self.directory + "/" + c.control_images[0],
                             "--steps", "\(c.steps)", "--guidance", "\(c.guidance)", "--seed", "\(c.seed)", "--output", output]
            if let scheduler = c.scheduler { arguments += ["--scheduler", scheduler] }
            if let negative = c.negative_prompt { arguments += ["--negative-prompt", negative] }
            if c.size_given { arguments += ["--width", "\(c.width)", "--height", "\(c.height)"] }
            let result = try runPea(arguments)
            XCTAssertEqual(result.status, 0, result.stderr)
            let image = try ImageDecoder.decodeRGB(path: output)
            XCTAssertEqual([image.width, image.height], [c.width, c.height], c.name)
            assertSameImages([image], try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), c.name)
        }
    }

    /// Every mistake in a ControlNet command line is a clear error with a non-zero exit and no output file.
    func testBadControlNetCommandsFailAndWriteNothing() throws {
        let scratch = ScratchDirectory("pea-controlnet-bad")
        let output = scratch.file("out.png")
        let notImage = scratch.file("notes.png"), tiny = scratch.file("tiny.png"), prompts = scratch.file("prompts.txt")
        try "not an image".write(toFile: notImage, atomically: true, encoding: .utf8)
        try "x\n".write(toFile: prompts, atomically: true, encoding: .utf8)
        try PNGWriter.write(rgb: [UInt8](repeating: 128, count: 30 * 7 * 3), width: 30, height: 7, to: tiny)
        let sd1 = Self.directory + "/sd1_a", sdxl = Self.directory + "/sdxl_a", image = Self.directory + "/control_32x24.png"
        let missing = scratch.file("missing.png")
        let base = ["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompt", "x", "--steps", "2", "--output", output]
        try assertPeaFails([
            (base + ["--controlnet", sd1, "--control-image", missing], 1, [missing]),
            (base + ["--controlnet", sd1, "--control-image", notImage], 1, [notImage, "not a JPEG or PNG"]),
            (base + ["--controlnet", sd1, "--control-image", tiny], 2, [tiny, "30×7", "at least 8×8"]),
            (base + ["--controlnet", sd1, "--controlnet", sd1, "--control-image", tiny, "--control-image", image], 2, [tiny, "at least 8×8"]),
            (base + ["--controlnet", sd1], 2, ["one --control-image per --controlnet"]),
            (base + ["--controlnet", sd1, "--controlnet", sd1, "--control-image", image], 2, ["one --control-image per --controlnet"]),
            (base + ["--controlnet", sd1, "--control-image", image, "--control-scale", "1", "--control-scale", "2"], 2, ["--control-scale once"]),
            (base + ["--controlnet", sd1, "--control-image", image, "--control-scale", "1e300"], 2, ["--control-scale", "finite in float32", "1e300"]),
            (base + ["--controlnet", sd1, "--control-image", image, "--control-scale", "nan"], 2, ["--control-scale", "nan"]),
            (base + ["--controlnet", sd1, "--control-image", image, "--control-start", "0.7", "--control-end", "0.7"], 2, ["0 ≤ start < end ≤ 1"]),
            (base + ["--controlnet", sd1, "--control-image", image, "--control-end", "1.5"], 2, ["0 ≤ start < end ≤ 1"]),
            (base + ["--controlnet", scratch.path, "--control-image", image], 1, [scratch.path, "no config.json"]),
            (base + ["--controlnet", sdxl, "--control-image", image], 1, [sdxl, "does not fit the pipeline's UNet", "cross_attention_dim"]),
            (base + ["--control-image", image], 2, ["--control-image goes with --controlnet"]),
            (base + ["--controlnet", sd1, "--control-image", image, "--init-image", image], 2, ["text-to-image only"]),
            (["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", prompts, "--output-dir", scratch.file("job"),
              "--controlnet", sd1, "--control-image", image], 2, ["--control-image is for a single --prompt"]),
        ], leavesNo: output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: scratch.file("job")))
    }

    /// A prompt file with the job's --controlnet and items' "control_image" (relative to the file's folder, or
    /// absolute), two items denoised together: each image the one diffusers makes; results.jsonl records the images.
    func testPromptFileItemsWithControlImages() throws {
        let c = try XCTUnwrap(try Self.cases().first { $0.name == "sd1_dpmpp_scale13" })
        let scratch = ScratchDirectory("pea-controlnet-job")
        _ = scratch.write(try XCTUnwrap(readFileBytes(Self.directory + "/" + c.control_images[0])), to: "edges.png")
        func line(id: String, image: String) -> String {
            let object: [String: JSONValue] = [
                "prompt": .string(c.prompt), "id": .string(id), "negative_prompt": .string(c.negative_prompt!),
                "control_image": .string(image), "seed": .number(Double(c.seed)), "steps": .number(Double(c.steps)),
                "guidance": .number(Double(c.guidance)), "scheduler": .string(c.scheduler!)]
            var bytes: [UInt8] = []
            JSONValue.object(object).serialize(into: &bytes)
            return String(decoding: bytes, as: UTF8.self)
        }
        let prompts = scratch.write([line(id: "relative", image: "edges.png"),
                                     line(id: "absolute", image: Self.directory + "/" + c.control_images[0])].joined(separator: "\n"), to: "p.jsonl")
        let out = scratch.file("out")
        let result = try runPea(["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", prompts, "--output-dir", out,
                                 "--batch-size", "2", "--backend", "cpu", "--controlnet", Self.directory + "/" + c.controlnets[0],
                                 "--control-scale", "\(c.scales[0])"])
        XCTAssertEqual(result.status, 0, result.stderr)
        for key in ["relative", "absolute"] {
            let png = try PNGReader.read(path: out + "/" + key + ".png")
            assertSameImages([RGBImage(width: png.width, height: png.height, pixels: png.pixels)],
                             try SafeTensorsFile(path: Self.directory + "/" + c.images).tensor("images"), "job item \(key)")
        }
        let results = try String(contentsOfFile: out + "/results.jsonl", encoding: .utf8)
        XCTAssertTrue(results.contains("edges.png"), results)

        // Items and the command line must agree on the ControlNets, and every control image be readable and large
        // enough, before anything is written.
        let bad = scratch.write(line(id: "x", image: "edges.png") + "\n" + #"{"prompt": "no image", "width": 32, "height": 24}"#, to: "bad.jsonl")
        try PNGWriter.write(rgb: [UInt8](repeating: 9, count: 5 * 40 * 3), width: 5, height: 40, to: scratch.file("thin.png"))
        let thin = scratch.write(line(id: "x", image: "edges.png") + "\n" + line(id: "y", image: "thin.png"), to: "thin.jsonl")
        let missing = scratch.write(line(id: "x", image: "gone.png"), to: "missing.jsonl")
        let badOut = scratch.file("bad-out")
        try assertPeaFails([
            (["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", thin, "--output-dir", badOut,
              "--controlnet", Self.directory + "/sd1_a"], 1, [thin, "line 2", "thin.png", "5×40", "at least 8×8"]),
            (["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", missing, "--output-dir", badOut,
              "--controlnet", Self.directory + "/sd1_a"], 1, ["gone.png"]),
            (["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", bad, "--output-dir", badOut,
              "--controlnet", Self.directory + "/sd1_a"], 1, [bad, "line 2", "0 control_image(s) for 1 --controlnet"]),
            (["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompts", bad, "--output-dir", badOut],
             1, [bad, "line 1", "'control_image' needs --controlnet"]),
        ], leavesNo: badOut)
    }
}
