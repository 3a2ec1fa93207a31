import XCTest
@testable import PEADiffusion

/// The UNet and the VAE against diffusers, on the tiny model folders of tools/reference/make_model_fixtures.py.
/// Each folder is loaded through the loader a user's model goes through; `io.safetensors` beside it holds the
/// inputs and diffusers' outputs (`out.*`).
final class ModelParityTests: XCTestCase {
    let backend = CPUBackend()

    func folder(_ name: String) -> String { fixturesDirectory() + "/models/" + name }

    /// Loads a case's inputs onto the backend and its expected outputs as host tensors.
    func io(_ name: String, file ioFile: String = "io.safetensors") throws -> (inputs: [String: Tensor], expected: [String: HostTensor]) {
        let file = try SafeTensorsFile(path: folder(name) + "/" + ioFile)
        var inputs: [String: Tensor] = [:], expected: [String: HostTensor] = [:]
        for tensorName in file.names {
            if tensorName.hasPrefix("out.") {
                expected[String(tensorName.dropFirst(4))] = try file.tensor(tensorName)
            } else {
                inputs[tensorName] = try backend.upload(file.tensor(tensorName))
            }
        }
        return (inputs, expected)
    }

    func check(_ actual: Tensor, _ expected: HostTensor?, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        guard let expected else { return XCTFail("\(what): no reference output", file: file, line: line) }
        XCTAssertEqual(actual.shape, expected.shape, "\(what): shape", file: file, line: line)
        assertClose(try backend.downloadFloats(actual), expected.floats(), .f32, what, file: file, line: line)
    }

    func checkUNet(_ name: String, expectBlocks: Int, io ioFile: String = "io.safetensors") throws {
        let (unet, unused) = try UNet2DConditionModel.load(folder: folder(name), backend: backend)
        XCTAssertEqual(unused, [], "\(name): weights the model did not use")
        let (inputs, expected) = try io(name, file: ioFile)
        let (sample, features) = try unet.evaluate(
            DenoisingInputs(sample: inputs["sample"]!, timestep: inputs["timestep"]!, encoderHiddenStates: inputs["encoder_hidden_states"]!,
                       textEmbeds: inputs["text_embeds"], timeIds: inputs["time_ids"]),
            keepFeatures: true)
        try check(sample, expected["sample"], "\(name) sample")
        XCTAssertEqual(features.down.count, expectBlocks)
        XCTAssertEqual(features.up.count, expectBlocks)
        for (i, h) in features.down.enumerated() { try check(h, expected["down.\(i)"], "\(name) down.\(i)") }
        try check(XCTUnwrap(features.mid), expected["mid"], "\(name) mid")
        for (i, h) in features.up.enumerated() { try check(h, expected["up.\(i)"], "\(name) up.\(i)") }
        // every feature the reference recorded was compared
        let featureNames = Set(expected.keys).subtracting(["sample"])
        XCTAssertEqual(featureNames.count, 2 * expectBlocks + 1, "\(name): reference features \(featureNames.sorted())")
    }

    func testSD1StyleUNet() throws { try checkUNet("unet_sd1", expectBlocks: 2) }

    func testSD2StyleUNet() throws { try checkUNet("unet_sd2", expectBlocks: 3) }

    /// A 7×10 latent for a UNet that halves it twice: halved rounding up on the way down, each upsampler
    /// brought to its skip's size on the way up (diffusers' forward_upsample_size).
    func testUNetOnALatentThatIsNotAMultipleOfItsDownsampling() throws {
        try checkUNet("unet_sd2", expectBlocks: 3, io: "io_odd_latent.safetensors")
    }

    func testSDXLStyleUNet() throws { try checkUNet("unet_sdxl", expectBlocks: 3) }

    func testShardedUNetReadsTheSameWeights() throws {
        let (unet, unused) = try UNet2DConditionModel.load(folder: folder("unet_sd1_sharded"), backend: backend)
        XCTAssertEqual(unused, [])
        let (inputs, expected) = try io("unet_sd1")
        let sample = try unet(DenoisingInputs(sample: inputs["sample"]!, timestep: inputs["timestep"]!,
                                         encoderHiddenStates: inputs["encoder_hidden_states"]!))
        try check(sample, expected["sample"], "unet_sd1_sharded sample")
    }

    func checkVAE(_ name: String) throws {
        let (vae, unused) = try AutoencoderKL.load(folder: folder(name), backend: backend)
        XCTAssertEqual(unused, [], "\(name): weights the model did not use")
        let (inputs, expected) = try io(name)
        let (mean, logvar) = try vae.encode(inputs["image"]!)
        try check(mean, expected["latent_mean"], "\(name) latent_mean")
        try check(logvar, expected["latent_logvar"], "\(name) latent_logvar")
        try check(vae.decode(inputs["latents"]!), expected["sample"], "\(name) decoded sample")
    }

    func testVAE() throws { try checkVAE("vae") }

    func testVAEWithPre014AttentionNames() throws { try checkVAE("vae_legacy_names") }

    // MARK: configuration errors

    func unetConfig(_ edit: (inout [String: JSONValue]) -> Void) throws -> UNetConfig {
        var values = try ConfigFile(path: folder("unet_sd1") + "/config.json").values
        edit(&values)
        return try UNetConfig(ConfigFile(path: "edited/config.json", values: values))
    }

    func testUnsupportedConfigValuesNameTheField() throws {
        let cases: [(String, JSONValue)] = [
            ("down_block_types", .array([.string("SimpleCrossAttnDownBlock2D"), .string("DownBlock2D")])),
            ("class_embed_type", .string("timestep")),
            ("resnet_time_scale_shift", .string("scale_shift")),
            ("addition_embed_type", .string("text_image")),
            ("layers_per_block", .array([.number(1), .number(1), .number(1)])),
            ("act_fn", .string("gelu")),
        ]
        for (key, value) in cases {
            XCTAssertThrowsError(try unetConfig { $0[key] = value }, key) { error in
                XCTAssertTrue("\(error)".contains(key), "\(error) should name \(key)")
            }
        }
        XCTAssertThrowsError(try unetConfig { $0["block_out_channels"] = nil; $0["down_block_types"] = .array([.string("DownBlock2D")]) })
    }

    func testLegacyAttentionHeadDimMeansHeads() throws {
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim
        let legacy = try unetConfig { $0["num_attention_heads"] = .null; $0["attention_head_dim"] = .array([.number(2), .number(4)]) }
        XCTAssertEqual(legacy.attentionHeads, [2, 4])
        let explicit = try unetConfig { $0["num_attention_heads"] = .number(4); $0["attention_head_dim"] = .number(99) }
        XCTAssertEqual(explicit.attentionHeads, [4, 4])
    }

    func testWrongWeightShapeNamesFileAndTensor() throws {
        let scratch = ScratchDirectory("pea-unet")
        let source = folder("unet_sd1")
        var config = try ConfigFile(path: source + "/config.json").values
        config["cross_attention_dim"] = .number(24)
        scratch.write(JSONValue.object(config).serialized(), to: "config.json")
        _ = scratch.write(readFileBytes(source + "/diffusion_pytorch_model.safetensors")!, to: "diffusion_pytorch_model.safetensors")
        XCTAssertThrowsError(try UNet2DConditionModel.load(folder: scratch.path, backend: backend)) { error in
            let message = "\(error)"
            XCTAssertTrue(message.contains("diffusion_pytorch_model.safetensors") && message.contains("attn2.to_k.weight"), message)
        }
    }
}
