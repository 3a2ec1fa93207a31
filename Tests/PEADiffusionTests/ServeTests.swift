#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import XCTest
@testable import PEADiffusion

/// `pea serve` as a real process on 127.0.0.1 (port 0, the chosen port read from its log) with the tiny fixture
/// pipeline, spoken to over real sockets (`TestClient`): every endpoint, pixel parity with `pea generate`,
/// batching of concurrent requests, errors, the API key, the queue limit and SIGTERM. Every wait is bounded.
final class ServeTests: XCTestCase {
    let sd1 = fixturesDirectory() + "/pipelines/sd1"
    let zhEncoder = fixturesDirectory() + "/pea/zh_encoder"
    let adapter = fixturesDirectory() + "/pea/adapter_sd1.safetensors"

    /// A running `pea serve` and its port; terminated (and waited for) when the test ends.
    final class Server {
        let process: Process
        let port: Int
        let log: String

        /// `pea serve --port 0 arguments` on the CPU (unless `arguments` name a --backend) with one thread.
        init(_ arguments: [String], scratch: ScratchDirectory, environment: [String: String?] = [:]) throws {
            log = scratch.file("serve.log")
            let backend = arguments.contains("--backend") ? [] : ["--backend", "cpu"]
            process = try startPea(["serve", "--port", "0", "--threads", "1"] + backend + arguments, log: log, environment: environment)
            let deadline = Date().addingTimeInterval(60)
            var found: Int?
            while found == nil, Date() < deadline, process.isRunning {
                let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
                if let range = text.range(of: "pea serve: listening on http://127.0.0.1:") {
                    found = Int(text[range.upperBound...].prefix { $0.isNumber })
                }
                if found == nil { usleep(50_000) }
            }
            guard let found else {
                if process.isRunning { process.terminate() }
                throw XCTSkip("pea serve did not start: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
            }
            port = found
        }

        /// SIGTERM, then the exit status (bounded: SIGKILL after 30 s).
        @discardableResult
        func stop() -> Int32 {
            if process.isRunning { process.terminate() }
            return waitForExit()
        }

        /// The exit status, once the process ends by itself (bounded: SIGKILL after 30 s).
        func waitForExit() -> Int32 {
            let deadline = Date().addingTimeInterval(30)
            while process.isRunning, Date() < deadline { usleep(20_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            return process.terminationStatus
        }

        deinit { stop() }

        func request(_ method: String, _ path: String, body: String? = nil, headers: [String] = []) throws -> TestClient.Response {
            let client = try TestClient(port: port, timeout: 60)
            var text = "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers.map { $0 + "\r\n" }.joined()
            if let body { text += "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n" }
            client.send(text + "\r\n" + (body ?? ""))
            guard let response = client.readResponse() else { throw PEAError.usage("no response to \(method) \(path)") }
            return response
        }

        func post(_ path: String, _ object: [String: Any], headers: [String] = []) throws -> (status: Int, json: [String: Any]) {
            let body = String(decoding: try JSONSerialization.data(withJSONObject: object), as: UTF8.self)
            let response = try request("POST", path, body: body, headers: headers)
            let json = try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any]
            return (response.status, json ?? [:])
        }

        func metric(_ line: String) throws -> Int? {
            let text = try request("GET", "/metrics").body
            return text.split(separator: "\n").first { $0.hasPrefix(line + " ") }.flatMap { Int($0.split(separator: " ").last!) }
        }
    }

    /// Runs `body(0)` … `body(count - 1)` on threads of their own (not GCD's pool, which may run only as many
    /// at once as there are cores) and waits for all of them (bounded: 120 s).
    func concurrently(_ count: Int, _ body: @escaping (Int) -> Void) {
        final class Body: @unchecked Sendable {
            let run: (Int) -> Void
            init(_ run: @escaping (Int) -> Void) { self.run = run }
        }
        let group = DispatchGroup(), shared = Body(body)
        for number in 0..<count {
            group.enter()
            Thread.detachNewThread { shared.run(number); group.leave() }
        }
        XCTAssertEqual(group.wait(timeout: .now() + 120), .success, "clients still waiting after 120 s")
    }

    /// The PNGs of a response, decoded, with their parameters chunks.
    func images(_ base64: [Any]?) throws -> [PNGImage] {
        try (base64 ?? []).map { item in
            let text = try XCTUnwrap(item as? String)
            let data = try XCTUnwrap(Data(base64Encoded: text), "not base64")
            return try PNGReader.decode(Array(data), path: "<response>")
        }
    }

    /// The image `pea generate` writes with `arguments` (and the fixture pipeline).
    func generated(_ arguments: [String], scratch: ScratchDirectory, name: String) throws -> PNGImage {
        let path = scratch.file(name)
        let result = try runPea(["generate", "--model", sd1, "--backend", "cpu", "--threads", "1", "--output", path] + arguments)
        XCTAssertEqual(result.status, 0, result.stderr)
        return try PNGReader.read(path: path)
    }

    /// The served image is `pea generate`'s: the same parameters chunk, and the same pixels — exactly for an
    /// image denoised alone (`batched` false), within 1/255 per channel (float rounding of a larger batch, as in
    /// prompt-file jobs) for one denoised in a batch with others.
    func assertSameImage(_ served: PNGImage, _ expected: PNGImage, _ what: String, batched: Bool = false,
                                 file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(served.width, expected.width, what, file: file, line: line)
        XCTAssertEqual(served.height, expected.height, what, file: file, line: line)
        let difference = zip(served.pixels, expected.pixels).map { abs(Int($0) - Int($1)) }.max() ?? 0
        XCTAssertEqual(served.pixels.count, expected.pixels.count, what, file: file, line: line)
        XCTAssertLessThanOrEqual(difference, batched ? 1 : 0, "\(what): pixels differ from pea generate's by up to \(difference)", file: file, line: line)
        XCTAssertEqual(served.text("parameters"), expected.text("parameters"), what, file: file, line: line)
    }

    func testA1111AndOpenAIImagesAreThoseOfPeaGenerateAndHealthAndMetricsAnswer() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--max-batch", "4"], scratch: scratch)

        // A1111: two images (batch_size 2), seeds 5 and 6, Euler a, a negative prompt.
        let a1111 = try server.post("/sdapi/v1/txt2img", ["prompt": "a red circle", "negative_prompt": "blurry", "seed": 5, "steps": 3,
                                                           "cfg_scale": 7.5, "width": 32, "height": 40, "sampler_name": "Euler a", "batch_size": 2])
        XCTAssertEqual(a1111.status, 200, "\(a1111.json)")
        let served = try images(a1111.json["images"] as? [Any])
        XCTAssertEqual(served.count, 2)
        let common = ["--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "3", "--guidance", "7.5",
                      "--width", "32", "--height", "40", "--scheduler", "euler-a"]
        for (number, image) in served.enumerated() {
            let expected = try generated(common + ["--seed", String(5 + number)], scratch: scratch, name: "a\(number).png")
            assertSameImage(image, expected, "txt2img image \(number)", batched: true)
        }
        let info = try JSONSerialization.jsonObject(with: Data(try XCTUnwrap(a1111.json["info"] as? String).utf8)) as? [String: Any]
        XCTAssertEqual(info?["seed"] as? Int, 5)
        XCTAssertEqual(info?["all_seeds"] as? [Int], [5, 6])
        XCTAssertEqual((info?["infotexts"] as? [String])?.first, served.first?.text("parameters"))
        XCTAssertEqual((a1111.json["parameters"] as? [String: Any])?["prompt"] as? String, "a red circle")

        // "DPM++ 2M" with "scheduler": "Karras" is dpmpp-2m-karras.
        let karras = try server.post("/sdapi/v1/txt2img", ["prompt": "a blue square", "seed": 9, "steps": 3, "cfg_scale": 7.5,
                                                           "sampler_name": "DPM++ 2M", "scheduler": "Karras"])
        XCTAssertEqual(karras.status, 200, "\(karras.json)")
        assertSameImage(try images(karras.json["images"] as? [Any])[0],
                        try generated(["--prompt", "a blue square", "--seed", "9", "--steps", "3", "--scheduler", "dpmpp-2m-karras"],
                                      scratch: scratch, name: "k.png"), "DPM++ 2M + Karras")

        // OpenAI: defaults are pea generate's (the folder's scheduler, guidance 7.5), size WxH.
        let openAI = try server.post("/v1/images/generations", ["prompt": "a green triangle", "n": 1, "size": "48x32", "seed": 11,
                                                                "steps": 4, "response_format": "b64_json"])
        XCTAssertEqual(openAI.status, 200, "\(openAI.json)")
        XCTAssertNotNil(openAI.json["created"] as? Int)
        let data = try XCTUnwrap(openAI.json["data"] as? [[String: Any]])
        assertSameImage(try images(data.map { $0["b64_json"] as Any })[0],
                        try generated(["--prompt", "a green triangle", "--seed", "11", "--steps", "4", "--width", "48", "--height", "32"],
                                      scratch: scratch, name: "o.png"), "OpenAI image")

        // Seed -1: a random seed, reported.
        let random = try server.post("/sdapi/v1/txt2img", ["prompt": "x", "seed": -1, "steps": 1])
        XCTAssertEqual(random.status, 200)
        let randomInfo = try JSONSerialization.jsonObject(with: Data(try XCTUnwrap(random.json["info"] as? String).utf8)) as? [String: Any]
        XCTAssertGreaterThanOrEqual(randomInfo?["seed"] as? Int ?? -1, 0)

        let health = try server.request("GET", "/health")
        XCTAssertEqual(health.status, 200)
        let healthJSON = try JSONSerialization.jsonObject(with: Data(health.body.utf8)) as? [String: Any]
        XCTAssertEqual(healthJSON?["model"] as? String, sd1)
        XCTAssertEqual(healthJSON?["backend"] as? String, "cpu")
        XCTAssertEqual(healthJSON?["queue_depth"] as? Int, 0)
        XCTAssertEqual(healthJSON?["status"] as? String, "ok")

        XCTAssertEqual(try server.metric("pea_requests_total{endpoint=\"/sdapi/v1/txt2img\",status=\"200\"}"), 3)
        XCTAssertEqual(try server.metric("pea_requests_total{endpoint=\"/v1/images/generations\",status=\"200\"}"), 1)
        XCTAssertEqual(try server.metric("pea_images_generated_total"), 5)
        XCTAssertEqual(try server.metric("pea_queue_depth"), 0)
        XCTAssertEqual(try server.metric("pea_request_duration_seconds_count{endpoint=\"/sdapi/v1/txt2img\"}"), 3)
        XCTAssertEqual(server.stop(), 0)
    }

    /// `POST /sdapi/v1/img2img`: the image `pea generate --init-image PATH --strength S` makes (the same pixels and
    /// parameters chunk), a `data:` URL prefix accepted; two img2img requests of one strength batch together; bad
    /// init images and strengths are 400s naming the field.
    func testA1111Img2ImgIsPeaGeneratesImageToImage() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--max-batch", "4", "--batch-wait", "2"], scratch: scratch)
        let initPath = fixturesDirectory() + "/img2img/init_32x24.png"
        let initImage = base64Encoded(try XCTUnwrap(readFileBytes(initPath)))
        let bodies: [[String: Any]] = [
            ["prompt": "a red circle", "seed": 5, "steps": 4, "cfg_scale": 7.5, "denoising_strength": 0.5, "init_images": [initImage]],
            ["prompt": "a blue square", "seed": 6, "steps": 4, "cfg_scale": 7.5, "denoising_strength": 0.5, "init_images": ["data:image/png;base64," + initImage]],
        ]
        var results = [(status: Int, json: [String: Any])?](repeating: nil, count: 2)
        let lock = NSLock()
        concurrently(2) { number in
            let result = try? server.post("/sdapi/v1/img2img", bodies[number])
            lock.lock(); results[number] = result; lock.unlock()
        }
        XCTAssertEqual(try server.metric("pea_batches_total{images=\"2\"}"), 1, "two img2img requests of one strength are batched")
        for (number, (prompt, seed)) in [("a red circle", "5"), ("a blue square", "6")].enumerated() {
            let result = try XCTUnwrap(results[number])
            XCTAssertEqual(result.status, 200, "\(result.json)")
            let expected = try generated(["--prompt", prompt, "--seed", seed, "--steps", "4", "--init-image", initPath, "--strength", "0.5"],
                                         scratch: scratch, name: "\(number).png")
            assertSameImage(try images(result.json["images"] as? [Any])[0], expected, "img2img request \(number)", batched: true)
            XCTAssertTrue(expected.text("parameters")?.contains("Denoising strength: 0.5") == true)
            XCTAssertNil((result.json["parameters"] as? [String: Any])?["init_images"], "the init image is not echoed")
        }
        let png = base64Encoded(Array("not an image".utf8))
        let tinyPath = scratch.file("tiny.png")
        try PNGWriter.write(rgb: [UInt8](repeating: 90, count: 20 * 7 * 3), width: 20, height: 7, to: tinyPath)
        let tiny = base64Encoded(try XCTUnwrap(readFileBytes(tinyPath)))
        for (body, fragment) in [(#"{"prompt": "x"}"#, "init_images is required"),
                                 (#"{"init_images": "abc"}"#, "init_images must be a list of one base64 image"),
                                 (#"{"init_images": ["%%%"]}"#, "init_images[0] is not base64"),
                                 ("{\"init_images\": [\"\(png)\"]}", "init_images[0]"),
                                 ("{\"init_images\": [\"\(tiny)\"]}", "at least 8×8"),
                                 ("{\"init_images\": [\"\(initImage)\"], \"width\": 60}", "width must be a multiple of 8"),
                                 ("{\"init_images\": [\"\(initImage)\"], \"denoising_strength\": 1.5}", "denoising_strength"),
                                 ("{\"init_images\": [\"\(initImage)\"], \"denoising_strength\": 0.01, \"steps\": 10}", "too low")] {
            let response = try server.request("POST", "/sdapi/v1/img2img", body: body)
            XCTAssertEqual(response.status, 400, "\(body.prefix(80)): \(response.body)")
            XCTAssertTrue(response.body.contains(fragment), "\(body.prefix(80)): '\(fragment)' not in \(response.body)")
        }
        XCTAssertEqual(server.stop(), 0)
    }

    /// Inpainting through `/sdapi/v1/img2img`: a `mask` gives `pea generate --init-image --mask`'s image;
    /// `inpainting_mask_invert` 1 is the inverted mask's; a mask of another size is a 400; an inpainting model's
    /// server refuses requests without a mask with a 400, not a failed batch.
    func testA1111InpaintingIsPeaGeneratesWithAMask() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1], scratch: scratch)
        let initPath = fixturesDirectory() + "/img2img/init_32x24.png", maskPath = fixturesDirectory() + "/inpaint/mask_32x24.png"
        let initImage = base64Encoded(try XCTUnwrap(readFileBytes(initPath))), mask = base64Encoded(try XCTUnwrap(readFileBytes(maskPath)))
        let maskImage = try ImageDecoder.decodeRGB(path: maskPath)
        let inverted = scratch.file("inverted.png")
        try PNGWriter.write(rgb: maskImage.pixels.map { 255 - $0 }, width: maskImage.width, height: maskImage.height, to: inverted)
        for (invert, file) in [(0, maskPath), (1, inverted)] {
            let result = try server.post("/sdapi/v1/img2img", ["prompt": "a boat", "seed": 8, "steps": 3, "cfg_scale": 7.5, "denoising_strength": 0.6,
                                                               "init_images": [initImage], "mask": mask, "inpainting_mask_invert": invert])
            XCTAssertEqual(result.status, 200, "\(result.json)")
            let expected = try generated(["--prompt", "a boat", "--seed", "8", "--steps", "3", "--init-image", initPath, "--mask", file,
                                          "--strength", "0.6"], scratch: scratch, name: "mask\(invert).png")
            assertSameImage(try images(result.json["images"] as? [Any])[0], expected, "inpainting, invert \(invert)")
        }
        // A mask of another size is resized like the image, and mask_blur blurs it as --mask-blur does.
        let otherPath = fixturesDirectory() + "/inpaint/mask_24x32.png"
        let other = base64Encoded(try XCTUnwrap(readFileBytes(otherPath)))
        let blurred = try server.post("/sdapi/v1/img2img", ["prompt": "a boat", "seed": 8, "steps": 3, "cfg_scale": 7.5, "denoising_strength": 0.6,
                                                            "init_images": [initImage], "mask": other, "mask_blur": 3])
        XCTAssertEqual(blurred.status, 200, "\(blurred.json)")
        let expectedBlurred = try generated(["--prompt", "a boat", "--seed", "8", "--steps", "3", "--init-image", initPath, "--mask", otherPath,
                                             "--mask-blur", "3", "--strength", "0.6"], scratch: scratch, name: "blurred.png")
        assertSameImage(try images(blurred.json["images"] as? [Any])[0], expectedBlurred, "inpainting, other-sized mask, mask_blur 3")
        let wrong = try server.post("/sdapi/v1/img2img", ["init_images": [initImage], "mask": mask, "mask_blur": -1])
        XCTAssertEqual(wrong.status, 400)
        XCTAssertTrue((wrong.json["error"] as? String ?? "").contains("mask_blur"), "\(wrong.json)")
        XCTAssertEqual(server.stop(), 0)

        let inpaintingServer = try Server(["--model", fixturesDirectory() + "/inpaint/sd1_inpainting"], scratch: scratch)
        let refused = try inpaintingServer.post("/sdapi/v1/txt2img", ["prompt": "x", "steps": 1])
        XCTAssertEqual(refused.status, 400)
        XCTAssertTrue((refused.json["error"] as? String ?? "").contains("inpainting model"), "\(refused.json)")
        let accepted = try inpaintingServer.post("/sdapi/v1/img2img", ["prompt": "x", "steps": 2, "init_images": [initImage], "mask": mask])
        XCTAssertEqual(accepted.status, 200, "\(accepted.json)")
        XCTAssertEqual(inpaintingServer.stop(), 0)
    }

    func testAdapterOrEnglishEncoderPerRequestMatchesPeaGenerate() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--text-encoder", zhEncoder, "--adapter", adapter], scratch: scratch)
        let settings = ["--steps", "3", "--seed", "4", "--width", "32", "--height", "32"]
        let viaAdapter = try server.post("/sdapi/v1/txt2img", ["prompt": "一个红色的圆形", "seed": 4, "steps": 3, "cfg_scale": 7.5, "width": 32, "height": 32])
        XCTAssertEqual(viaAdapter.status, 200, "\(viaAdapter.json)")
        assertSameImage(try images(viaAdapter.json["images"] as? [Any])[0],
                        try generated(["--prompt", "一个红色的圆形", "--text-encoder", zhEncoder, "--adapter", adapter] + settings,
                                      scratch: scratch, name: "zh.png"), "adapter (default)")
        let english = try server.post("/sdapi/v1/txt2img", ["prompt": "a red circle", "seed": 4, "steps": 3, "cfg_scale": 7.5, "width": 32,
                                                            "height": 32, "text_encoder": "english"])
        XCTAssertEqual(english.status, 200, "\(english.json)")
        assertSameImage(try images(english.json["images"] as? [Any])[0],
                        try generated(["--prompt", "a red circle"] + settings, scratch: scratch, name: "en.png"), "english")
        let bad = try server.post("/sdapi/v1/txt2img", ["prompt": "x", "text_encoder": "french"])
        XCTAssertEqual(bad.status, 400)
        XCTAssertTrue((bad.json["error"] as? String ?? "").contains("text_encoder"), "\(bad.json)")
    }

    /// Two compatible requests sent together are denoised in one batch of two (the batch window holds the first
    /// until the second arrives), and each still gets the image it gets alone.
    func testConcurrentCompatibleRequestsAreBatchedAndKeepTheirImages() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--max-batch", "4", "--batch-wait", "2"], scratch: scratch)
        let bodies: [[String: Any]] = [["prompt": "a red circle", "seed": 21, "steps": 3, "cfg_scale": 7.5],
                                       ["prompt": "a blue square", "negative_prompt": "dark", "seed": 22, "steps": 3, "cfg_scale": 7.5]]
        var results = [(status: Int, json: [String: Any])?](repeating: nil, count: 2)
        let lock = NSLock()
        concurrently(2) { number in
            let result = try? server.post("/sdapi/v1/txt2img", bodies[number])
            lock.lock(); results[number] = result; lock.unlock()
        }
        XCTAssertEqual(try server.metric("pea_batches_total{images=\"2\"}"), 1)
        XCTAssertNil(try server.metric("pea_batches_total{images=\"1\"}"))
        let expected = [try generated(["--prompt", "a red circle", "--seed", "21", "--steps", "3"], scratch: scratch, name: "1.png"),
                        try generated(["--prompt", "a blue square", "--negative-prompt", "dark", "--seed", "22", "--steps", "3"],
                                      scratch: scratch, name: "2.png")]
        for number in 0..<2 {
            let result = try XCTUnwrap(results[number])
            XCTAssertEqual(result.status, 200, "\(result.json)")
            assertSameImage(try images(result.json["images"] as? [Any])[0], expected[number], "request \(number) in a batch", batched: true)
        }
    }

    /// 16 clients at once, each sending 2 requests in turn on its own connection: all 32 are answered with the
    /// right image (each seed's `pea generate` image), none is lost, and they are denoised in batches.
    func testSixteenConcurrentClientsHaveAllTheirRequestsAnsweredRight() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--max-batch", "4"], scratch: scratch)
        let seeds = [31, 32, 33, 34]
        let expected = try seeds.map { try generated(["--prompt", "a shape", "--seed", String($0), "--steps", "2"], scratch: scratch, name: "\($0).png") }
        let clients = 16, rounds = 2
        var received = [PNGImage?](repeating: nil, count: clients * rounds)
        let lock = NSLock()
        concurrently(clients) { client in
            for round in 0..<rounds {
                let number = client * rounds + round
                guard let result = try? server.post("/v1/images/generations", ["prompt": "a shape", "seed": seeds[number % 4], "steps": 2]),
                      result.status == 200, let data = result.json["data"] as? [[String: Any]],
                      let image = try? self.images(data.map { $0["b64_json"] as Any }).first else { continue }
                lock.lock(); received[number] = image; lock.unlock()
            }
        }
        for number in 0..<(clients * rounds) {
            let image = try XCTUnwrap(received[number], "request \(number) got no image")
            assertSameImage(image, expected[number % 4], "request \(number)", batched: true)
        }
        XCTAssertEqual(try server.metric("pea_images_generated_total"), clients * rounds)
        XCTAssertEqual(try server.metric("pea_requests_total{endpoint=\"/v1/images/generations\",status=\"200\"}"), clients * rounds)
        let single = try server.metric("pea_batches_total{images=\"1\"}") ?? 0
        XCTAssertLessThan(single, clients * rounds, "16 waiting clients were never batched")
        XCTAssertEqual(server.stop(), 0)
    }

    func testInvalidRequestsAre400NamingTheFieldAndTheServerGoesOn() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--max-size", "256", "--max-steps", "50"], scratch: scratch)
        let cases: [(path: String, body: String, fragment: String)] = [
            ("/sdapi/v1/txt2img", "{bad json", "not JSON"),
            ("/sdapi/v1/txt2img", "[1, 2]", "JSON object"),
            ("/sdapi/v1/txt2img", #"{"steps": "ten"}"#, "steps"),
            ("/sdapi/v1/txt2img", #"{"steps": 0}"#, "steps"),
            ("/sdapi/v1/txt2img", #"{"steps": 51}"#, "steps"),
            ("/sdapi/v1/txt2img", #"{"width": 30}"#, "width"),
            ("/sdapi/v1/txt2img", #"{"height": 264}"#, "height"),
            ("/sdapi/v1/txt2img", #"{"prompt": 5}"#, "prompt"),
            ("/sdapi/v1/txt2img", #"{"seed": 1.5}"#, "seed"),
            ("/sdapi/v1/txt2img", #"{"cfg_scale": "high"}"#, "cfg_scale"),
            ("/sdapi/v1/txt2img", #"{"sampler_name": "UniPC"}"#, "sampler_name"),
            ("/sdapi/v1/txt2img", #"{"sampler_name": "Euler", "scheduler": "Karras"}"#, "Karras"),
            ("/sdapi/v1/txt2img", #"{"batch_size": 8, "n_iter": 4}"#, "batch_size"),
            ("/sdapi/v1/txt2img", #"{"text_encoder": "adapter"}"#, "text_encoder"),
            ("/v1/images/generations", #"{"n": 1}"#, "prompt"),
            ("/v1/images/generations", #"{"prompt": "x", "size": "big"}"#, "size"),
            ("/v1/images/generations", #"{"prompt": "x", "size": "1024x1024"}"#, "size"),
            ("/v1/images/generations", #"{"prompt": "x", "response_format": "url"}"#, "response_format"),
        ]
        for (path, body, fragment) in cases {
            let response = try server.request("POST", path, body: body)
            XCTAssertEqual(response.status, 400, "\(body): \(response.body)")
            let json = try JSONSerialization.jsonObject(with: Data(response.body.utf8)) as? [String: Any]
            let message = json?["error"] as? String ?? ""
            XCTAssertTrue(message.contains(fragment), "\(body): '\(fragment)' not in \(message)")
        }
        // An image's size is asked for as much as a width is: an init image that rounds down past --max-size is a 400.
        let widePath = scratch.file("wide.png")
        try PNGWriter.write(rgb: [UInt8](repeating: 90, count: 270 * 16 * 3), width: 270, height: 16, to: widePath)
        let wide = base64Encoded(try XCTUnwrap(readFileBytes(widePath)))
        let tooWide = try server.request("POST", "/sdapi/v1/img2img", body: "{\"init_images\": [\"\(wide)\"], \"steps\": 2}")
        XCTAssertEqual(tooWide.status, 400, tooWide.body)
        XCTAssertTrue(tooWide.body.contains("init_images[0]") && tooWide.body.contains("at most 256"), tooWide.body)
        XCTAssertEqual(try server.request("GET", "/nowhere").status, 404)
        XCTAssertEqual(try server.request("GET", "/sdapi/v1/txt2img").status, 405)
        XCTAssertEqual(try server.request("POST", "/health", body: "{}").status, 405)
        XCTAssertEqual(try server.post("/sdapi/v1/txt2img", ["prompt": "still here", "steps": 1]).status, 200)
        XCTAssertEqual(try server.metric("pea_requests_total{endpoint=\"/sdapi/v1/txt2img\",status=\"400\"}"), 14)
        XCTAssertEqual(server.stop(), 0)
    }

    /// The HTTP layer's limits hold in `pea serve` as it configures them: a body over the limit is 413 before it is
    /// sent, a header section over the limit 431, a chunked body 411, a request left half-sent 408 after
    /// --request-timeout; and the server goes on answering.
    func testHTTPLimitsHoldInServe() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--request-timeout", "0.5"], scratch: scratch)
        let limits = HTTPLimits()
        let large = try TestClient(port: server.port)
        large.send("POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: h\r\nContent-Length: \(limits.bodyBytes + 1)\r\n\r\n")
        XCTAssertEqual(large.readResponse()?.status, 413)
        let padding = "X-Padding: " + String(repeating: "a", count: limits.headerBytes)
        XCTAssertEqual(try server.request("GET", "/health", headers: [padding]).status, 431)
        XCTAssertEqual(try server.request("POST", "/sdapi/v1/txt2img", headers: ["Transfer-Encoding: chunked"]).status, 411)
        let slow = try TestClient(port: server.port)
        slow.send("POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: h\r\nContent-Length: 20\r\n\r\n{\"prompt\"")
        XCTAssertEqual(slow.readResponse()?.status, 408, "a body that stops half-way")
        XCTAssertEqual(try server.post("/sdapi/v1/txt2img", ["prompt": "still here", "steps": 1]).status, 200)
        XCTAssertEqual(server.stop(), 0)

        let refused = try runPea(["serve", "--model", sd1, "--request-timeout", "0"])
        XCTAssertEqual(refused.status, 2)
        XCTAssertTrue(refused.stderr.contains("--request-timeout"), refused.stderr)
    }

    /// A generation that fails inside the backend — the (emulated) GPU, given 8 MB, runs out of memory for a
    /// 128×128 image — is answered 500 with the backend's error; the server goes on: the next request gets its
    /// image, and the failure is counted.
    func testAGenerationThatFailsIs500WithItsErrorAndTheServerGoesOn() throws {
        _ = try CUDABackendParityTests.emulatedLibrary()
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--backend", "cuda"], scratch: scratch,
                                environment: ["PEA_CUDA_LIB": CUDABackendParityTests.emulatedLibraryPath, "PEA_EMU_DEVICE_MEMORY_MB": "8"])
        let failed = try server.post("/sdapi/v1/txt2img", ["prompt": "too large", "steps": 1, "width": 128, "height": 128])
        XCTAssertEqual(failed.status, 500, "\(failed.json)")
        let message = failed.json["error"] as? String ?? ""
        XCTAssertTrue(message.contains("cudaMalloc") && message.contains("out of memory"), message)
        let next = try server.post("/sdapi/v1/txt2img", ["prompt": "small", "steps": 1, "seed": 5])
        XCTAssertEqual(next.status, 200, "\(next.json)")
        XCTAssertEqual(try images(next.json["images"] as? [Any]).first?.width, 32)
        XCTAssertEqual(try server.metric("pea_requests_total{endpoint=\"/sdapi/v1/txt2img\",status=\"500\"}"), 1)
        XCTAssertEqual(try server.metric("pea_requests_total{endpoint=\"/sdapi/v1/txt2img\",status=\"200\"}"), 1)
        XCTAssertEqual(server.stop(), 0)
    }

    func testAPIKeyIsRequiredAndAPublicHostNeedsOne() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--api-key", "s3cret"], scratch: scratch)
        XCTAssertEqual(try server.request("GET", "/health").status, 401)
        XCTAssertEqual(try server.request("GET", "/health", headers: ["Authorization: Bearer wrong"]).status, 401)
        XCTAssertEqual(try server.request("GET", "/health", headers: ["Authorization: Bearer s3cret!"]).status, 401)
        XCTAssertEqual(try server.post("/sdapi/v1/txt2img", ["prompt": "x", "steps": 1]).status, 401)
        XCTAssertEqual(try server.request("GET", "/health", headers: ["Authorization: Bearer s3cret"]).status, 200)
        XCTAssertEqual(try server.post("/sdapi/v1/txt2img", ["prompt": "x", "steps": 1], headers: ["Authorization: Bearer s3cret"]).status, 200)
        XCTAssertEqual(server.stop(), 0)

        let refused = try runPea(["serve", "--model", sd1, "--host", "0.0.0.0", "--port", "0"])
        XCTAssertEqual(refused.status, 2)
        XCTAssertTrue(refused.stderr.contains("--api-key"), refused.stderr)
    }

    func testHelpAndUsageErrors() throws {
        let help = try runPea(["serve", "--help"])
        XCTAssertEqual(help.status, 0)
        for fragment in ["/sdapi/v1/txt2img", "/v1/images/generations", "/health", "/metrics", "--max-batch", "--max-queue",
                         "--api-key", "text_encoder", "SIGTERM", "pea generate --seed S+i"] {
            XCTAssertTrue(help.stdout.contains(fragment), "'\(fragment)' not in pea serve --help")
        }
        XCTAssertTrue(try runPea(["--help"]).stdout.contains("pea serve --model DIR"))
        for (arguments, fragment) in [(["serve"], "--model"), (["serve", "--model", sd1, "--adapter", adapter], "--text-encoder"),
                                      (["serve", "--model", sd1, "--port", "70000"], "--port"),
                                      (["serve", "--model", sd1, "--batch-wait", "-1"], "--batch-wait"),
                                      (["serve", "--model", sd1, "--host", "192.168.1.5"], "--api-key")] {
            let result = try runPea(arguments)
            XCTAssertEqual(result.status, 2, "\(arguments): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains(fragment), "\(arguments): '\(fragment)' not in \(result.stderr)")
        }
    }

    /// With one request held in the queue (by the batch window), a second is refused 503 with Retry-After; then
    /// SIGTERM lets the held request finish (200) and the process exits 0.
    func testFullQueueIs503AndSIGTERMFinishesTheRequestInProgress() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--max-batch", "2", "--max-queue", "1", "--batch-wait", "3"], scratch: scratch)
        final class Box: @unchecked Sendable { var result: (status: Int, json: [String: Any])? }
        let held = Box()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            held.result = try? server.post("/sdapi/v1/txt2img", ["prompt": "held", "seed": 1, "steps": 2])
            done.signal()
        }
        // Wait (bounded) until the first request is queued.
        let deadline = Date().addingTimeInterval(10)
        while try server.metric("pea_queue_depth") != 1, Date() < deadline { usleep(20_000) }
        let refused = try server.request("POST", "/sdapi/v1/txt2img", body: #"{"prompt": "more", "steps": 2, "width": 40}"#)
        XCTAssertEqual(refused.status, 503, refused.body)
        XCTAssertEqual(refused.headers["Retry-After"], "1")
        kill(server.process.processIdentifier, SIGTERM)
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(held.result?.status, 200, "\(held.result?.json ?? [:])")
        XCTAssertEqual(server.waitForExit(), 0)
        let log = try String(contentsOfFile: server.log, encoding: .utf8)
        XCTAssertTrue(log.contains("pea serve: stopped"), log)
    }

    /// A client that closes its connection while its request waits in the queue has the request dropped: it is
    /// never generated, the queue empties, and the server goes on.
    func testAClientThatHangsUpHasItsQueuedRequestDropped() throws {
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--max-batch", "2", "--batch-wait", "5"], scratch: scratch)
        do {
            let client = try TestClient(port: server.port)
            let body = #"{"prompt": "gone", "steps": 2}"#
            client.send("POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: \(body.utf8.count)\r\n\r\n" + body)
            let deadline = Date().addingTimeInterval(10)
            while try server.metric("pea_queue_depth") != 1, Date() < deadline { usleep(20_000) }
            XCTAssertEqual(try server.metric("pea_queue_depth"), 1)
        }   // the client closes its socket here
        let deadline = Date().addingTimeInterval(10)
        while try server.metric("pea_requests_cancelled_total") != 1, Date() < deadline { usleep(20_000) }
        XCTAssertEqual(try server.metric("pea_requests_cancelled_total"), 1)
        XCTAssertEqual(try server.metric("pea_queue_depth"), 0)
        XCTAssertEqual(try server.metric("pea_requests_total{endpoint=\"/sdapi/v1/txt2img\",status=\"499\"}"), 1)
        XCTAssertEqual(try server.metric("pea_images_generated_total"), 0)
        XCTAssertEqual(try server.post("/sdapi/v1/txt2img", ["prompt": "still here", "steps": 1, "batch_size": 2]).status, 200)
        XCTAssertEqual(try server.metric("pea_images_generated_total"), 2)
        XCTAssertEqual(server.stop(), 0)
    }

    // MARK: - The queue and request mapping, in process

    private func item(_ seed: UInt64, width: Int = 32, steps: Int = 2) -> JobItem {
        JobItem(index: 0, line: 0, id: nil, prompt: "p\(seed)", negativePrompt: nil, seed: seed, width: width, height: 32,
                steps: steps, guidance: 7.5, scheduler: nil, batch: 1, text: nil)
    }

    private func image(_ seed: UInt64) -> RGBImage { RGBImage(width: 1, height: 1, pixels: [UInt8(seed), 0, 0]) }

    /// Batches hold only compatible items of one text-encoder choice, at most maxBatch images, oldest first; a
    /// failing batch fails only its own requests (with the runner's message) and the queue goes on.
    func testQueueBatchesCompatibleItemsOfOneChoiceAndSurvivesAFailingBatch() throws {
        final class Log: @unchecked Sendable {
            let lock = NSLock()
            var batches: [(seeds: [UInt64], choice: String)] = []
        }
        let log = Log()
        let gate = DispatchSemaphore(value: 0), started = DispatchSemaphore(value: 0)
        let queue = try GenerationQueue(maxBatch: 3, maxQueue: 100) { items, choice in
            if items.contains(where: { $0.seed == 0 }) { started.signal(); gate.wait() }   // holds the first batch until all are queued
            log.lock.lock(); log.batches.append((items.map(\.seed), choice)); log.lock.unlock()
            if items.contains(where: { $0.seed == 13 }) { throw PEAError.unsupported("boom") }
            return items.map { [self.image($0.seed)] }
        }
        let blocker = DispatchSemaphore(value: 0)
        Thread.detachNewThread { _ = try? queue.submit([self.item(0)], choice: "english"); blocker.signal() }
        XCTAssertEqual(started.wait(timeout: .now() + 10), .success)
        // Queued while the first batch runs: five compatible English items (two requests), an adapter item, an
        // item of another size, and a request that fails.
        let submissions: [([JobItem], String)] = [([item(1), item(2)], "english"), ([item(3)], "adapter"), ([item(4), item(5), item(6)], "english"),
                                                  ([item(7, width: 40)], "english"), ([item(13, steps: 3)], "english")]
        final class Results: @unchecked Sendable { let lock = NSLock(); var values: [Int: Result<[UInt64], Error>] = [:] }
        let results = Results()
        let group = DispatchGroup()
        for (number, (items, choice)) in submissions.enumerated() {
            group.enter()
            Thread.detachNewThread {
                let result = Result { try queue.submit(items, choice: choice).map { UInt64($0[0].pixels[0]) } }
                results.lock.lock(); results.values[number] = result; results.lock.unlock()
                group.leave()
            }
            while queue.depth < number + 1 { usleep(1000) }   // keeps the arrival order
        }
        gate.signal()
        XCTAssertEqual(group.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(blocker.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(try results.values[0]?.get(), [1, 2])
        XCTAssertEqual(try results.values[1]?.get(), [3])
        XCTAssertEqual(try results.values[2]?.get(), [4, 5, 6])
        XCTAssertEqual(try results.values[3]?.get(), [7])
        guard case .failure(GenerationQueue.Refusal.failed(let message))? = results.values[4] else {
            return XCTFail("the failing request got \(String(describing: results.values[4]))")
        }
        XCTAssertTrue(message.contains("boom"), message)
        XCTAssertEqual(log.batches.map(\.seeds), [[0], [1, 2, 4], [3], [5, 6], [7], [13]])
        XCTAssertEqual(log.batches.map(\.choice), ["english", "english", "adapter", "english", "english", "english"])
        XCTAssertEqual(try queue.submit([item(8)], choice: "english").map { $0[0].pixels[0] }, [8])
        queue.stop()
        XCTAssertThrowsError(try queue.submit([item(9)], choice: "english")) { XCTAssertEqual($0 as? GenerationQueue.Refusal, .stopped) }
    }

    func testSamplerNamesAndAPIKeyComparison() throws {
        let cases: [(String?, String?, String?)] = [("Euler a", nil, "euler-a"), ("Euler", nil, "euler"), ("DDIM", nil, "ddim"),
                                                    ("DPM++ 2M", nil, "dpmpp-2m"), ("DPM++ 2M Karras", nil, "dpmpp-2m-karras"),
                                                    ("DPM++ 2M", "Karras", "dpmpp-2m-karras"), ("DPM++ 2M", "Automatic", "dpmpp-2m"),
                                                    ("PLMS", nil, "pndm"), ("euler-a", nil, "euler-a"), (nil, nil, nil), ("", nil, nil)]
        for (sampler, scheduler, expected) in cases {
            XCTAssertEqual(try GenerationServer.schedulerName(sampler: sampler, scheduler: scheduler), expected, "\(String(describing: sampler))")
        }
        XCTAssertThrowsError(try GenerationServer.schedulerName(sampler: "Euler a", scheduler: "Karras"))
        XCTAssertThrowsError(try GenerationServer.schedulerName(sampler: "DDIM", scheduler: "Exponential"))
        XCTAssertTrue(GenerationServer.authorized("Bearer k", key: "k"))
        for header in [nil, "", "Bearer", "Bearer K", "Bearer k ", "bearer k", "k"] {
            XCTAssertFalse(GenerationServer.authorized(header, key: "k"), "\(String(describing: header))")
        }
        XCTAssertEqual(base64Encoded(Array("".utf8)), "")
        XCTAssertEqual(base64Encoded(Array("f".utf8)), "Zg==")
        XCTAssertEqual(base64Encoded(Array("fo".utf8)), "Zm8=")
        XCTAssertEqual(base64Encoded(Array("foobar".utf8)), "Zm9vYmFy")
        for text in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            XCTAssertEqual(base64Decoded(base64Encoded(Array(text.utf8))), Array(text.utf8), text)
        }
        XCTAssertEqual(base64Decoded("Zm9v\r\nYmE"), Array("fooba".utf8), "line breaks skipped, padding optional")
        for bad in ["Zm9v!", "Zg==Zg==", "Z", "Zg==="] { XCTAssertNil(base64Decoded(bad), bad) }
    }
}

extension ServeTests {
    /// `pea serve --lora FILE:SCALE` merges the LoRA once at start: a txt2img answer is diffusers' fused-LoRA image
    /// (LoRATests' kohya case, made by tools/reference/make_lora_fixtures.py).
    func testServeMergesLoRAs() throws {
        let c = try XCTUnwrap(try LoRATests.cases().first { $0.name == "kohya_scale07" })
        let scratch = ScratchDirectory()
        let server = try Server(["--model", sd1, "--lora", LoRATests.directory + "/kohya.safetensors:0.7"], scratch: scratch)
        let response = try server.post("/sdapi/v1/txt2img", ["prompt": c.prompt, "seed": c.seed, "steps": c.steps,
                                                             "cfg_scale": Double(c.guidance), "width": c.width, "height": c.height])
        XCTAssertEqual(response.status, 200, "\(response.json)")
        let served = try images(response.json["images"] as? [Any])
        XCTAssertEqual(served.count, 1)
        let expected = try SafeTensorsFile(path: LoRATests.directory + "/" + c.images).tensor("images").integers()!
        let pixels = try XCTUnwrap(served.first).pixels.map(Int.init)
        XCTAssertEqual(pixels.count, expected.count)
        let differing = zip(pixels, expected).filter { $0 != $1 }
        XCTAssertLessThanOrEqual(differing.map { abs($0 - $1) }.max() ?? 0, 1, "served image vs diffusers")
        XCTAssertLessThanOrEqual(Double(differing.count) / Double(max(1, expected.count)), 0.02, "1/255 flips")
        XCTAssertEqual(server.stop(), 0)
    }
}

extension ServeTests {
    /// `pea serve --model FILE` reads a single-file checkpoint as `pea generate --model FILE` does (--config, --lora,
    /// and with --text-encoder/--adapter the PEA pipeline beside the file's English one): each served image is
    /// generate's, pixel for pixel, with the same parameters chunk.
    func testServeSingleFileCheckpointIsPeaGenerates() throws {
        let scratch = ScratchDirectory()
        let file = fixturesDirectory() + "/single_file/sd1.safetensors"
        let model = ["--model", file, "--config", sd1, "--lora", LoRATests.directory + "/kohya.safetensors:0.7"]
        let server = try Server(model + ["--text-encoder", zhEncoder, "--adapter", adapter], scratch: scratch)
        func generate(_ arguments: [String], _ name: String) throws -> PNGImage {
            let path = scratch.file(name)
            let result = try runPea(["generate", "--backend", "cpu", "--threads", "1", "--output", path, "--steps", "3", "--seed", "4",
                                     "--width", "32", "--height", "32"] + model + arguments)
            XCTAssertEqual(result.status, 0, result.stderr)
            return try PNGReader.read(path: path)
        }
        let request: [String: Any] = ["seed": 4, "steps": 3, "cfg_scale": 7.5, "width": 32, "height": 32]
        let english = try server.post("/sdapi/v1/txt2img", request.merging(["prompt": "a red circle", "text_encoder": "english"]) { $1 })
        XCTAssertEqual(english.status, 200, "\(english.json)")
        assertSameImage(try images(english.json["images"] as? [Any])[0], try generate(["--prompt", "a red circle"], "en.png"),
                        "single file, English encoder")
        let viaAdapter = try server.post("/sdapi/v1/txt2img", request.merging(["prompt": "一个红色的圆形"]) { $1 })
        XCTAssertEqual(viaAdapter.status, 200, "\(viaAdapter.json)")
        assertSameImage(try images(viaAdapter.json["images"] as? [Any])[0],
                        try generate(["--prompt", "一个红色的圆形", "--text-encoder", zhEncoder, "--adapter", adapter], "zh.png"),
                        "single file, adapter")
        XCTAssertEqual(server.stop(), 0)

        // The single-file options are generate's, errors included.
        for (arguments, fragment) in [(["serve", "--model", sd1, "--config", sd1], "--config applies to a single-file --model FILE"),
                                      (["serve", "--model", file], "--tokenizer DIR")] {
            let result = try runPea(arguments + ["--backend", "cpu"])
            XCTAssertNotEqual(result.status, 0, "\(arguments)")
            XCTAssertTrue(result.stderr.contains(fragment), "\(arguments): '\(fragment)' not in \(result.stderr)")
        }
        let help = try runPea(["serve", "--help"]).stdout
        for fragment in ["--model DIR|FILE", "--config DIR", "--tokenizer DIR", "--prediction-type TYPE", "--vae FILE", "--lora FILE[:SCALE]"] {
            XCTAssertTrue(help.contains(fragment), "'\(fragment)' not in pea serve --help")
        }
    }
}
