import Foundation
import XCTest
@testable import PEADiffusion

/// `pea inspect PATH [--json]` on the fixtures, whose facts their scripts know: make_single_file_fixtures.py (the
/// LDM-layout SD1/SD2/SDXL files, SD2's single file predicting v as diffusers' from_single_file reads it),
/// make_lora_fixtures.py (the kohya, PEFT and SDXL kohya LoRAs' modules, ranks and alphas),
/// make_pea_pipeline_fixtures.py (the SD1 and SDXL adapter forms), the pipelines and the bundled toy world.
final class InspectCommandTests: XCTestCase {
    let fixtures = fixturesDirectory()

    /// The JSON object `pea inspect --json` prints for `path`, after checking the text form succeeds too.
    func inspect(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: JSONValue] {
        let text = try runPea(["inspect", path])
        XCTAssertEqual(text.status, 0, text.stderr, file: file, line: line)
        XCTAssertTrue(text.stdout.hasPrefix("path:"), text.stdout, file: file, line: line)
        let json = try runPea(["inspect", path, "--json"])
        XCTAssertEqual(json.status, 0, json.stderr, file: file, line: line)
        return try XCTUnwrap(JSONValue.parse(json.stdout).objectValue, json.stdout, file: file, line: line)
    }

    /// Every tensor's elements and the file's size, read by the safetensors reader (not by inspect).
    func parameters(_ path: String) throws -> Int {
        let file = try SafeTensorsFile(path: path)
        return try file.names.map { try file.info($0).shape.reduce(1, *) }.reduce(0, +)
    }

    func fileSize(_ path: String) throws -> Int {
        (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)!.intValue
    }

    func testSingleFileCheckpoints() throws {
        let families = [("sd1", "SD1", ["text_encoder"]), ("sd2", "SD2", ["text_encoder"]),
                        ("sdxl", "SDXL", ["text_encoder", "text_encoder_2"])]
        for (name, family, encoders) in families {
            // The prediction type diffusers' from_single_file gave these files (the script asserts it equals the
            // folder's): the config folder's scheduler_config.json.
            let configFolder = fixtures + (name == "sdxl" ? "/single_file/sdxl_config" : "/pipelines/\(name)")
            let prediction = try ConfigFile(path: configFolder + "/scheduler/scheduler_config.json").string("prediction_type", default: "epsilon")
            let safetensors = fixtures + "/single_file/\(name).safetensors"
            for path in [safetensors, fixtures + "/single_file/\(name).ckpt"] {
                let facts = try inspect(path)
                XCTAssertEqual(facts["kind"], .string("single-file checkpoint"), path)
                XCTAssertEqual(facts["family"], .string(family), path)
                XCTAssertEqual(facts["variant"], .string("base"), path)
                XCTAssertEqual(facts["runs_in_pea"], .bool(true), path)
                XCTAssertEqual(facts["prediction_type"], .string(prediction), path)
                XCTAssertEqual(facts["components"]?.objectValue.map { Set($0.keys) }, Set(["unet", "vae"] + encoders), path)
                XCTAssertEqual(facts["unet_in_channels"], .number(4), path)
                XCTAssertEqual(facts["ema"], .bool(false), path)
                XCTAssertEqual(facts["dtypes"]?.objectValue.map { Set($0.keys) }, ["f32"], path)
                // The .ckpt holds the same state dict as the .safetensors (the script saves one state twice).
                XCTAssertEqual(facts["parameters"]?.intValue, try parameters(safetensors), path)
                XCTAssertEqual(facts["file_bytes"]?.intValue, try fileSize(path), path)
            }
        }
        let text = try runPea(["inspect", fixtures + "/single_file/sd2.safetensors"])
        XCTAssertTrue(text.stdout.contains("family:") && text.stdout.contains("SD2.x"), text.stdout)
        XCTAssertTrue(text.stdout.contains("v_prediction"), text.stdout)
    }

    /// Refiners and inpainting files, which the loader refuses, are still told apart; EMA copies are seen.
    func testRefinerInpaintingAndEMAFilesAreDescribed() throws {
        let scratch = ScratchDirectory("pea-inspect")
        let original = try SafeTensorsFile(path: fixtures + "/single_file/sd1.safetensors")
        func write(_ name: String, _ change: (inout [(name: String, tensor: HostTensor)]) throws -> Void) throws -> String {
            var tensors = try original.names.map { (name: $0, tensor: try original.tensor($0)) }
            try change(&tensors)
            try SafeTensorsWriter.write(tensors, to: scratch.file(name))
            return scratch.file(name)
        }
        let convIn = "model.diffusion_model.input_blocks.0.0.weight"
        let inpainting = try write("inpainting.safetensors") { tensors in
            let index = tensors.firstIndex { $0.name == convIn }!
            var shape = tensors[index].tensor.shape
            shape[1] = 9
            tensors[index].tensor = HostTensor([Float](repeating: 0, count: shape.reduce(1, *)), shape: shape)
        }
        var facts = try inspect(inpainting)
        XCTAssertEqual(facts["family"], .string("SD1"))
        XCTAssertEqual(facts["variant"], .string("inpainting"))
        XCTAssertEqual(facts["unet_in_channels"], .number(9))
        XCTAssertEqual(facts["runs_in_pea"], .bool(false))

        let refiner = try write("refiner.safetensors") { tensors in
            tensors.append((name: "conditioner.embedders.0.model.ln_final.weight", tensor: HostTensor([Float](repeating: 1, count: 2), shape: [2])))
            tensors.append((name: "model_ema.decay", tensor: HostTensor([Float(0.999)], shape: [])))
        }
        facts = try inspect(refiner)
        XCTAssertEqual(facts["family"], .string("SDXL"))
        XCTAssertEqual(facts["variant"], .string("refiner"))
        XCTAssertEqual(facts["runs_in_pea"], .bool(false))
        XCTAssertEqual(facts["ema"], .bool(true))
        let text = try runPea(["inspect", refiner])
        XCTAssertTrue(text.stdout.contains("refiner") && text.stdout.contains("Pea runs base models"), text.stdout)
    }

    func testLoRAFiles() throws {
        // (file, format, modules, targets, ranks, alphas, LoCon modules, family): KOHYA_MODULES, PEFT_MODULES (no alphas:
        // alpha = rank) and SDXL_MODULES of make_lora_fixtures.py.
        let cases: [(String, String, Int, [String: Int], [Double], [Double], Int, String)] = [
            ("kohya", "kohya", 7, ["unet": 4, "text_encoder": 3], [2, 3, 4], [1, 1.5, 2, 4], 1, "SD1/SD2"),
            ("peft", "PEFT/diffusers", 7, ["unet": 5, "text_encoder": 2], [2, 3, 4], [2, 3, 4], 1, "SD1/SD2"),
            ("sdxl_kohya", "kohya", 9, ["unet": 5, "text_encoder": 2, "text_encoder_2": 2], [2, 3, 4], [1, 1.5, 2, 3], 2, "SDXL"),
        ]
        for (name, format, modules, targets, ranks, alphas, locon, family) in cases {
            let path = fixtures + "/lora/\(name).safetensors"
            let facts = try inspect(path)
            XCTAssertEqual(facts["kind"], .string("LoRA"), name)
            XCTAssertEqual(facts["format"], .string(format), name)
            XCTAssertEqual(facts["modules"], .number(Double(modules)), name)
            XCTAssertEqual(facts["targets"], .object(targets.mapValues { .number(Double($0)) }), name)
            XCTAssertEqual(facts["ranks"], .array(ranks.map { .number($0) }), name)
            XCTAssertEqual(facts["alphas"], .array(alphas.map { .number($0) }), name)
            XCTAssertEqual(facts["locon_modules"], .number(Double(locon)), name)
            XCTAssertEqual(facts["family"], .string(family), name)
            XCTAssertEqual(facts["parameters"]?.intValue, try parameters(path), name)
        }
        // make_lora_metadata_fixtures.py: PEFT configs in the header — UNet r 4 (one module 2), lora_alpha 8 (one
        // module 3); text encoder r 2, lora_alpha 3.
        let metadata = try inspect(fixtures + "/lora_metadata/peft_metadata.safetensors")
        XCTAssertEqual(metadata["ranks"], .array([2, 4].map { .number($0) }))
        XCTAssertEqual(metadata["alphas"], .array([3, 8].map { .number($0) }))
        XCTAssertEqual(metadata["alpha_source"], .string("lora_adapter_metadata"))
        XCTAssertEqual(try inspect(fixtures + "/lora/kohya.safetensors")["alpha_source"], .string("alpha tensors"))
        XCTAssertEqual(try inspect(fixtures + "/lora/peft.safetensors")["alpha_source"], .string("rank"))

        // At SD's real widths a cross-attention key's input tells the family.
        let scratch = ScratchDirectory("pea-inspect")
        for (width, family) in [(768, "SD1"), (1024, "SD2"), (2048, "SDXL")] {
            let path = scratch.file("lora\(width).safetensors")
            let module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
            try SafeTensorsWriter.write([(name: module + ".lora_A.weight", tensor: HostTensor([Float](repeating: 0, count: 4 * width), shape: [4, width])),
                                         (name: module + ".lora_B.weight", tensor: HostTensor([Float](repeating: 0, count: 640 * 4), shape: [640, 4]))],
                                        to: path)
            XCTAssertEqual(try inspect(path)["family"], .string(family), "\(width)")
        }
    }

    func testPEAAdapters() throws {
        // make_pea_pipeline_fixtures.py: SD1 form 16 → 32 → 32 → 16; SDXL form 16 → 24 → 16, fc 16 → 32 (torch.save).
        var facts = try inspect(fixtures + "/pea/adapter_sd1.safetensors")
        XCTAssertEqual(facts["kind"], .string("PEA adapter"))
        XCTAssertEqual(facts["form"], .string("SD1/SD2"))
        XCTAssertEqual(facts["input_width"], .number(16))
        XCTAssertEqual(facts["widths"], .array([16, 32, 32, 16].map { .number($0) }))
        XCTAssertNil(facts["pooled_width"])
        XCTAssertEqual(facts["parameters"]?.intValue, try parameters(fixtures + "/pea/adapter_sd1.safetensors"))
        XCTAssertEqual(facts["dtypes"]?.objectValue.map { Set($0.keys) }, ["f32"])

        facts = try inspect(fixtures + "/pea/adapter_sdxl/pytorch_model.bin")
        XCTAssertEqual(facts["form"], .string("SDXL"))
        XCTAssertEqual(facts["input_width"], .number(16))
        XCTAssertEqual(facts["output_width"], .number(32))
        XCTAssertEqual(facts["pooled_width"], .number(16))

        // The bundled toy world's Chinese side: its encoder and the adapter pea train wrote (metadata) agree.
        let bundle = fixtures + "/../../models/toyworld-zh"
        facts = try inspect(bundle)
        XCTAssertEqual(facts["adapter"], .string("PEA adapter"))
        XCTAssertEqual(facts["adapter_trained_by"], .string("pea train"))
        XCTAssertEqual(facts["encoder_model"], .string("Chinese-CLIP"))
        XCTAssertEqual(facts["widths_match"], .bool(true))
        let adapter = try SafeTensorsFile(path: bundle + "/adapter.safetensors")
        XCTAssertEqual(facts["adapter_metadata"]?.objectValue?["step"], adapter.metadata["step"].map { .string($0) })
        XCTAssertEqual(facts["adapter_input_width"], .number(Double(try adapter.info("layernorm.weight").shape[0])))
    }

    func testDiffusersFolders() throws {
        for (name, family) in [("sd1", "SD1"), ("sd2", "SD2"), ("sdxl", "SDXL")] {
            let folder = fixtures + "/pipelines/\(name)"
            let facts = try inspect(folder)
            let index = try XCTUnwrap(JSONValue.parse(String(contentsOfFile: folder + "/model_index.json", encoding: .utf8)).objectValue)
            let scheduler = try ConfigFile(path: folder + "/scheduler/scheduler_config.json")
            XCTAssertEqual(facts["kind"], .string("diffusers pipeline"), name)
            XCTAssertEqual(facts["class"], index["_class_name"], name)
            XCTAssertEqual(facts["family"], .string(family), name)
            XCTAssertEqual(facts["prediction_type"], .string(try scheduler.string("prediction_type", default: "epsilon")), name)
            // Entries [null, null] are optional components the pipeline does not have.
            let components = try XCTUnwrap(facts["components"]?.objectValue, name)
            XCTAssertEqual(Set(components.keys), Set(index.filter { $0.value.arrayValue?.count == 2 && $0.value.arrayValue?[1].stringValue != nil }.keys), name)
            XCTAssertEqual(components["unet"]?.objectValue?["weights"]?.objectValue?["diffusion_pytorch_model.safetensors"]?
                .objectValue?["parameters"]?.intValue, try parameters(folder + "/unet/diffusion_pytorch_model.safetensors"), name)
        }
        // The bundled toy world: an SD1-format pipeline stored in f16.
        let toy = try inspect(fixtures + "/../../models/toyworld")
        XCTAssertEqual(toy["family"], .string("SD1"))
        XCTAssertEqual(toy["components"]?.objectValue?["unet"]?.objectValue?["weights"]?.objectValue?["diffusion_pytorch_model.safetensors"]?
            .objectValue?["dtypes"]?.objectValue.map { Set($0.keys) }, ["f16"])

        // One component, and the language encoders LanguageEncoders.load tells apart.
        let unet = try inspect(fixtures + "/pipelines/sdxl/unet")
        XCTAssertEqual(unet["kind"], .string("diffusers component"))
        XCTAssertEqual(unet["class"], .string("UNet2DConditionModel"))
        for (folder, model) in [("multilingual/xlm_roberta", "XLM-R"), ("multilingual/chinese_clip_full", "Chinese-CLIP"),
                                ("multilingual/bert_bin", "BERT"), ("pea/zh_encoder", "Chinese-CLIP")] {
            let facts = try inspect(fixtures + "/" + folder)
            XCTAssertEqual(facts["kind"], .string("language encoder"), folder)
            XCTAssertEqual(facts["model"], .string(model), folder)
            let config = try XCTUnwrap(JSONValue.parse(String(contentsOfFile: fixtures + "/\(folder)/config.json", encoding: .utf8)).objectValue)
            let hidden = config["hidden_size"] ?? config["text_config"]?.objectValue?["hidden_size"]
            XCTAssertEqual(facts["hidden_size"], hidden, folder)
        }
    }

    func testUnrecognisedSafetensorsIsNotAnError() throws {
        let path = fixtures + "/pipelines/sd1_pndm.safetensors"
        let facts = try inspect(path)
        XCTAssertEqual(facts["kind"], .string("unrecognised safetensors"))
        XCTAssertEqual(facts["tensors"], .number(Double(try SafeTensorsFile(path: path).names.count)))
        XCTAssertEqual(facts["example_tensors"], .array(try SafeTensorsFile(path: path).names.prefix(5).map { .string($0) }))
    }

    func testBadInputIsAClearError() throws {
        let scratch = ScratchDirectory("pea-inspect")
        let safetensors = readFileBytes(fixtures + "/single_file/sd1.safetensors")!, ckpt = readFileBytes(fixtures + "/single_file/sd1.ckpt")!
        let truncated = scratch.write(Array(safetensors.prefix(safetensors.count / 2)), to: "truncated.safetensors")
        let truncatedCkpt = scratch.write(Array(ckpt.prefix(ckpt.count / 2)), to: "truncated.ckpt")
        let garbage = scratch.write(Array("not a model at all".utf8), to: "garbage.safetensors")
        let empty = scratch.file("empty")
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: false)
        let cases: [([String], Int32, [String])] = [
            (["inspect", scratch.file("missing.safetensors")], 1, [scratch.file("missing.safetensors"), "no such file"]),
            (["inspect", "/dev/null"], 1, ["/dev/null", "not a regular file"]),
            (["inspect", truncated], 1, [truncated, "past the end"]),
            (["inspect", truncatedCkpt], 1, [truncatedCkpt, "truncated"]),
            (["inspect", garbage], 1, [garbage]),
            (["inspect", empty], 1, [empty, "not a model folder"]),
            (["inspect", fixtures + "/tokenizers"], 1, ["not a model folder"]),
            (["inspect"], 2, ["give one PATH"]),
            (["inspect", truncated, garbage], 2, ["give one PATH"]),
            (["inspect", truncated, "--bogus"], 2, ["--bogus"]),
        ]
        for (arguments, status, fragments) in cases {
            let result = try runPea(arguments)
            XCTAssertEqual(result.status, status, "\(arguments): \(result.stderr)")
            XCTAssertEqual(result.stdout, "", "\(arguments)")
            for fragment in fragments {
                XCTAssertTrue(result.stderr.contains(fragment), "\(arguments): '\(fragment)' not in \(result.stderr)")
            }
        }
    }

    func testHelpAndUsage() throws {
        let help = try runPea(["inspect", "--help"])
        XCTAssertEqual(help.status, 0)
        XCTAssertTrue(help.stdout.contains("pea inspect PATH [--json]") && help.stdout.contains("--json"), help.stdout)
        let usage = try runPea(["--help"])
        XCTAssertTrue(usage.stdout.contains("pea inspect PATH"), usage.stdout)
    }
}
