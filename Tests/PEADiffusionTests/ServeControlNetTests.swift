import Foundation
import XCTest
@testable import PEADiffusion

/// `pea serve --controlnet`: A1111's ControlNet extension units on /sdapi/v1/txt2img make `pea generate
/// --controlnet`'s images (one and two ControlNets, weight and guidance window, control images resized to the
/// default or the given size), the units' mistakes are 400s,
/// and requests are batched only with the same ControlNet settings.
extension ServeTests {
    static let controlnets = fixturesDirectory() + "/controlnet"

    private static func base64(_ name: String) throws -> String {
        base64Encoded(try XCTUnwrap(readFileBytes(controlnets + "/" + name)))
    }

    func testServedControlNetImagesArePeaGeneratesImages() throws {
        let scratch = ScratchDirectory()
        let a = Self.controlnets + "/sd1_a", b = Self.controlnets + "/sd1_b"
        let server = try Server(["--model", sd1, "--controlnet", a, "--controlnet", b], scratch: scratch)
        let health = try JSONSerialization.jsonObject(with: Data(try server.request("GET", "/health").body.utf8)) as? [String: Any]
        XCTAssertEqual(health?["controlnets"] as? [String], ["sd1_a", "sd1_b"])
        let common = ["--prompt", "a red circle", "--steps", "4", "--guidance", "7", "--scheduler", "euler-a", "--seed", "11"]
        let body: ([[String: Any]]) -> [String: Any] = { units in
            ["prompt": "a red circle", "steps": 4, "cfg_scale": 7, "sampler_name": "Euler a", "seed": 11,
             "alwayson_scripts": ["controlnet": ["args": units]]]
        }

        // One ControlNet with a weight and a guidance window; the size is the control image's (32×24).
        let one = try server.post("/sdapi/v1/txt2img", body([
            ["enabled": true, "image": try Self.base64("control_32x24.png"), "model": "sd1_a", "weight": 0.5,
             "guidance_start": 0.25, "guidance_end": 0.75, "module": "none", "resize_mode": "Crop and Resize",
             "control_mode": "Balanced", "pixel_perfect": false, "processor_res": 512],
        ]))
        XCTAssertEqual(one.status, 200, "\(one.json)")
        let expectedOne = try generated(common + ["--controlnet", a, "--control-image", Self.controlnets + "/control_32x24.png",
                                                  "--control-scale", "0.5", "--control-start", "0.25", "--control-end", "0.75"],
                                        scratch: scratch, name: "one.png")
        XCTAssertEqual(expectedOne.width, 32)
        assertSameImage(try XCTUnwrap(images(one.json["images"] as? [Any]).first), expectedOne, "one ControlNet, weight 0.5, window 0.25–0.75")
        let echoed = ((one.json["parameters"] as? [String: Any])?["alwayson_scripts"] as? [String: Any])?["controlnet"] as? [String: Any]
        let echoedUnit = (echoed?["args"] as? [[String: Any]])?.first
        XCTAssertEqual(echoedUnit?["model"] as? String, "sd1_a")
        XCTAssertNil(echoedUnit?["image"], "the control image is not sent back")

        // Two ControlNets (by index and by A1111's "name [hash]"; "input_image" for the image) with their own weights,
        // and a disabled unit that is skipped.
        let two = try server.post("/sdapi/v1/txt2img", body([
            ["enabled": false, "model": "nonexistent"],
            ["input_image": try Self.base64("control2_32x24.png"), "model": 1, "weight": 1.3],
            ["image": try Self.base64("control_32x24.png"), "model": "sd1_a [0123abcd]", "weight": 0.7],
        ]))
        XCTAssertEqual(two.status, 200, "\(two.json)")
        let expectedTwo = try generated(common + ["--controlnet", b, "--control-image", Self.controlnets + "/control2_32x24.png",
                                                  "--controlnet", a, "--control-image", Self.controlnets + "/control_32x24.png",
                                                  "--control-scale", "1.3", "--control-scale", "0.7"],
                                        scratch: scratch, name: "two.png")
        assertSameImage(try XCTUnwrap(images(two.json["images"] as? [Any]).first), expectedTwo, "two ControlNets")
        XCTAssertNotEqual(try XCTUnwrap(images(two.json["images"] as? [Any]).first).pixels, expectedOne.pixels)

        // A 44×36 control image sets a 40×32 image (rounded down to multiples of 8); with width/height it is resized
        // to them; as `pea generate --control-image` does.
        let resizes: [([String: Any], [String], [Int])] = [([:], [], [40, 32]), (["width": 24, "height": 32], ["--width", "24", "--height", "32"], [24, 32])]
        for (extra, arguments, size) in resizes {
            let served = try server.post("/sdapi/v1/txt2img", body([["image": try Self.base64("control_44x36.png"), "model": "sd1_a"]])
                .merging(extra) { $1 })
            XCTAssertEqual(served.status, 200, "\(served.json)")
            let expected = try generated(common + arguments + ["--controlnet", a, "--control-image", Self.controlnets + "/control_44x36.png"],
                                         scratch: scratch, name: "resized-\(size[0]).png")
            XCTAssertEqual([expected.width, expected.height], size)
            assertSameImage(try XCTUnwrap(images(served.json["images"] as? [Any]).first), expected, "control image resized to \(size)")
        }

        // Without units the request is plain text-to-image (the model's size).
        let plain = try server.post("/sdapi/v1/txt2img", ["prompt": "a red circle", "steps": 2, "seed": 1, "alwayson_scripts": [:] as [String: Any]])
        XCTAssertEqual(plain.status, 200, "\(plain.json)")
    }

    /// Concurrent requests with the same unit settings but different control images are denoised together; one with
    /// another weight is not. Each keeps its own image.
    func testConcurrentControlNetRequestsAreBatchedByTheirSettings() throws {
        let scratch = ScratchDirectory()
        let a = Self.controlnets + "/sd1_a"
        let server = try Server(["--model", sd1, "--controlnet", a, "--max-batch", "4", "--batch-wait", "2"], scratch: scratch)
        let settings: [(image: String, weight: Double)] = [("control_32x24.png", 1), ("control2_32x24.png", 1), ("control2_32x24.png", 0.5)]
        let bodies: [[String: Any]] = try settings.enumerated().map { number, setting in
            ["prompt": "a red circle", "seed": 30 + number, "steps": 3, "cfg_scale": 7.5,
             "alwayson_scripts": ["controlnet": ["args": [["image": try Self.base64(setting.image), "model": "sd1_a", "weight": setting.weight]]]]]
        }
        var results = [(status: Int, json: [String: Any])?](repeating: nil, count: bodies.count)
        let lock = NSLock()
        concurrently(bodies.count) { number in
            let result = try? server.post("/sdapi/v1/txt2img", bodies[number])
            lock.lock(); results[number] = result; lock.unlock()
        }
        XCTAssertEqual(try server.metric("pea_batches_total{images=\"2\"}"), 1)
        XCTAssertEqual(try server.metric("pea_batches_total{images=\"1\"}"), 1)
        for (number, setting) in settings.enumerated() {
            let result = try XCTUnwrap(results[number])
            XCTAssertEqual(result.status, 200, "\(result.json)")
            let expected = try generated(["--prompt", "a red circle", "--seed", "\(30 + number)", "--steps", "3", "--controlnet", a,
                                          "--control-image", Self.controlnets + "/" + setting.image, "--control-scale", "\(setting.weight)"],
                                         scratch: scratch, name: "\(number).png")
            assertSameImage(try XCTUnwrap(images(result.json["images"] as? [Any]).first), expected, "request \(number)", batched: number < 2)
        }
    }

    /// An in-process server (no HTTP) over the fixture pipeline, with `controlnets` loaded.
    private func inProcessServer(controlnets: [String]) throws -> GenerationServer {
        var configuration = GenerationServer.Configuration()
        configuration.port = 0
        let pipeline = try StableDiffusionPipeline.load(folder: sd1, backend: CPUBackend())
        let models = try controlnets.map { ($0, try ControlNetModel.load(folder: Self.controlnets + "/" + $0, backend: pipeline.backend).model) }
        return try GenerationServer(model: .init(pipelines: ["english": pipeline], defaultChoice: "english", folder: "sd1", backendName: "cpu",
                                                 controlnets: models), configuration: configuration)
    }

    func testControlNetUnitMistakesAre400() throws {
        let server = try inProcessServer(controlnets: ["sd1_a", "sd1_b"])
        defer { server.stop() }
        let image = try Self.base64("control_32x24.png"), other = try Self.base64("control_24x32.png")
        let thin = base64Encoded(try PNGWriter.encode(rgb: [UInt8](repeating: 7, count: 5 * 40 * 3), width: 5, height: 40))
        func post(_ path: String, _ units: Any, extra: String = "", on target: GenerationServer? = nil) throws -> (Int, String) {
            let scripts = String(decoding: try JSONSerialization.data(withJSONObject: ["controlnet": ["args": units]]), as: UTF8.self)
            var request = HTTPRequest(method: "POST", target: path)
            request.body = Array("{\"prompt\": \"a\", \"steps\": 1\(extra), \"alwayson_scripts\": \(scripts)}".utf8)
            let response = (target ?? server).handle(request)
            let json = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]
            return (response.status, json?["error"] as? String ?? String(decoding: response.body, as: UTF8.self))
        }
        let unit: [String: Any] = ["image": image, "model": "sd1_a"]
        func with(_ changes: [String: Any]) -> [[String: Any]] { [unit.merging(changes) { $1 }] }
        let cases: [(String, Any, String, [String])] = [
            ("/sdapi/v1/txt2img", with(["model": "canny_v11"]), "", ["args[0].model", "canny_v11", "0 \"sd1_a\"", "1 \"sd1_b\""]),
            ("/sdapi/v1/txt2img", with(["model": 2]), "", ["args[0].model", "1 \"sd1_b\""]),
            ("/sdapi/v1/txt2img", with(["model": NSNull()]), "", ["args[0].model is required"]),
            ("/sdapi/v1/txt2img", with(["module": "canny"]), "", ["args[0].module", "canny", "preprocessor"]),
            ("/sdapi/v1/txt2img", with(["image": "not base64!"]), "", ["args[0].image is not base64"]),
            ("/sdapi/v1/txt2img", with(["image": base64Encoded(Array("hello".utf8))]), "", ["args[0].image", "not a JPEG or PNG"]),
            ("/sdapi/v1/txt2img", [["model": "sd1_a"]], "", ["args[0].image is required"]),
            ("/sdapi/v1/txt2img", with(["weight": "strong"]), "", ["args[0].weight must be a number"]),
            ("/sdapi/v1/txt2img", with(["guidance_start": 0.8, "guidance_end": 0.5]), "", ["args[0]", "guidance_start must be less than guidance_end"]),
            ("/sdapi/v1/txt2img", with(["guidance_end": 1.5]), "", ["args[0].guidance_end must be in 0.0...1.0"]),
            ("/sdapi/v1/txt2img", with(["control_mode": "ControlNet is more important"]), "", ["args[0].control_mode", "Balanced"]),
            ("/sdapi/v1/txt2img", with(["control_mode": 2]), "", ["args[0].control_mode", "Balanced"]),
            ("/sdapi/v1/txt2img", with(["resize_mode": "Stretch"]), "", ["args[0].resize_mode", "Crop and Resize"]),
            ("/sdapi/v1/txt2img", with(["mask": image]), "", ["args[0].mask", "masks"]),
            ("/sdapi/v1/txt2img", with(["enabled": "yes"]), "", ["args[0].enabled"]),
            ("/sdapi/v1/txt2img", with(["image": thin]), "", ["args[0].image", "5×40", "at least 8×8"]),
            ("/sdapi/v1/txt2img", ["not a unit"], "", ["args[0] must be an object"]),
            ("/sdapi/v1/txt2img", "args", "", ["args must be a list"]),
            ("/sdapi/v1/img2img", [unit], ", \"denoising_strength\": 1, \"init_images\": [\"\(image)\"]", ["args[0]", "text-to-image only"]),
        ]
        for (path, units, extra, fragments) in cases {
            let (status, text) = try post(path, units, extra: extra)
            XCTAssertEqual(status, 400, "\(units): \(text)")
            for fragment in fragments { XCTAssertTrue(text.contains(fragment), "\(units): '\(fragment)' not in \(text)") }
        }
        // Control images of differing sizes are all resized to the first's (diffusers would refuse them), and a given
        // width/height resizes them too.
        XCTAssertEqual(try post("/sdapi/v1/txt2img", [unit, ["image": other, "model": "sd1_b"]]).0, 200)
        XCTAssertEqual(try post("/sdapi/v1/txt2img", [unit], extra: ", \"width\": 16, \"height\": 40").0, 200)
        // A server without --controlnet refuses enabled units, and takes disabled ones.
        let plain = try inProcessServer(controlnets: [])
        defer { plain.stop() }
        let (status, text) = try post("/sdapi/v1/txt2img", [unit], on: plain)
        XCTAssertEqual(status, 400, text)
        XCTAssertTrue(text.contains("no ControlNets") && text.contains("--controlnet DIR"), text)
        XCTAssertEqual(try post("/sdapi/v1/txt2img", [["enabled": false]], on: plain).0, 200)
    }

    func testRequestsAreBatchedOnlyWithTheSameControlNetSettings() {
        let red = RGBImage(width: 8, height: 8, pixels: Array(repeating: 200, count: 192))
        let blue = RGBImage(width: 8, height: 8, pixels: Array(repeating: 20, count: 192))
        func item(_ index: Int, _ controls: [JobItem.Control]) -> JobItem {
            var item = JobItem(index: index, line: 0, id: nil, prompt: "p", negativePrompt: nil, seed: 1, width: 8, height: 8, steps: 2,
                               guidance: 7, scheduler: nil, batch: 1, text: nil)
            item.controls = controls
            return item
        }
        let base = JobItem.Control(net: 0, image: red, scale: 1, start: 0, end: 1)
        var otherImage = base, otherNet = base, otherScale = base, otherWindow = base
        otherImage.image = blue
        otherNet.net = 1
        otherScale.scale = 0.5
        otherWindow.end = 0.5
        let items = [item(0, [base]), item(1, [otherImage]), item(2, [otherNet]), item(3, [otherScale]), item(4, [otherWindow]),
                     item(5, []), item(6, [base, base])]
        let batches = JobBatches.plan(items, size: 8).map { $0.map(\.index) }
        XCTAssertEqual(batches, [[0, 1], [2], [3], [4], [5], [6]], "different images batch together; nets, scales, windows, counts do not")
    }

    func testServeControlNetOptionIsCheckedAtStartAndDocumented() throws {
        let help = try runPea(["serve", "--help"])
        XCTAssertEqual(help.status, 0)
        for fragment in ["--controlnet DIR", "alwayson_scripts", "guidance_start", "input_image", "\"none\"", "Not on img2img",
                         "every image is Lanczos-resized to them"] {
            XCTAssertTrue(help.stdout.contains(fragment), "'\(fragment)' not in pea serve --help")
        }
        let scratch = ScratchDirectory()
        for (arguments, status, fragments) in [
            (["--controlnet", Self.controlnets + "/sdxl_a"], Int32(1), [Self.controlnets + "/sdxl_a", "does not fit the pipeline's UNet"]),
            (["--controlnet", scratch.path], 1, [scratch.path, "no config.json"]),
            (["--controlnet", Self.controlnets + "/sd1_a", "--controlnet", Self.controlnets + "/sd1_a/"], 2, ["two --controlnet folders are named 'sd1_a'"]),
        ] {
            let result = try runPea(["serve", "--model", sd1, "--backend", "cpu", "--port", "0"] + arguments)
            XCTAssertEqual(result.status, status, "\(arguments): \(result.stderr)")
            for fragment in fragments { XCTAssertTrue(result.stderr.contains(fragment), "\(arguments): '\(fragment)' not in \(result.stderr)") }
        }
    }
}
