import XCTest
@testable import PEADiffusion

/// The trainer's Gaussian draws (torch's CPU generator, in the documented order), validation while training
/// (grids, and no effect on the adapter) and `metrics.jsonl`, on the tiny fixtures as TrainingTests.
final class TrainingValidationTests: XCTestCase {
    let pipeline = fixturesDirectory() + "/pipelines/sd1"
    let encoder = fixturesDirectory() + "/pea/zh_encoder"

    func makeTrainer(data: String, options: TrainingOptions, backend: any ComputeBackend) throws -> PEATrainer {
        let teacher = try DistillationTeacher.load(folder: pipeline, backend: backend)
        let student = try LanguageEncoders.load(folder: encoder, backend: backend)
        let adapter = try PEAAdapter.initialized(widths: [student.hiddenSize, 32, 32, teacher.unet.config.crossAttentionDim[0]],
                                                 backend: backend, seed: options.seed)
        let dataset = try TrainingDataset(source: .manifest(path: data), resolution: options.resolution, seed: options.seed)
        return try PEATrainer(teacher: teacher, student: student, adapter: adapter, dataset: dataset, options: options, backend: backend)
    }

    func smallOptions(steps: Int) -> TrainingOptions {
        var options = TrainingOptions(steps: steps, batchSize: 2)
        options.learningRate = 1e-3
        options.warmupSteps = 1
        options.resolution = 32
        options.seed = 3
        return options
    }

    // MARK: noise

    /// The documented seed function, pinned to the values of its Python form in PEATrainer.swift.
    func testNoiseSeedMatchesTheDocumentedFormula() {
        XCTAssertEqual(PEATrainer.noiseSeed(seed: 3, step: 1), 1_010_144_496)
        XCTAssertEqual(PEATrainer.noiseSeed(seed: 0, step: 1), 755_968_199)
        XCTAssertEqual(PEATrainer.noiseSeed(seed: 12345, step: 7), 396_525_998)
        XCTAssertLessThan(PEATrainer.noiseSeed(seed: .max, step: 99), 1 << 32)
    }

    /// Step k's batch: latent samples = the first `randn([B, C, h, w])` of
    /// `TorchGenerator(seed: noiseSeed(seed, k))`, the noise the second; timesteps from the uniform stream.
    func testBatchNoiseIsTorchRandnInTheDocumentedOrder() throws {
        let backend = CPUBackend(threads: 2)
        let scratch = ScratchDirectory("pea-train-noise")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 4, seed: 8)
        let options = smallOptions(steps: 2)
        for k in 1...2 {
            let probe = try makeTrainer(data: data, options: options, backend: backend)
            if k == 2 { _ = try probe.trainStep() }   // step 1 trained: the next draw is step 2's
            let (samples, batch) = try probe.drawBatch()
            let shape = batch.noisyLatents.shape
            XCTAssertEqual(shape.count, 4)
            XCTAssertEqual(shape[0], 2)
            var generator = TorchGenerator(seed: PEATrainer.noiseSeed(seed: options.seed, step: k))
            let eps = generator.randn(shape)
            let noise = generator.randn(shape)
            // ε-prediction: the regression target is the noise itself.
            XCTAssertEqual(try backend.downloadFloats(batch.target), noise, "step \(k): the noise is the second randn")

            // The latents: (mean + exp(½·clamp(logvar)) · ε) · scaling_factor with ε the first randn.
            let moments = try probe.latentMoments(samples)
            let per = shape.dropFirst().reduce(1, *)
            var latents: [Float] = []
            for (n, moment) in moments.enumerated() {
                let m = moment.floats()
                for i in 0..<per {
                    let logvar = min(max(m[per + i], -30), 20)
                    latents.append((m[i] + expf(0.5 * logvar) * eps[n * per + i]) * probe.teacher.vae.config.scalingFactor)
                }
            }
            var random = SplitMix64(seed: options.seed ^ (UInt64(k) &* 0x9E37_79B9_7F4A_7C15))
            let timesteps = (0..<2).map { _ in min(Int(random.uniform() * 1000), 999) }
            let expected = try probe.teacher.noise.addNoise(original: backend.upload(latents, shape: shape),
                                                            noise: backend.upload(noise, shape: shape), timesteps: timesteps)
            XCTAssertEqual(try backend.downloadFloats(batch.noisyLatents), try backend.downloadFloats(expected),
                           "step \(k): the latent samples are the first randn, the timesteps the uniform stream's")
        }
    }

    /// A million of the trainer's normals look Gaussian: mean 0, variance 1, and the tails beyond 3.5σ and 4σ hold
    /// the normal distribution's share — which the sum-of-four-uniforms approximation (bounded at ±3.46σ) lacks.
    func testTrainingNoiseIsGaussian() {
        let count = 1_000_000
        var generator = TorchGenerator(seed: PEATrainer.noiseSeed(seed: 0, step: 1))
        func statistics(_ values: [Float]) -> (mean: Double, variance: Double, beyond35: Int, beyond4: Int) {
            var sum = 0.0, squares = 0.0, beyond35 = 0, beyond4 = 0
            for value in values {
                let x = Double(value)
                sum += x
                squares += x * x
                if abs(x) > 3.5 { beyond35 += 1 }
                if abs(x) > 4 { beyond4 += 1 }
            }
            let mean = sum / Double(values.count)
            return (mean, squares / Double(values.count) - mean * mean, beyond35, beyond4)
        }
        let torch = statistics(generator.randn([count]))
        // Expected: P(|Z| > 3.5) = 4.6525e-4 → 465 ± 22; P(|Z| > 4) = 6.334e-5 → 63 ± 8 (binomial σ).
        print("randn: mean \(torch.mean), variance \(torch.variance), beyond 3.5σ \(torch.beyond35), beyond 4σ \(torch.beyond4)")
        XCTAssertEqual(torch.mean, 0, accuracy: 0.005)       // 5 standard errors
        XCTAssertEqual(torch.variance, 1, accuracy: 0.007)   // ≈ 5 standard errors (√(2/n) = 0.0014)
        XCTAssertTrue((465 - 110)...(465 + 110) ~= torch.beyond35, "beyond 3.5σ: \(torch.beyond35), expected ≈ 465")
        XCTAssertTrue((63 - 40)...(63 + 40) ~= torch.beyond4, "beyond 4σ: \(torch.beyond4), expected ≈ 63")

        var uniforms = SplitMix64(seed: 0)
        let old = statistics(uniforms.normals(count))
        XCTAssertEqual(old.beyond35, 0, "SplitMix64.normals is bounded at ±3.46σ: the check above would reject it")
    }

    // MARK: validation

    /// Validation every 2 steps of 3 writes grids at steps 2 and 3 of (rows × 32 + gutters) × (cols × 32 + gutters)
    /// pixels whose cells are `pea generate`'s images for the adapter of that step, and trains the same adapter as a
    /// run without validation.
    func testValidationWritesGridsAndLeavesTrainingUnchanged() throws {
        let backend = CPUBackend(threads: 2)
        let scratch = ScratchDirectory("pea-train-validation")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 5, seed: 9)
        let options = smallOptions(steps: 3)

        let plain = try makeTrainer(data: data, options: options, backend: backend)
        while plain.step < options.steps { _ = try plain.trainStep() }

        let trainer = try makeTrainer(data: data, options: options, backend: backend)
        var validation = ValidationOptions(prompts: ["红色的猫", "蓝色的房子", "山"], every: 2)
        validation.seeds = 2
        validation.steps = 3
        validation.guidance = 5
        let validator = try TrainingValidator(teacher: trainer.teacher, student: trainer.student, options: validation,
                                              resolution: options.resolution, backend: backend)
        let output = scratch.file("run")
        var written: [Int: String] = [:]
        while trainer.step < options.steps {
            let report = try trainer.trainStep()
            if validation.isDue(step: report.step, totalSteps: options.steps) {
                written[report.step] = try validator.write(adapter: trainer.adapter, step: report.step, output: output)
            }
        }
        XCTAssertEqual(try trainer.masterWeights(), try plain.masterWeights(), "validation must not change the training")
        XCTAssertEqual(written, [2: output + "/validation/step-000002.png", 3: output + "/validation/step-000003.png"])
        XCTAssertEqual(listDirectory(output + "/validation"), ["step-000002.png", "step-000003.png"])

        let grid = try PNGReader.read(path: written[3]!)
        XCTAssertEqual(grid.width, 2 * 32 + 2)
        XCTAssertEqual(grid.height, 3 * 32 + 2 * 2)
        XCTAssertEqual(grid.channels, 3)
        XCTAssertNotNil(grid.text("pea-validation"))

        // Cell (prompt 2, seed 1) is what `pea generate` makes from the saved adapter, loaded afresh from disk.
        try trainer.saveCheckpoint(to: scratch.file("final"))
        let conditioner = try PEAConditioner(encoder: LanguageEncoders.load(folder: encoder, backend: backend),
                                             adapter: PEAAdapter.load(path: scratch.file("final/adapter.safetensors"), backend: backend))
        let reference = try StableDiffusionPipeline.load(folder: pipeline, backend: backend, conditioner: conditioner)
        var request = GenerationRequest(prompt: "山", width: 32, height: 32)
        request.steps = 3
        request.guidance = 5
        request.seed = 1
        let image = try reference.generate(request)[0]
        let (x0, y0) = (32 + 2, 2 * (32 + 2))
        for y in 0..<32 {
            let row = Array(grid.pixels[((y0 + y) * grid.width + x0) * 3..<((y0 + y) * grid.width + x0 + 32) * 3])
            XCTAssertEqual(row, Array(image.pixels[y * 32 * 3..<(y + 1) * 32 * 3]), "row \(y) of cell (2, 1)")
        }
        // The gutters are white.
        for y in 0..<grid.height { XCTAssertEqual(Array(grid.pixels[(y * grid.width + 32) * 3..<(y * grid.width + 34) * 3]), [UInt8](repeating: 255, count: 6)) }
        for x in 0..<grid.width { XCTAssertEqual(grid.pixels[(32 * grid.width + x) * 3], 255) }
    }

    // MARK: metrics.jsonl

    func testMetricsLogKeepsOnlyLinesUpToTheResumedStep() throws {
        let scratch = ScratchDirectory("pea-metrics")
        let path = scratch.file("out/metrics.jsonl")
        func report(_ step: Int, norm: Float = 0.5) -> TrainingStepReport {
            TrainingStepReport(step: step, losses: DistillationLosses(task: 0.25, logits: 0.125, features: 1e-5, total: 0.375),
                               learningRate: 1e-5, gradientNorm: norm, seconds: 0.5, skipped: TrainingSkipCounts(), overflowSkipped: false)
        }
        var log: TrainingMetricsLog? = try TrainingMetricsLog(path: path, startingAfter: 0)   // creates out/
        for step in 1...5 { try log!.append(report(step, norm: step == 4 ? .nan : 0.5), validation: step == 5 ? "v.png" : nil) }
        let lines = String(decoding: readFileBytes(path)!, as: UTF8.self).split(separator: "\n")
        XCTAssertEqual(lines.count, 5)
        XCTAssertEqual(String(lines[0]), #"{"grad_norm":0.5,"loss":0.375,"loss_features":1e-05,"loss_logits":0.125,"loss_task":0.25,"lr":1e-05,"seconds":0.5,"step":1}"#)
        XCTAssertTrue(lines[3].contains(#""grad_norm":null"#), String(lines[3]))
        XCTAssertTrue(lines[4].hasSuffix(#""step":5,"validation":"v.png"}"#), String(lines[4]))
        log = nil
        // A torn line from a crash, then a resume at step 2.
        writeFileBytes(readFileBytes(path)! + Array(#"{"step":6,"lo"#.utf8), to: path)
        log = try TrainingMetricsLog(path: path, startingAfter: 2)
        try log!.append(report(3))
        let resumed = String(decoding: readFileBytes(path)!, as: UTF8.self).split(separator: "\n")
        XCTAssertEqual(resumed.map { try? JSONValue.parse(String($0)).objectValue?["step"]?.intValue }, [1, 2, 3])
        XCTAssertEqual(String(resumed[1]), String(lines[1]), "kept lines are kept byte for byte")
        // A fresh run starts the file afresh.
        log = try TrainingMetricsLog(path: path, startingAfter: 0)
        XCTAssertEqual(readFileBytes(path), [])
    }

    /// `pea train` with validation: metrics.jsonl has one line per step with finite values, grids at the due
    /// steps (paths on stderr and in the metrics), and a resume into the same output truncates the metrics.
    func testTrainCommandWritesMetricsAndValidationGrids() throws {
        let scratch = ScratchDirectory("pea-train-metrics-cli")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 5, seed: 4)
        let output = scratch.file("run")
        let common = ["train", "--model", pipeline, "--text-encoder", encoder, "--data", data, "--batch-size", "2",
                      "--resolution", "32", "--adapter-hidden", "24", "--lr", "1e-3", "--backend", "cpu", "--threads", "2",
                      "--output", output, "--steps", "4",
                      "--validation-prompt", "红色的猫", "--validation-prompt", "绿色的山", "--validation-every", "3",
                      "--validation-seeds", "3", "--validation-steps", "2"]
        let first = try runPea(common + ["--save-every", "2"])
        XCTAssertEqual(first.status, 0, first.stderr)
        let grids = [3: output + "/validation/step-000003.png", 4: output + "/validation/step-000004.png"]
        for (_, path) in grids {
            XCTAssertTrue(first.stderr.contains(path), "stderr lacks \(path):\n\(first.stderr)")
            let image = try PNGReader.read(path: path)
            XCTAssertEqual([image.width, image.height], [3 * 32 + 2 * 2, 2 * 32 + 2])
        }
        XCTAssertEqual(listDirectory(output + "/validation"), ["step-000003.png", "step-000004.png"])

        func metrics() throws -> [[String: JSONValue]] {
            try String(decoding: readFileBytes(output + "/metrics.jsonl")!, as: UTF8.self).split(separator: "\n")
                .map { try XCTUnwrap(JSONValue.parse(String($0)).objectValue) }
        }
        let lines = try metrics()
        XCTAssertEqual(lines.map { $0["step"]?.intValue }, [1, 2, 3, 4])
        let keys = ["step", "loss", "loss_task", "loss_logits", "loss_features", "lr", "grad_norm", "seconds"]
        for line in lines {
            for key in keys {
                let value = try XCTUnwrap(line[key]?.doubleValue, "\(key) in \(line)")
                XCTAssertTrue(value.isFinite, "\(key) in \(line)")
            }
            let step = line["step"]!.intValue!
            XCTAssertEqual(Set(line.keys), Set(keys + (grids[step] != nil ? ["validation"] : [])))
            XCTAssertEqual(line["validation"]?.stringValue, grids[step])
        }

        // Resume into the same output from the step-2 checkpoint: lines 3 and 4 are replaced, not appended to.
        let resumed = try runPea(common + ["--resume", output + "/checkpoint-2"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        let after = try metrics()
        XCTAssertEqual(after.map { $0["step"]?.intValue }, [1, 2, 3, 4])
        XCTAssertEqual(after[0], lines[0])
        XCTAssertEqual(after[3]["loss"], lines[3]["loss"], "the resumed run repeats the uninterrupted one")
    }

    /// Bad validation flags are usage errors (exit 2) before anything is loaded or written.
    func testValidationUsageErrors() throws {
        let scratch = ScratchDirectory("pea-train-validation-errors")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 2, seed: 5)
        let out = scratch.file("out")
        let base = ["train", "--model", pipeline, "--text-encoder", encoder, "--output", out, "--backend", "cpu",
                    "--data", data, "--steps", "2"]
        let prompt = ["--validation-prompt", "猫"]
        let cases: [([String], [String])] = [
            (prompt, ["--validation-prompt needs --validation-every"]),
            (["--validation-every", "2"], ["--validation-every needs at least one --validation-prompt"]),
            (["--validation-seeds", "2"], ["--validation-seeds needs at least one --validation-prompt"]),
            (prompt + ["--validation-every", "0"], ["--validation-every", "must be in 1..."]),
            (prompt + ["--validation-every", "-3"], ["--validation-every", "must be in 1..."]),
            (prompt + ["--validation-every", "x"], ["--validation-every", "expects an integer"]),
            (prompt + ["--validation-every", "1", "--validation-seeds", "0"], ["--validation-seeds", "must be in 1..."]),
            (prompt + ["--validation-every", "1", "--validation-steps", "0"], ["--validation-steps", "must be in 1..."]),
            (prompt + ["--validation-every", "1", "--validation-guidance", "nan"], ["--validation-guidance", "expects a number"]),
            (prompt + ["--validation-every", "1", "--validation-every", "2"], ["'--validation-every' given more than once"]),
        ]
        for (extra, fragments) in cases {
            let result = try runPea(base + extra)
            XCTAssertEqual(result.status, 2, "\(extra): \(result.stderr)")
            for fragment in fragments {
                XCTAssertTrue(result.stderr.contains(fragment), "\(extra): '\(fragment)' not in \(result.stderr)")
            }
            XCTAssertFalse(fileExists(out), "\(extra): nothing may be written")
        }
        let help = try runPea(["train", "--help"])
        for flag in ["--validation-prompt", "--validation-every", "--validation-seeds", "--validation-steps", "--validation-guidance",
                     "metrics.jsonl", "validation/step-000500.png"] {
            XCTAssertTrue(help.stdout.contains(flag), "--help lacks \(flag)")
        }
    }
}
