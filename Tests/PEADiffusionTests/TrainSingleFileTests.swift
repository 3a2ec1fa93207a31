import Foundation
import XCTest
@testable import PEADiffusion

/// `pea train` against a single-file checkpoint (`--model FILE`) and with LoRAs merged into the teacher (`--lora`),
/// loaded through the same code as `pea generate`'s: a file diffusers converted from a folder trains exactly as the
/// folder, and a folder with a LoRA merged trains as the folder diffusers fused that LoRA into and saved.
final class TrainSingleFileTests: XCTestCase {
    let sd1 = fixturesDirectory() + "/pipelines/sd1"
    let encoder = fixturesDirectory() + "/pea/zh_encoder"
    let singleFile = fixturesDirectory() + "/single_file"

    /// A short `pea train` run on `data` with `model` (the teacher's options); returns the output folder.
    func train(_ model: [String], data: String, scratch: ScratchDirectory, name: String, extra: [String] = []) throws -> String {
        let output = scratch.file(name)
        let result = try runPea(["train", "--text-encoder", encoder, "--data", data, "--batch-size", "2", "--resolution", "32",
                                 "--adapter-hidden", "24", "--lr", "1e-3", "--steps", "3", "--backend", "cpu", "--threads", "2",
                                 "--output", output] + model + extra)
        XCTAssertEqual(result.status, 0, result.stderr)
        return output
    }

    /// The per-step loss terms a run logged in its metrics.jsonl.
    func losses(_ output: String) throws -> [[Double]] {
        let text = try String(contentsOfFile: output + "/metrics.jsonl", encoding: .utf8)
        return try text.split(separator: "\n").map { line in
            let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            return try ["loss", "loss_task", "loss_logits", "loss_features", "grad_norm"].map { try XCTUnwrap(object[$0] as? Double, $0) }
        }
    }

    /// tools/reference/make_single_file_fixtures.py wrote sd1.safetensors and sd1.ckpt from pipelines/sd1 with
    /// diffusers' conversion (and checked that from_single_file reads back the folder's state dicts): the same
    /// numbers under other names, so the teacher is the same and the adapter after three steps is bit for bit the
    /// folder's, and so are the optimizer state and every logged loss.
    func testSingleFileTeacherTrainsExactlyAsItsFolder() throws {
        let scratch = ScratchDirectory("pea-train-single-file")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 5, seed: 8)
        let folder = try train(["--model", sd1], data: data, scratch: scratch, name: "folder")
        for checkpoint in ["sd1.safetensors", "sd1.ckpt"] {
            let file = try train(["--model", singleFile + "/" + checkpoint, "--config", sd1], data: data, scratch: scratch, name: checkpoint)
            XCTAssertNotNil(readFileBytes(file + "/adapter.safetensors"))
            XCTAssertEqual(readFileBytes(file + "/adapter.safetensors"), readFileBytes(folder + "/adapter.safetensors"), checkpoint)
            XCTAssertEqual(readFileBytes(file + "/optimizer.safetensors"), readFileBytes(folder + "/optimizer.safetensors"), checkpoint)
            XCTAssertEqual(try losses(file), try losses(folder), checkpoint)
        }
    }

    /// The fused pipeline tools/reference/make_train_lora_fixtures.py saved: pipelines/sd1 with kohya.safetensors
    /// (UNet and text-encoder modules) fused at 0.7 by diffusers. Its UNet and text encoder are the fixture's; the
    /// rest is pipelines/sd1's, which the LoRA does not touch.
    func fusedFolder(_ scratch: ScratchDirectory) throws -> String {
        let fused = scratch.file("fused")
        try makeDirectories(fused)
        for (name, source) in [("model_index.json", sd1), ("scheduler", sd1), ("tokenizer", sd1), ("vae", sd1),
                               ("unet", LoRATests.directory + "/train_fused_kohya07"),
                               ("text_encoder", LoRATests.directory + "/train_fused_kohya07")] {
            XCTAssertEqual(symlink(source + "/" + name, fused + "/" + name), 0, name)
        }
        return fused
    }

    /// `--lora L:0.7` on the folder against the folder diffusers fused L into at 0.7: the merged teacher weights
    /// agree within LoRATests' 1e-5 (the merge's f32 rounding: Pea sums W + s·(up·down) in one GEMM order, torch in
    /// another, so the last bits of the merged weights differ), and so the run is not bit-identical but close, within
    /// the same 1e-5: the losses relative, the adapters absolute (three AdamW steps of lr 1e-3 move a weight by at
    /// most 3e-3, so the merge's rounding reaches the adapter scaled down; measured: losses 3e-7 relative, adapter
    /// weights 9e-7).
    func testLoRATeacherTrainsAsTheFolderDiffusersFusedItInto() throws {
        let scratch = ScratchDirectory("pea-train-lora")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 5, seed: 9)
        let fused = try fusedFolder(scratch)

        // The teacher's weights: every UNet and text-encoder tensor, merged as pea train merges them, against the
        // fused folder's.
        let backend = CPUBackend(threads: 2)
        let lora = try LoRASet([LoRASpec(path: LoRATests.directory + "/kohya.safetensors", scale: 0.7)])
        let unetConfig = try UNetConfig(ConfigFile(path: sd1 + "/unet/config.json"))
        for (component, file) in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")] {
            let source = try SafeTensorsFile(path: "\(sd1)/\(component)/\(file)")
            let reference = try SafeTensorsFile(path: "\(fused)/\(component)/\(file)")
            let weights = lora.weights(SafeTensorsWeights(try SafeTensorsCollection(path: "\(sd1)/\(component)/\(file)"), backend: backend),
                                       component: component,
                                       unet: component == "unet" ? unetConfig : nil)
            var largest: Float = 0, changed = 0
            for name in reference.names {
                let expected = try reference.tensor(name).converted(to: .f32).floats()
                let values = try backend.downloadFloats(weights.tensor(name, shape: reference.tensor(name).shape))
                largest = max(largest, zip(values, expected).map { abs($0 - $1) }.max() ?? 0)
                if try values != source.tensor(name).converted(to: .f32).floats() { changed += 1 }
            }
            XCTAssertLessThan(largest, 1e-5, "\(component): the merged weights vs diffusers' fused ones")
            XCTAssertEqual(changed, component == "unet" ? 4 : 3, "\(component): weights the LoRA changed")
        }

        let viaLoRA = try train(["--model", sd1, "--lora", LoRATests.directory + "/kohya.safetensors:0.7"], data: data, scratch: scratch, name: "lora")
        let viaFused = try train(["--model", fused], data: data, scratch: scratch, name: "fused")
        let plain = try train(["--model", sd1], data: data, scratch: scratch, name: "plain")
        let (loraLosses, fusedLosses) = (try losses(viaLoRA), try losses(viaFused))
        XCTAssertEqual(loraLosses.count, 3)
        for (step, (a, b)) in zip(loraLosses, fusedLosses).enumerated() {
            for (x, y) in zip(a, b) { XCTAssertEqual(x, y, accuracy: 1e-5 * max(abs(y), 1e-6), "step \(step + 1): \(a) vs \(b)") }
        }
        XCTAssertNotEqual(loraLosses, try losses(plain), "the LoRA changes the teacher")
        let adapter = try SafeTensorsFile(path: viaLoRA + "/adapter.safetensors"), expected = try SafeTensorsFile(path: viaFused + "/adapter.safetensors")
        XCTAssertEqual(adapter.names.sorted(), expected.names.sorted())
        for name in expected.names {
            let (a, b) = (try adapter.tensor(name).converted(to: .f32).floats(), try expected.tensor(name).converted(to: .f32).floats())
            XCTAssertLessThan(zip(a, b).map { abs($0 - $1) }.max()!, 1e-5, name)
        }
    }

    /// SDXL: the single-file SDXL fixture (both embedders, the second wider) and the SDXL pipeline with an SDXL
    /// kohya LoRA (LDM-named UNet modules, both text encoders) are teachers too: the adapter takes the SDXL form, and
    /// the LoRA changes what it learns from. (No diffusers-written SDXL folder of the file, or fused SDXL folder,
    /// is in the fixtures: the SD1 tests above hold the parity; this one holds that SDXL takes the same path.)
    func testSDXLSingleFileAndLoRATeachersTrain() throws {
        let scratch = ScratchDirectory("pea-train-sdxl-single-file")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 4, seed: 10)
        let sdxl = fixturesDirectory() + "/pipelines/sdxl"
        for (name, model) in [("file", ["--model", singleFile + "/sdxl.safetensors", "--config", singleFile + "/sdxl_config"]),
                              ("lora", ["--model", sdxl, "--lora", LoRATests.directory + "/sdxl_kohya.safetensors:0.8"]),
                              ("plain", ["--model", sdxl])] {
            let output = try train(model, data: data, scratch: scratch, name: name)
            let adapter = try PEAAdapter.load(path: output + "/adapter.safetensors", backend: CPUBackend())
            XCTAssertTrue(adapter.isSDXL, name)
        }
        XCTAssertNotEqual(try losses(scratch.file("lora")), try losses(scratch.file("plain")), "the LoRA changes the SDXL teacher")
    }

    /// --vae swaps the VAE that encodes the training latents, so it gets its own latent-cache namespace: the cache
    /// fills again for it (and is reused by a second run with it).
    func testVAESwapHasItsOwnLatentCacheNamespace() throws {
        let scratch = ScratchDirectory("pea-train-vae-cache")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 4, seed: 3)
        let cache = scratch.file("latents")
        func cached() -> Int { listDirectory(cache).map { listDirectory(cache + "/" + $0).count }.reduce(0, +) }
        let vae = ["--vae", singleFile + "/sd1_vae.safetensors"]
        _ = try train(["--model", sd1], data: data, scratch: scratch, name: "a", extra: ["--latent-cache", cache])
        let first = cached()
        XCTAssertEqual(first, 4)
        _ = try train(["--model", sd1] + vae, data: data, scratch: scratch, name: "b", extra: ["--latent-cache", cache])
        XCTAssertEqual(cached(), 2 * first, "the swapped VAE's latents are cached apart")
        _ = try train(["--model", sd1] + vae, data: data, scratch: scratch, name: "c", extra: ["--latent-cache", cache])
        XCTAssertEqual(cached(), 2 * first)
    }

    /// The single-file and LoRA mistakes are generate's errors, word for word, with no adapter left behind; and
    /// --help tells of the options.
    func testBadModelFilesAndLoRAsAreGeneratesErrors() throws {
        let scratch = ScratchDirectory("pea-train-single-file-errors")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 2, seed: 5)
        let output = scratch.file("out")
        let train = ["train", "--text-encoder", encoder, "--data", data, "--steps", "1", "--resolution", "32", "--output", output,
                     "--backend", "cpu"]
        let generate = ["generate", "--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32",
                        "--output", scratch.file("out.png"), "--backend", "cpu"]
        let notACheckpoint = LoRATests.directory + "/kohya.safetensors"
        // A LoRA for a module the tiny UNet does not have (a fourth down block).
        let strayLoRA = scratch.file("stray.safetensors")
        try SafeTensorsWriter.write([("lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight", HostTensor([Float](repeating: 0.1, count: 8), shape: [2, 4])),
                                     ("lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight", HostTensor([Float](repeating: 0.1, count: 8), shape: [4, 2]))],
                                    to: strayLoRA)
        let cases: [([String], String)] = [
            (["--model", notACheckpoint, "--config", sd1], notACheckpoint),
            (["--model", sd1, "--lora", strayLoRA], "matches no module"),
            (["--model", sd1, "--lora", LoRATests.directory + "/sdxl_kohya.safetensors"], "do not fit the model's"),
            (["--model", sd1, "--config", sd1], "--config applies to a single-file --model FILE, not a folder"),
            (["--model", singleFile + "/sd1.safetensors"], "--tokenizer DIR"),
            (["--model", sd1, "--lora", notACheckpoint + ":x"], "is not a scale"),
        ]
        for (model, fragment) in cases {
            let trained = try runPea(train + model), generated = try runPea(generate + model)
            XCTAssertNotEqual(trained.status, 0, "\(model): \(trained.stderr)")
            XCTAssertEqual(trained.status, generated.status, "\(model)")
            XCTAssertTrue(trained.stderr.contains(fragment), "\(model): '\(fragment)' not in \(trained.stderr)")
            // The same message, but for the command's name.
            XCTAssertEqual(trained.stderr.replacingOccurrences(of: " train: ", with: " generate: "), generated.stderr, "\(model)")
            XCTAssertFalse(fileExists(output + "/adapter.safetensors"), "\(model)")
        }
        let help = try runPea(["train", "--help"]).stdout
        for fragment in ["--model DIR|FILE", "single-file", "--config DIR", "--tokenizer DIR", "--prediction-type TYPE", "--vae FILE",
                         "--lora FILE[:SCALE]", "language encoder and the adapter get none"] {
            XCTAssertTrue(help.contains(fragment), "'\(fragment)' not in pea train --help")
        }
    }
}
