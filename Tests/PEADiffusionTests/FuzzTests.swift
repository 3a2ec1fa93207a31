#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import XCTest
@testable import PEADiffusion

/// The fuzz suite: structure-aware mutations of every file format and text Pea reads from users — safetensors
/// headers, JSON model configs, torch.save zips and pickles, PNG, tar shards, prompts. Every case must end in a
/// result or a `PEAError` (a crash fails the whole run; any other error type fails the case), and the counts of
/// each outcome are printed. `make test` runs a fixed seed and `PEA_FUZZ_CASES` cases per format (default 120);
/// `make fuzz` runs many more (PEA_FUZZ_CASES, PEA_FUZZ_SEED). Cases that once crashed Pea are kept as
/// regression cases in the suites of their fixes (RobustnessNumbersTests, RobustnessLimitsTests, …).
final class FuzzTests: XCTestCase {
    /// Cases per format and the seed, from PEA_FUZZ_CASES and PEA_FUZZ_SEED (a malformed value fails every test).
    private var casesPerFormat = 120
    private var seed: UInt64 = 2026

    override func setUpWithError() throws {
        let environment = ProcessInfo.processInfo.environment
        if let text = environment["PEA_FUZZ_CASES"] {
            guard let value = Int(text), value >= 0 else { throw PEAError.usage("PEA_FUZZ_CASES must be a count (0 or more), got '\(text)'") }
            casesPerFormat = value
        }
        if let text = environment["PEA_FUZZ_SEED"] {
            guard let value = UInt64(text) else { throw PEAError.usage("PEA_FUZZ_SEED must be a non-negative integer, got '\(text)'") }
            seed = value
        }
    }

    /// What the cases of one format ended in.
    struct Tally: CustomStringConvertible {
        let format: String
        var accepted = 0
        var refused: [String: Int] = [:]
        var foreign: [String] = []

        /// Runs one case: a value, a PEAError or an HTTPError (the HTTP parser's refusal) is fine; the error's case
        /// or status is counted.
        mutating func run(_ body: () throws -> Void) {
            do {
                try body()
                accepted += 1
            } catch let error as PEAError {
                refused[Self.kind(error), default: 0] += 1
            } catch let error as HTTPError {
                refused["HTTP \(error.status)", default: 0] += 1
            } catch {
                foreign.append("\(type(of: error)): \(error)")
            }
        }

        static func kind(_ error: PEAError) -> String {
            switch error {
            case .invalidFile: return "invalidFile"
            case .invalidConfig: return "invalidConfig"
            case .shapeMismatch: return "shapeMismatch"
            case .unsupported: return "unsupported"
            case .usage: return "usage"
            case .backend: return "backend"
            }
        }

        var description: String {
            let kinds = refused.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            return "fuzz \(format): \(accepted + refused.values.reduce(0, +) + foreign.count) cases, \(accepted) accepted, "
                + "refused: \(kinds.isEmpty ? "none" : kinds); \(foreign.count) foreign errors"
        }
    }

    private func finish(_ tally: Tally, file: StaticString = #filePath, line: UInt = #line) {
        print(tally)
        XCTAssertEqual(tally.foreign, [], "\(tally.format): errors that are not PEAError (or HTTPError)", file: file, line: line)
    }

    // MARK: mutators

    /// Byte-level mutations that keep most of the structure: flip, truncate, insert, repeat a slice, or write an
    /// extreme integer (the sizes and offsets formats store) over 8 bytes.
    static func mutate(_ input: [UInt8], _ random: inout SplitMix64) -> [UInt8] {
        var bytes = input
        let rounds = 1 + Int(random.next() % 3)
        for _ in 0..<rounds {
            guard !bytes.isEmpty else { return [UInt8(truncatingIfNeeded: random.next())] }
            let at = Int(random.next() % UInt64(bytes.count))
            switch random.next() % 6 {
            case 0: bytes[at] ^= UInt8(1 << (random.next() % 8))
            case 1: bytes = Array(bytes[..<at])
            case 2: bytes.insert(contentsOf: (0..<(1 + random.next() % 16)).map { _ in UInt8(truncatingIfNeeded: random.next()) }, at: at)
            case 3:
                let end = min(bytes.count, at + 1 + Int(random.next() % 64))
                bytes.insert(contentsOf: bytes[at..<end], at: at)
            case 4:
                let extremes: [UInt64] = [0, 1, 0xFF, 1 << 31, 1 << 32, 1 << 60, UInt64(Int64.max), UInt64.max]
                let value = extremes[Int(random.next() % UInt64(extremes.count))]
                for k in 0..<8 where at + k < bytes.count { bytes[at + k] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(k))) }
            default: bytes[at] = UInt8(truncatingIfNeeded: random.next())
            }
        }
        return bytes
    }

    /// A JSON value a config reader might choke on.
    static func hostileJSON(_ random: inout SplitMix64) -> JSONValue {
        let values: [JSONValue] = [
            .number(0), .number(-1), .number(1), .number(1e308), .number(-1e308), .number(1e12), .number(0.5),
            .number(Double(1 << 53)), .number(-0.0), .string(""), .string("x"), .string("NaN"), .null, .bool(true),
            .array([]), .array([.number(0)]), .array([.number(100_000), .number(200_000)]), .object([:]),
        ]
        return values[Int(random.next() % UInt64(values.count))]
    }

    /// A config with some values replaced by hostile ones, some keys removed.
    static func mutateConfig(_ values: [String: JSONValue], _ random: inout SplitMix64) -> [String: JSONValue] {
        var mutated = values
        let keys = values.keys.sorted()
        for _ in 0..<(1 + Int(random.next() % 3)) {
            let key = keys[Int(random.next() % UInt64(keys.count))]
            if random.next() % 5 == 0 { mutated[key] = nil } else { mutated[key] = hostileJSON(&random) }
        }
        return mutated
    }

    // MARK: formats

    func testSafeTensorsHeaders() throws {
        let scratch = ScratchDirectory("pea-fuzz")
        let valid = scratch.file("valid.safetensors")
        try SafeTensorsWriter.write([("a", HostTensor([1, 2, 3, 4, 5, 6], shape: [2, 3])),
                                   ("b", HostTensor([7, 8], shape: [2]))], metadata: ["format": "pt"], to: valid)
        let bytes = readFileBytes(valid)!
        let headerLength = Int(bytes[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
        let header = try JSONValue.parse(Array(bytes[8..<(8 + headerLength)]))
        guard case .object(let entries) = header else { return XCTFail("header is not an object") }
        let data = Array(bytes[(8 + headerLength)...])

        var tally = Tally(format: "safetensors")
        var random = SplitMix64(seed: seed)
        for index in 0..<casesPerFormat {
            let mutated: [UInt8]
            if index % 2 == 0 {
                // A structural mutation of one entry: dtype, shape or offsets.
                var object = entries
                let name = ["a", "b", "__metadata__"][Int(random.next() % 3)]
                var entry: [String: JSONValue] = { if case .object(let e)? = object[name] { return e } else { return [:] } }()
                let dtypes = ["F32", "F16", "BF16", "I64", "F64", "U8", "BOOL", "XX", ""]
                switch random.next() % 4 {
                case 0: entry["dtype"] = .string(dtypes[Int(random.next() % UInt64(dtypes.count))])
                case 1: entry["shape"] = .array((0..<Int(random.next() % 4)).map { _ in Self.hostileJSON(&random) })
                case 2: entry["data_offsets"] = .array([Self.hostileJSON(&random), Self.hostileJSON(&random)])
                default: entry[["dtype", "shape", "data_offsets"][Int(random.next() % 3)]] = Self.hostileJSON(&random)
                }
                object[name] = .object(entry)
                var text = Array(JSONValue.object(object).serialized().utf8)
                while text.count % 8 != 0 { text.append(0x20) }
                let length = UInt64(text.count)
                mutated = (0..<8).map { UInt8(truncatingIfNeeded: length >> (8 * UInt64($0))) } + text + data
            } else {
                mutated = Self.mutate(bytes, &random)
            }
            let path = scratch.write(mutated, to: "case.safetensors")
            tally.run {
                let file = try SafeTensorsFile(path: path)
                for name in ["a", "b"] where file.contains(name) { _ = try file.tensor(name) }
            }
        }
        finish(tally)
    }

    func testModelConfigs() throws {
        let folders = ["pipelines/sd1", "pipelines/sdxl"]
        var tally = Tally(format: "model configs")
        var random = SplitMix64(seed: seed &+ 1)
        let scratch = ScratchDirectory("pea-fuzz")
        for index in 0..<casesPerFormat {
            let folder = fixturesDirectory() + "/" + folders[index % folders.count]
            let component = ["unet", "vae", "text_encoder", "scheduler"][Int(random.next() % 4)]
            let name = component == "scheduler" ? "scheduler_config.json" : "config.json"
            let original = try ConfigFile(path: "\(folder)/\(component)/\(name)")
            let path = scratch.file(name)
            let mutated = ConfigFile(path: path, values: Self.mutateConfig(original.values, &random))
            tally.run {
                switch component {
                case "unet": _ = try UNetConfig(mutated)
                case "vae": _ = try AutoencoderKLConfig(mutated)
                case "text_encoder": _ = try CLIPTextConfig(mutated)
                default:
                    var scheduler = try makeScheduler(name: nil, config: mutated)
                    try scheduler.setTimesteps(Int(random.next() % 60))
                }
            }
        }
        finish(tally)
    }

    func testTorchCheckpoints() throws {
        let sources = ["multilingual/adapter_sd1/pytorch_model.bin", "multilingual/bert_bin/pytorch_model.bin"]
        var tally = Tally(format: "torch.save")
        var random = SplitMix64(seed: seed &+ 2)
        let scratch = ScratchDirectory("pea-fuzz")
        for index in 0..<casesPerFormat {
            let bytes = readFileBytes(fixturesDirectory() + "/" + sources[index % sources.count])!
            // Half the cases mutate the pickle inside a valid zip (CRC fixed), so the unpickler sees them.
            let mutated = index % 2 == 0 ? Self.mutateStoredZipEntry(bytes, suffix: "data.pkl", &random) : Self.mutate(bytes, &random)
            let path = scratch.write(mutated, to: "case.bin")
            tally.run { _ = try TorchCheckpoint.read(path: path) }
        }
        finish(tally)
    }

    /// Single-file checkpoints (the LDM-layout SD1, SD2 and SDXL fixtures, .safetensors and .ckpt) mutated, then loaded
    /// as a pipeline with the fixture folder's configs: byte mutations, the .ckpt's pickle mutated inside a valid
    /// zip, and the safetensors header with a tensor renamed or dropped (what the name tables meet).
    func testSingleFileCheckpoints() throws {
        let directory = fixturesDirectory() + "/single_file"
        var tally = Tally(format: "single-file checkpoints")
        var random = SplitMix64(seed: seed &+ 8)
        let scratch = ScratchDirectory("pea-fuzz")
        for index in 0..<max(8, casesPerFormat / 4) {
            let pipeline = ["sd1", "sd2", "sdxl"][(index / 3) % 3]
            let options = SingleFileOptions(configFolder: fixturesDirectory() + (pipeline == "sdxl" ? "/single_file/sdxl_config" : "/pipelines/" + pipeline))
            let safetensors = readFileBytes(directory + "/\(pipeline).safetensors")!, ckpt = readFileBytes(directory + "/\(pipeline).ckpt")!
            let original = try SafeTensorsFile(path: directory + "/\(pipeline).safetensors")
            let path: String
            switch index % 3 {
            case 0:
                path = scratch.write(Self.mutate(safetensors, &random), to: "case.safetensors")
            case 1:
                let mutated = index % 2 == 0 ? Self.mutateStoredZipEntry(ckpt, suffix: "data.pkl", &random) : Self.mutate(ckpt, &random)
                path = scratch.write(mutated, to: "case.ckpt")
            default:
                // A tensor renamed (maybe out of every component) or dropped.
                let victim = original.names[Int(random.next() % UInt64(original.names.count))]
                let renamed = ["", "model.diffusion_model.input_blocks.99.0.in_layers.0.weight", "first_stage_model.x",
                               "cond_stage_model.transformer.text_model.y", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                               "conditioner.embedders.1.model.text_projection", "model_ema.z"][Int(random.next() % 7)]
                path = scratch.file("case.safetensors")
                try SafeTensorsWriter.write(original.names.compactMap { name in
                    let newName = name == victim ? (original.names.contains(renamed) ? "" : renamed) : name
                    return newName.isEmpty ? nil : (name: newName, tensor: try original.tensor(name))
                }, to: path)
            }
            tally.run { _ = try StableDiffusionPipeline.load(checkpoint: path, options: options, backend: CPUBackend()) }
        }
        finish(tally)
    }

    /// The zip with the stored (uncompressed) entry whose name ends in `suffix` mutated in place (same length) and
    /// its CRC-32 fixed in the local and central headers.
    static func mutateStoredZipEntry(_ zip: [UInt8], suffix: String, _ random: inout SplitMix64) -> [UInt8] {
        func u16(_ at: Int) -> Int { Int(zip[at]) | Int(zip[at + 1]) << 8 }
        func u32(_ at: Int) -> Int { u16(at) | u16(at + 2) << 16 }
        var bytes = zip
        var at = 0
        while at + 30 <= zip.count, u32(at) == 0x0403_4B50 {
            let size = u32(at + 18), nameLength = u16(at + 26), extraLength = u16(at + 28)
            let name = String(decoding: zip[(at + 30)..<(at + 30 + nameLength)], as: UTF8.self)
            let data = at + 30 + nameLength + extraLength
            if name.hasSuffix(suffix), size > 0 {
                var entry = Array(zip[data..<(data + size)])
                for _ in 0..<(1 + Int(random.next() % 4)) {
                    let i = Int(random.next() % UInt64(size))
                    entry[i] = random.next() % 2 == 0 ? UInt8(truncatingIfNeeded: random.next()) : entry[i] ^ UInt8(1 << (random.next() % 8))
                }
                bytes.replaceSubrange(data..<(data + size), with: entry)
                let crc = PNGTests.referenceCRC32(entry)
                func putCRC(_ offset: Int) { for k in 0..<4 { bytes[offset + k] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(k))) } }
                putCRC(at + 14)
                // The central directory entry of the same name.
                var central = 0
                while central + 46 <= zip.count {
                    if u32(central) == 0x0201_4B50, u16(central + 28) == nameLength,
                       String(decoding: zip[(central + 46)..<(central + 46 + nameLength)], as: UTF8.self) == name {
                        putCRC(central + 16)
                        break
                    }
                    central += 1
                }
                return bytes
            }
            at = data + size
        }
        return bytes
    }


    /// LoRA files (`--lora`): the bytes mutated, or a factor reshaped, truncated or renamed; each case loads the tiny
    /// SD1 pipeline with it.
    func testLoRAFiles() throws {
        let directory = fixturesDirectory() + "/lora"
        var tally = Tally(format: "LoRA files")
        var random = SplitMix64(seed: seed &+ 12)
        let scratch = ScratchDirectory("pea-fuzz")
        for index in 0..<max(8, casesPerFormat / 4) {
            let name = index % 2 == 0 ? "kohya" : "peft"
            let original = try SafeTensorsFile(path: directory + "/\(name).safetensors")
            let path: String
            if index % 3 == 0 {
                path = scratch.write(Self.mutate(readFileBytes(original.path)!, &random), to: "case.safetensors")
            } else {
                let victim = original.names[Int(random.next() % UInt64(original.names.count))]
                path = scratch.file("case.safetensors")
                try SafeTensorsWriter.write(original.names.compactMap { tensorName in
                    var tensor = try original.tensor(tensorName)
                    guard tensorName == victim else { return (name: tensorName, tensor: tensor) }
                    switch random.next() % 4 {
                    case 0: return nil
                    case 1: return (name: tensorName + "x", tensor: tensor)
                    case 2: tensor.shape = [tensor.count]
                    default: tensor = HostTensor(Array(tensor.floats().dropLast()), shape: [max(0, tensor.count - 1)])
                    }
                    return (name: tensorName, tensor: tensor)
                }, to: path)
            }
            tally.run {
                let lora = try LoRASet([LoRASpec(path: path, scale: 0.5)])
                _ = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: CPUBackend(), lora: lora)
            }
        }
        finish(tally)
    }

    /// `pea inspect`'s reading of every kind of file it names (single-file checkpoints, LoRAs, PEA adapters,
    /// safetensors and torch.save) mutated: each case ends in its facts (text and JSON) or a PEAError.
    func testInspect() throws {
        let sources = ["single_file/sd1.safetensors", "single_file/sdxl.ckpt", "lora/kohya.safetensors",
                       "pea/adapter_sd1.safetensors", "pea/adapter_sdxl/pytorch_model.bin", "single_file/sd1_vae.safetensors"]
        var tally = Tally(format: "inspect")
        var random = SplitMix64(seed: seed &+ 14)
        let scratch = ScratchDirectory("pea-fuzz")
        for index in 0..<max(12, casesPerFormat / 2) {
            let source = sources[index % sources.count]
            let bytes = readFileBytes(fixturesDirectory() + "/" + source)!
            let torch = !source.hasSuffix(".safetensors")
            let path: String
            if !torch && index % 3 == 0 {
                // A tensor renamed into another kind's names, reshaped or dropped: what the classifiers meet.
                let original = try SafeTensorsFile(path: fixturesDirectory() + "/" + source)
                let victim = original.names[Int(random.next() % UInt64(original.names.count))]
                let renamed = ["", "model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.x",
                               "lora_unet_x.lora_down.weight", "unet.x.lora_B.weight", "projector.4.weight", "fc.weight",
                               "layernorm.weight", "decoder.up.0.x", "model_ema.decay"][Int(random.next() % 10)]
                path = scratch.file("case.safetensors")
                try SafeTensorsWriter.write(original.names.compactMap { name in
                    var tensor = try original.tensor(name)
                    guard name == victim else { return (name: name, tensor: tensor) }
                    if random.next() % 2 == 0 { tensor.shape = [tensor.count] + (random.next() % 2 == 0 ? [1, 1, 1] : []) }
                    let newName = original.names.contains(renamed) ? name : renamed
                    return newName.isEmpty ? nil : (name: newName, tensor: tensor)
                }, to: path)
            } else {
                // Half the torch.save cases mutate the pickle inside a valid zip (CRC fixed), so the unpickler sees them.
                let mutated = torch && index % 4 < 2 ? Self.mutateStoredZipEntry(bytes, suffix: "data.pkl", &random) : Self.mutate(bytes, &random)
                path = scratch.write(mutated, to: torch ? "case.ckpt" : "case.safetensors")
            }
            tally.run {
                let inspection = try ModelInspection.inspect(path: path)
                _ = inspection.text
                _ = inspection.json.serialized()
            }
        }
        finish(tally)
    }

    func testPNGs() throws {
        let sources = ["png/rgb_all_filters.png", "png/palette.png", "png/gray.png", "png/rgba.png", "png/rgb_text_kinds.png"]
        var tally = Tally(format: "PNG")
        var random = SplitMix64(seed: seed &+ 3)
        for index in 0..<casesPerFormat {
            let bytes = Self.mutate(readFileBytes(fixturesDirectory() + "/" + sources[index % sources.count])!, &random)
            tally.run {
                _ = try bytes.withUnsafeBytes { try PNGDecoder.decode($0, path: "case.png", readText: true) }
            }
        }
        finish(tally)
    }

    func testTrainingImages() throws {
        let sources = ["jpeg_rgb_420.jpg", "jpeg_rgb_422_progressive.jpg", "jpeg_gray.jpg", "jpeg_cmyk.jpg", "png_la.png", "png_gray16.png"]
        var tally = Tally(format: "training images (JPEG, PNG)")
        var random = SplitMix64(seed: seed &+ 8)
        for index in 0..<casesPerFormat {
            let name = sources[index % sources.count]
            let bytes = Self.mutate(readFileBytes(fixturesDirectory() + "/images/" + name)!, &random)
            tally.run { _ = try bytes.withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: name) } }
        }
        finish(tally)
    }

    /// Image-to-image requests from mutated init images (a third left intact), hostile strengths and step counts,
    /// through the tiny SD1 pipeline's whole img2img path: an image or a PEAError, never a crash.
    func testInitImages() throws {
        let source = readFileBytes(fixturesDirectory() + "/img2img/init_32x24.png")!
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: CPUBackend(), scheduler: "euler-a")
        let strengths = [0, -1, .nan, .infinity, 1e-9, 0.25, 0.5, 1, 1.0000001, 0.34]
        var tally = Tally(format: "init images")
        var random = SplitMix64(seed: seed &+ 9)
        for index in 0..<casesPerFormat {
            let bytes = index % 3 == 0 ? source : Self.mutate(source, &random)
            let strength = strengths[Int(random.next() % UInt64(strengths.count))], steps = Int(random.next() % 4)
            tally.run {
                let image = try bytes.withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: "init.png") }
                var request = GenerationRequest(prompt: "x", width: image.width, height: image.height)
                request.initImage = image
                request.strength = strength
                request.steps = steps
                _ = try pipeline.generate(request)
            }
        }
        finish(tally)
    }

    /// Inpainting requests from mutated masks (a third left intact: then a size that may not match the init
    /// image's) and hostile strengths, through the inpainting UNet and the ordinary UNet's blending: an image or a
    /// PEAError, never a crash.
    func testInpaintingMasks() throws {
        let source = readFileBytes(fixturesDirectory() + "/inpaint/mask_32x24.png")!
        let image = try ImageDecoder.decodeRGB(path: fixturesDirectory() + "/img2img/init_32x24.png")
        let pipelines = try ["inpaint/sd1_inpainting", "pipelines/sd1"].map {
            try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/" + $0, backend: CPUBackend(), scheduler: "euler-a")
        }
        let strengths = [0, -1, .nan, 1e-9, 0.5, 1, 1.0000001]
        var tally = Tally(format: "inpainting masks")
        var random = SplitMix64(seed: seed &+ 10)
        for index in 0..<casesPerFormat {
            let bytes = index % 3 == 0 ? source : Self.mutate(source, &random)
            let strength = strengths[Int(random.next() % UInt64(strengths.count))], steps = Int(random.next() % 3)
            let pipeline = pipelines[index % 2]
            tally.run {
                var request = GenerationRequest(prompt: "x", width: image.width, height: image.height)
                request.initImage = image
                request.mask = try bytes.withUnsafeBytes { try ImageDecoder.decodeRGB($0, name: "mask.png") }
                request.strength = strength
                request.steps = steps
                _ = try pipeline.generate(request)
            }
        }
        finish(tally)
    }

    /// Init images and masks of random sizes (1…40 a side, RGB and greyscale) resized to random sizes (Lanczos and
    /// bilinear) and blurred with hostile radii (negative, NaN, infinite, huge: refused by `checkedBlur`; 0…1000:
    /// run, also on images narrower than the blur), and every few cases a whole inpainting request with an odd-sized
    /// image and another-sized blurred mask through the tiny SD1 pipeline, or a ControlNet request with two control
    /// images of random sizes (the first sets the output's): a result or a PEAError, never a crash.
    func testImageResizingAndMaskBlur() throws {
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: CPUBackend(), scheduler: "euler-a")
        let controlnet = try ControlNetModel.load(folder: fixturesDirectory() + "/controlnet/sd1_a", backend: CPUBackend()).model
        let radii: [Double] = [0, -1, .nan, .infinity, -.infinity, 1e-30, 1e-6, 0.3, 1, 2.5, 7, 40, 999.9, 1000, 1000.5, 1e30]
        var tally = Tally(format: "image resizing and mask blur")
        var random = SplitMix64(seed: seed &+ 23)
        func image(_ width: Int, _ height: Int, channels: Int = 3) -> [UInt8] {
            (0..<(width * height * channels)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        }
        for index in 0..<casesPerFormat {
            let width = 1 + Int(random.next() % 40), height = 1 + Int(random.next() % 40)
            let toWidth = 1 + Int(random.next() % 48), toHeight = 1 + Int(random.next() % 48)
            let channels = random.next() % 2 == 0 ? 3 : 1, radius = radii[Int(random.next() % UInt64(radii.count))]
            let pixels = image(width, height, channels: channels)
            let filter: ImageResampling.Filter = random.next() % 2 == 0 ? .lanczos : .bilinear
            let maskWidth = 1 + Int(random.next() % 40), maskHeight = 1 + Int(random.next() % 40)
            let mask = RGBImage(width: maskWidth, height: maskHeight, pixels: image(maskWidth, maskHeight))
            tally.run {
                let resized = ImageResampling.resize(pixels, channels: channels, width: width, height: height,
                                                     toWidth: toWidth, toHeight: toHeight, filter: filter)
                XCTAssertEqual(resized.count, toWidth * toHeight * channels)
                let blur = try VaeImageProcessor.checkedBlur(radius, name: "mask blur")
                let blurred = ImageResampling.gaussianBlur(pixels, channels: channels, width: width, height: height, radius: Float(blur))
                XCTAssertEqual(blurred.count, pixels.count)
                if index % 8 == 4 {
                    let first = RGBImage(width: width, height: height, pixels: image(width, height))
                    let second = RGBImage(width: maskWidth, height: maskHeight, pixels: image(maskWidth, maskHeight))
                    let size = try VaeImageProcessor.outputSize(of: first, named: "control.png", width: nil, height: nil)
                    var request = GenerationRequest(prompt: "x", width: size.width, height: size.height)
                    request.controls = [first, second].map { ControlInput(controlnet: controlnet, image: $0) }
                    request.steps = 2
                    _ = try pipeline.generate(request)
                }
                guard index % 8 == 0 else { return }
                let initImage = RGBImage(width: width, height: height, pixels: image(width, height))
                let size = try VaeImageProcessor.outputSize(of: initImage, named: "init.png", width: nil, height: nil)
                var request = GenerationRequest(prompt: "x", width: size.width, height: size.height)
                request.initImage = initImage
                request.mask = VaeImageProcessor.blur(mask, radius: blur)
                request.strength = 0.5
                request.steps = 2
                _ = try pipeline.generate(request)
            }
        }
        finish(tally)
    }

    func testTarShards() throws {
        var builder = TarBuilder()
        builder.add(name: "000001.txt", data: Array("a red circle".utf8))
        builder.add(name: "000001.json", data: Array(#"{"text_en": "a red circle"}"#.utf8))
        builder.add(name: "000002.txt", data: Array("一个红色的圆形".utf8), base256Size: true)
        let valid = builder.finish()
        var tally = Tally(format: "tar")
        var random = SplitMix64(seed: seed &+ 4)
        let scratch = ScratchDirectory("pea-fuzz")
        for _ in 0..<casesPerFormat {
            let path = scratch.write(Self.mutate(valid, &random), to: "case.tar")
            tally.run { _ = try TarArchive(path: path).entries() }
        }
        finish(tally)
    }

    func testPrompts() throws {
        let tokenizer = try CLIPTokenizer(folder: fixturesDirectory() + "/tokenizers/clip_small")
        let pieces = ["a", " ", "red", "circle", "一个红色", "🙂", "\u{301}", "<|endoftext|>", "<|startoftext|>", "\n\t",
                      "\u{0}", "\u{FFFD}", "ﬁ", "İ", "'s", "!!!", "0123456789"]
        var tally = Tally(format: "prompts")
        var random = SplitMix64(seed: seed &+ 5)
        for _ in 0..<casesPerFormat {
            var text = ""
            for _ in 0..<Int(random.next() % 40) { text += pieces[Int(random.next() % UInt64(pieces.count))] }
            if random.next() % 8 == 0 { text += String(repeating: "x", count: Int(random.next() % 4000)) }   // one long word
            tally.run {
                let encoded = tokenizer(text)
                guard encoded.ids.count == tokenizer.modelMaxLength else {
                    throw PEAError.shapeMismatch("\(encoded.ids.count) ids for a padded prompt")
                }
            }
        }
        XCTAssertEqual(tally.refused, [:], "a prompt is always encoded")
        finish(tally)
    }

    func testPromptFiles() throws {
        let valid = Array("""
            {"prompt": "a fox", "id": "fox_1", "seed": 7, "negative_prompt": null, "batch": 2}

            {"prompt": "一只猫", "width": 64, "height": 16, "steps": 5, "guidance": 1.5, "scheduler": "euler-a", "text": "x"}
            """.utf8)
        let defaults = JobDefaults(negativePrompt: nil, baseSeed: 0, width: 32, height: 32, steps: 3, guidance: 7, scheduler: nil, batch: 1)
        var tally = Tally(format: "prompt files")
        var random = SplitMix64(seed: seed &+ 8)
        let scratch = ScratchDirectory("pea-fuzz")
        let objects = try String(decoding: valid, as: UTF8.self).split(separator: "\n").map { try JSONValue.parse(String($0)).objectValue! }
        for n in 0..<casesPerFormat {
            // Half the cases damage the bytes, half put hostile values in the fields.
            let bytes = n % 2 == 0 ? Self.mutate(valid, &random)
                : Array(objects.map { JSONValue.object(Self.mutateConfig($0, &random)).serialized() }.joined(separator: "\n").utf8)
            let path = scratch.write(bytes, to: "case.jsonl")
            tally.run { _ = try PromptFile.read(path: path, defaults: defaults) }
        }
        finish(tally)
    }

    /// A job folder's results.jsonl and job.json, damaged: opening the folder resumes or refuses, and never
    /// counts an image that is not there.
    func testJobFolders() throws {
        let defaults = JobDefaults(negativePrompt: nil, baseSeed: 0, width: 8, height: 8, steps: 1, guidance: 7, scheduler: nil, batch: 1)
        let items = try PromptFile.parse("a\nb\nc", path: "p.txt", jsonLines: false, defaults: defaults)
        let manifest = JobManifest(items: items, baseSeed: 0, settings: ["model": "m"])
        let scratch = ScratchDirectory("pea-fuzz")
        let made = scratch.file("made")
        let output = try JobOutput(folder: made, manifest: manifest, items: items, shard: .whole, format: .png, overwrite: false)
        for item in items.prefix(2) {
            try output.write(item, images: [RGBImage(width: 8, height: 8, pixels: Array(repeating: 7, count: 192))], parameters: "p",
                             record: { JobOutput.itemJSON(item).objectValue!.merging(["image": .number(Double($0))]) { a, _ in a } },
                             tarJSON: { _ in [:] })
        }
        let results = try XCTUnwrap(readFileBytes(made + "/results.jsonl")), job = try XCTUnwrap(readFileBytes(made + "/job.json"))
        var tally = Tally(format: "job folders")
        var random = SplitMix64(seed: seed &+ 9)
        for n in 0..<casesPerFormat {
            let folder = scratch.file("case\(n)")
            try makeDirectories(folder)
            for name in ["000000.png", "000001.png"] { writeFileBytes([1], to: folder + "/" + name) }
            let damageJob = random.next() % 4 == 0
            writeFileBytes(damageJob ? Self.mutate(job, &random) : job, to: folder + "/job.json")
            writeFileBytes(Self.mutate(results, &random), to: folder + "/results.jsonl")
            tally.run {
                let opened = try JobOutput(folder: folder, manifest: manifest, items: items, shard: .whole, format: .png, overwrite: false)
                guard opened.finishedItems.isSubset(of: [0, 1]) else {
                    throw PEAError.shapeMismatch("item(s) \(opened.finishedItems.sorted()) counted as done without their images")
                }
            }
            removeRecursively(folder)
        }
        XCTAssertEqual(tally.refused.keys.filter { $0 != "invalidFile" }, [], "only the job manifest is refused, as a file")
        finish(tally)
    }

    /// `--buckets` lists, and the training data positions a checkpoint carries (with bucket queues): damaged
    /// values parse and restore into a bucketed dataset, or are refused as PEAErrors; a restored position is the
    /// one it claims.
    func testBucketsAndDataPositions() throws {
        var tally = Tally(format: "buckets and data positions")
        var random = SplitMix64(seed: seed &+ 10)
        let bucketTexts = Array("448x896,640x640,896x448".utf8)
        let manifest = fixturesDirectory() + "/training/sdxl/corpus.jsonl"
        let shape = TrainingImageShape.buckets(try AspectBuckets.parse("24x16,20x20,16x24"), crop: .random)
        let made = try TrainingDataset(source: .manifest(path: manifest), shape: shape, seed: 5)
        for _ in 0..<3 { _ = try made.nextBatch(2) }
        let position = try XCTUnwrap(JSONValue.parse(made.position.serialized()).objectValue)
        for n in 0..<casesPerFormat {
            if n % 3 == 0 {
                let text = String(decoding: Self.mutate(bucketTexts, &random), as: UTF8.self)
                tally.run { _ = try AspectBuckets.parse(text) }
                continue
            }
            var values = position
            if n % 3 == 1 {
                values = Self.mutateConfig(position, &random)
            } else {
                var pending = position["pending"]?.arrayValue ?? []
                pending.append(Self.hostileJSON(&random))
                values["pending"] = .array(pending)
            }
            let text = JSONValue.object(values).serialized()
            tally.run {
                let parsed = try TrainingDataPosition(serialized: text)
                let dataset = try TrainingDataset(source: .manifest(path: manifest), shape: shape, seed: 5)
                try dataset.restore(parsed)
                guard dataset.position.index == parsed.index, dataset.position.pending == parsed.pending else {
                    throw PEAError.shapeMismatch("restored \(dataset.position), asked for \(parsed)")
                }
                _ = try dataset.nextBatch(2)
            }
        }
        finish(tally)
    }

    /// Mutated pipelined requests, fed in one read and in small pieces: both must give the same requests and
    /// the same refusal, and no request may exceed the limits.
    func testHTTPRequests() throws {
        let valid = Array(("POST /sdapi/v1/txt2img?x=1 HTTP/1.1\r\nHost: 127.0.0.1:7860\r\nContent-Type: application/json\r\n"
            + "Content-Length: 14\r\nConnection: keep-alive\r\n\r\n{\"prompt\":\"a\"}\r\nGET /health HTTP/1.0\r\n\r\n").utf8)
        let limits = HTTPLimits(headerBytes: 200, bodyBytes: 32, headerCount: 6)
        /// The requests the bytes hold and the error that ended them, the bytes given in pieces of `piece`.
        func parse(_ bytes: [UInt8], piece: Int) -> ([HTTPRequest], HTTPError?) {
            var parser = HTTPRequestParser(limits: limits)
            var requests: [HTTPRequest] = []
            for start in stride(from: 0, to: bytes.count, by: piece) {
                parser.append(bytes[start..<min(bytes.count, start + piece)])
                do {
                    while let request = try parser.next() { requests.append(request) }
                } catch {
                    return (requests, error)
                }
            }
            return (requests, nil)
        }
        var tally = Tally(format: "HTTP requests")
        var random = SplitMix64(seed: seed &+ 12)
        for _ in 0..<casesPerFormat {
            let bytes = Self.mutate(valid, &random)
            let piece = 1 + Int(random.next() % 16)
            tally.run {
                let (requests, error) = parse(bytes, piece: max(1, bytes.count))
                let (piecewise, piecewiseError) = parse(bytes, piece: piece)
                guard requests == piecewise, error == piecewiseError else {
                    throw PEAError.shapeMismatch("in one read: \(requests.count) requests, \(String(describing: error)); "
                        + "in pieces of \(piece): \(piecewise.count), \(String(describing: piecewiseError))")
                }
                for request in requests where request.body.count > limits.bodyBytes || request.headers.fields.count > limits.headerCount {
                    throw PEAError.shapeMismatch("a request past the limits: \(request)")
                }
                if let error { throw error }
            }
        }
        XCTAssertNil(tally.refused["shapeMismatch"], "the same bytes in pieces parse as in one read, within the limits")
        finish(tally)
    }

    /// Request bodies of `pea serve`'s generation endpoints (JSON with base64 images), mutated and handed to the
    /// server's router: every one is answered 200 or a 4xx naming what is wrong, never a 500 or a crash. The
    /// server runs in-process on the tiny SD1 pipeline, its limits small so that accepted cases stay quick.
    func testServeRequestBodies() throws {
        var configuration = GenerationServer.Configuration()
        configuration.port = 0
        configuration.maxSize = 64
        configuration.maxSteps = 2
        configuration.maxImages = 2
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: CPUBackend())
        let controlnet = try ControlNetModel.load(folder: fixturesDirectory() + "/controlnet/sd1_a", backend: pipeline.backend).model
        let server = try GenerationServer(model: .init(pipelines: ["english": pipeline], defaultChoice: "english", folder: "sd1",
                                                       backendName: "cpu", controlnets: [("sd1_a", controlnet)]), configuration: configuration)
        defer { server.stop() }
        let initImage = base64Encoded(readFileBytes(fixturesDirectory() + "/img2img/init_32x24.png")!)
        let controlImage = base64Encoded(readFileBytes(fixturesDirectory() + "/controlnet/control_32x24.png")!)
        let mask = base64Encoded(readFileBytes(fixturesDirectory() + "/inpaint/mask_32x24.png")!)
        let valid: [(String, String)] = [
            ("/sdapi/v1/txt2img", #"{"prompt": "a", "negative_prompt": "b", "seed": 3, "steps": 1, "cfg_scale": 7, "width": 32, "height": 24, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 2}"#),
            ("/sdapi/v1/img2img", "{\"prompt\": \"a\", \"seed\": 4, \"steps\": 2, \"denoising_strength\": 0.5, \"init_images\": [\"\(initImage)\"]}"),
            ("/v1/images/generations", #"{"prompt": "a", "n": 1, "size": "32x32", "response_format": "b64_json", "seed": 1, "steps": 1}"#),
            ("/sdapi/v1/img2img", "{\"prompt\": \"a\", \"steps\": 2, \"init_images\": [\"\(initImage)\"], \"mask\": \"\(mask)\", \"inpainting_mask_invert\": 1}"),
            ("/sdapi/v1/txt2img", "{\"prompt\": \"a\", \"seed\": 5, \"steps\": 2, \"alwayson_scripts\": {\"controlnet\": {\"args\": [{\"enabled\": true, "
                + "\"image\": \"\(controlImage)\", \"model\": \"sd1_a\", \"weight\": 0.8, \"guidance_start\": 0.2, \"guidance_end\": 0.9, \"module\": \"none\", "
                + "\"resize_mode\": \"Crop and Resize\", \"control_mode\": \"Balanced\"}, {\"enabled\": false}]}}}"),
        ]
        struct ServerError: Error { let status: Int, body: String }
        var tally = Tally(format: "serve request bodies")
        var random = SplitMix64(seed: seed &+ 13)
        for index in 0..<casesPerFormat {
            let (path, body) = valid[index % valid.count]
            let bytes = index < valid.count ? Array(body.utf8) : Self.mutate(Array(body.utf8), &random)
            tally.run {
                var request = HTTPRequest(method: "POST", target: path)
                request.body = bytes
                let response = server.handle(request)
                if response.status >= 500 { throw ServerError(status: response.status, body: String(decoding: response.body, as: UTF8.self)) }
                if response.status != 200 { throw PEAError.usage("HTTP \(response.status)") }
            }
        }
        XCTAssertGreaterThanOrEqual(tally.accepted, valid.count, "the unmutated bodies are answered 200")
        finish(tally)
    }

    func testCommandLines() throws {
        let steps = CommandOption.value("--steps", "N", default: "30", .range(1...1000), help: "steps")
        let guidance = CommandOption.value("--guidance", "G", default: "7.5", help: "guidance")
        let scheduler = CommandOption.value("--scheduler", "NAME", .choices(SchedulerName.allCases.map(\.rawValue)), help: "scheduler")
        let json = CommandOption.flag("--json", help: "json")
        let prompt = CommandOption.repeatable("--prompt", "TEXT", help: "prompt")
        let options = [steps, guidance, scheduler, json, prompt]
        let tokens = ["--steps", "--steps=", "--steps=0", "--steps=1e3", "--guidance", "--guidance=1e300", "--guidance=nan",
                      "--scheduler", "--scheduler=euler", "--json", "--json=1", "--prompt", "--prompt=", "-", "--", "---",
                      "-h", "30", "-1", "99999999999999999999", "euler", "", "一个红色的圆形", "=", "--=", "--bogus"]
        var tally = Tally(format: "command lines")
        var random = SplitMix64(seed: seed &+ 6)
        for _ in 0..<casesPerFormat {
            let arguments = (0..<Int(random.next() % 7)).map { _ in tokens[Int(random.next() % UInt64(tokens.count))] }
            tally.run {
                let parsed = try ParsedOptions(arguments, command: "fuzz", options: options)
                _ = try parsed.int(steps)
                _ = try parsed.double(guidance)
                _ = try parsed.optionalString(scheduler)
                _ = parsed.strings(prompt)
            }
        }
        XCTAssertEqual(Set(tally.refused.keys).subtracting(["usage"]), [], "command-line mistakes are usage errors")
        finish(tally)
    }

    /// Whole runs of `pea eval vae-decode` on mutated inputs and mutated VAE configs: each exits 0 with its output,
    /// or 1/2 with an error and no output file or temporary (a signal or another status is a crash).
    func testEvalRunsLeaveNoPartialOutput() throws {
        let model = fixturesDirectory() + "/models/vae"
        let inputs = readFileBytes(model + "/io.safetensors")!
        let config = try ConfigFile(path: model + "/config.json")
        var random = SplitMix64(seed: seed &+ 7)
        var tally = Tally(format: "pea eval runs")
        for index in 0..<max(8, casesPerFormat / 6) {
            let scratch = ScratchDirectory("pea-fuzz")
            let folder = scratch.file("vae")
            XCTAssertEqual(mkdir(folder, 0o755), 0)
            for name in listDirectory(model) where name != "config.json" {
                XCTAssertEqual(symlink(model + "/" + name, folder + "/" + name), 0)
            }
            var configValues = config.values
            if index % 2 == 1 { configValues = Self.mutateConfig(configValues, &random) }
            scratch.write(JSONValue.object(configValues).serialized(), to: "vae/config.json")
            let input = scratch.write(index % 2 == 0 ? Self.mutate(inputs, &random) : inputs, to: "in.safetensors")
            let output = scratch.file("out.safetensors")
            let result = try runPea(["eval", "vae-decode", "--model", folder, "--inputs", input, "--output", output,
                                     "--backend", "cpu", "--threads", "2"])
            tally.run {
                switch result.status {
                case 0:
                    _ = try SafeTensorsFile(path: output)
                case 1, 2:
                    XCTAssertTrue(result.stderr.contains("pea: error:"), "case \(index): \(result.stderr)")
                    XCTAssertFalse(FileManager.default.fileExists(atPath: output), "case \(index) left an output file")
                    throw PEAError.invalidFile(path: input, reason: "refused")
                default:
                    XCTFail("case \(index): pea ended with status \(result.status) (a crash?) on config \(JSONValue.object(configValues).serialized()): \(result.stderr.prefix(600))")
                }
            }
            XCTAssertEqual(scratch.entries().filter { $0.hasPrefix("out") && $0 != "out.safetensors" }, [], "case \(index) left a temporary")
        }
        finish(tally)
    }
}
