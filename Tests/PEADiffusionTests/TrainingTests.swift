import XCTest
@testable import PEADiffusion

/// `pea train` end to end on a tiny synthetic parallel corpus the test writes (random images; Chinese captions
/// made of words with English translations), through the tiny SD1 pipeline and the tiny Chinese-CLIP encoder
/// of the fixtures (random weights): the adapter must learn, and a resumed run must equal an uninterrupted one.
final class TrainingTests: XCTestCase {
    static let words = [("红色", "red"), ("蓝色", "blue"), ("绿色", "green"), ("猫", "cat"), ("狗", "dog"),
                        ("房子", "house"), ("山", "mountain"), ("河", "river"), ("小", "small"), ("大", "big")]
    let pipeline = fixturesDirectory() + "/pipelines/sd1"
    let encoder = fixturesDirectory() + "/pea/zh_encoder"

    /// Writes `count` records (random 40×48 PNGs, two-word captions) and a manifest; returns its path.
    static func writeCorpus(in scratch: ScratchDirectory, count: Int, seed: UInt64) throws -> String {
        var random = SplitMix64(seed: seed)
        var lines: [String] = []
        for i in 0..<count {
            let pixels = (0..<(40 * 48 * 3)).map { _ in UInt8(random.uniform() * 255) }
            try PNGWriter.write(rgb: pixels, width: 48, height: 40, to: scratch.file("image\(i).png"))
            let (a, b) = (Int(random.uniform() * 10) % 10, Int(random.uniform() * 10) % 10)
            lines.append("{\"image\": \"image\(i).png\", \"text\": \"\(words[a].0)\(words[b].0)\", \"text_en\": \"\(words[a].1) \(words[b].1)\"}")
        }
        return scratch.write(lines.joined(separator: "\n") + "\n", to: "corpus.jsonl")
    }

    func makeTrainer(data: String, options: TrainingOptions, backend: any ComputeBackend, cache: LatentCache? = nil) throws -> PEATrainer {
        let teacher = try DistillationTeacher.load(folder: pipeline, backend: backend)
        let student = try LanguageEncoders.load(folder: encoder, backend: backend)
        let adapter = try PEAAdapter.initialized(widths: [student.hiddenSize, 32, 32, teacher.unet.config.crossAttentionDim[0]],
                                                 backend: backend, seed: options.seed)
        let dataset = try TrainingDataset(source: .manifest(path: data), resolution: options.resolution, seed: options.seed)
        return try PEATrainer(teacher: teacher, student: student, adapter: adapter, dataset: dataset, options: options,
                              backend: backend, latentCache: cache)
    }

    /// The KD gap on captions the adapter never saw: the per-element mean of (student ε̂ − teacher ε̂)², over
    /// fixed noisy latents and timesteps, with no uncond dropout.
    func heldOutGap(_ trainer: PEATrainer, captions: [(String, String)], backend: any ComputeBackend) throws -> Float {
        var random = SplitMix64(seed: 99)
        let size = captions.count
        let shape = [size, 4, 4, 4]
        let noisy = try backend.upload(random.normals(shape.reduce(1, *)), shape: shape)
        let timesteps = try backend.upload(HostTensor(ids: (0..<size).map { 100 + 200 * $0 }, shape: [size]))
        let student = try trainer.student.encode(captions.map(\.0), warn: { _ in })
        let teacher = try trainer.teacher.text.encode(captions.map(\.1), warn: { _ in }).states
        let batch = DistillationBatch(noisyLatents: noisy, target: noisy, timesteps: timesteps, studentStates: student,
                                      studentStatesUncond: student, teacherStates: teacher, teacherStatesUncond: teacher,
                                      uncondMask: Array(repeating: 0, count: size))
        return try KnowledgeDistillation(unet: trainer.teacher.unet).step(adapter: trainer.adapter, batch: batch).losses.logits
    }

    func testDistillationLearnsAndGeneralisesToHeldOutCaptions() throws {
        let backend = CPUBackend(threads: 2)
        let scratch = ScratchDirectory("pea-train")
        let data = try Self.writeCorpus(in: scratch, count: 24, seed: 1)
        var options = TrainingOptions(steps: 150, batchSize: 4)
        options.learningRate = 2e-3
        options.warmupSteps = 10
        options.resolution = 32
        options.seed = 3
        // Every record is a parallel pair, so hybrid training reduces to the two KD terms: the task term (ε-MSE
        // against a random UNet) would only add noise to what this test measures.
        options.hybrid = true
        let trainer = try makeTrainer(data: data, options: options, backend: backend)
        // Held-out captions: word pairs in an order the corpus (seed 1) does not contain are not guaranteed, so
        // use three-word captions, a length never trained on.
        let heldOut = [(0, 3, 7), (2, 5, 9), (8, 4, 1), (6, 1, 3)].map { a, b, c in
            (Self.words[a].0 + Self.words[b].0 + Self.words[c].0, "\(Self.words[a].1) \(Self.words[b].1) \(Self.words[c].1)")
        }
        let gapBefore = try heldOutGap(trainer, captions: heldOut, backend: backend)
        var reports: [TrainingStepReport] = []
        while trainer.step < options.steps { reports.append(try trainer.trainStep()) }
        let gapAfter = try heldOutGap(trainer, captions: heldOut, backend: backend)

        // The KD terms over the first and last 20 steps (each step a new random batch, so average them).
        func mean(_ slice: ArraySlice<TrainingStepReport>, _ term: (DistillationLosses) -> Float) -> Float {
            slice.map { term($0.losses) }.reduce(0, +) / Float(slice.count)
        }
        let logits = (mean(reports.prefix(20), \.logits), mean(reports.suffix(20), \.logits))
        let features = (mean(reports.prefix(20), \.features), mean(reports.suffix(20), \.features))
        print("training: logits KD \(logits.0) → \(logits.1), features KD \(features.0) → \(features.1), "
              + "held-out gap \(gapBefore) → \(gapAfter)")
        // Measured with the torch-generator noise (CPU, 2 threads): logits 0.0170 → 0.00085 (20×), features 0.241 →
        // 0.0093 (26×), held-out gap 0.0261 → 0.00066 (39×). The bar is 5× on each.
        XCTAssertLessThan(logits.1, logits.0 / 5, "the output KD loss should fall at least 5×")
        XCTAssertLessThan(features.1, features.0 / 5, "the feature KD loss should fall at least 5×")
        XCTAssertLessThan(gapAfter, gapBefore / 5, "the student should approach the teacher on held-out captions (5×)")
    }

    func testResumedRunEqualsUninterruptedRun() throws {
        let backend = CPUBackend(threads: 2)
        let scratch = ScratchDirectory("pea-train-resume")
        let data = try Self.writeCorpus(in: scratch, count: 7, seed: 2)
        var options = TrainingOptions(steps: 6, batchSize: 3)
        options.learningRate = 1e-3
        options.warmupSteps = 2
        options.resolution = 32
        options.maxGradientNorm = 1

        let whole = try makeTrainer(data: data, options: options, backend: backend)
        while whole.step < 3 { _ = try whole.trainStep() }
        try whole.saveCheckpoint(to: scratch.file("checkpoint-3"))
        while whole.step < 6 { _ = try whole.trainStep() }

        // A fresh process's view: new trainer, new dataset, resumed from the checkpoint.
        let resumed = try makeTrainer(data: data, options: options, backend: backend)
        try resumed.resume(from: scratch.file("checkpoint-3"))
        XCTAssertEqual(resumed.step, 3)
        while resumed.step < 6 { _ = try resumed.trainStep() }
        XCTAssertEqual(try resumed.masterWeights(), try whole.masterWeights(), "resuming must reproduce the uninterrupted run exactly")
        XCTAssertEqual(resumed.optimizer.state.step, 6)
        func host(_ moments: [String: Tensor]) throws -> [String: [Float]] { try moments.mapValues { try backend.downloadFloats($0) } }
        XCTAssertEqual(try host(resumed.optimizer.state.first), try host(whole.optimizer.state.first))
        XCTAssertEqual(try host(resumed.optimizer.state.second), try host(whole.optimizer.state.second))
        XCTAssertEqual(resumed.dataset.position, whole.dataset.position)

        // The saved adapter is a regular adapter file (official names) that generation loads.
        try whole.saveCheckpoint(to: scratch.file("final"))
        let loaded = try PEAAdapter.load(path: scratch.file("final/adapter.safetensors"), backend: backend)
        XCTAssertEqual(loaded.namedParameters.map(\.name), whole.adapter.namedParameters.map(\.name))
        for (name, tensor) in loaded.namedParameters {
            XCTAssertEqual(try backend.downloadFloats(tensor), try whole.masterWeights()[name])
        }
    }

    /// With a latent cache, each image is VAE-encoded once: a second run reads every latent back (decoding no
    /// image) and trains exactly as a run without the cache.
    func testLatentCacheEncodesOnceAndChangesNothing() throws {
        let backend = CPUBackend(threads: 2)
        let scratch = ScratchDirectory("pea-train-cache")
        let data = try Self.writeCorpus(in: scratch, count: 4, seed: 6)
        var options = TrainingOptions(steps: 3, batchSize: 2)
        options.resolution = 32
        options.learningRate = 1e-3
        func run(_ cache: LatentCache?) throws -> PEATrainer {
            let trainer = try makeTrainer(data: data, options: options, backend: backend, cache: cache)
            while trainer.step < options.steps { _ = try trainer.trainStep() }
            return trainer
        }
        let plain = try run(nil)
        let cache = try LatentCache(folder: scratch.file("latents"), namespace: pipeline)
        let filling = try run(cache)
        XCTAssertEqual(listDirectory(scratch.file("latents")).isEmpty, false)
        let trainer = try makeTrainer(data: data, options: options, backend: backend, cache: cache)
        let decoded = trainer.dataset.countingDecodes()
        while trainer.step < options.steps { _ = try trainer.trainStep() }
        XCTAssertEqual(decoded(), 0, "every latent should come from the cache")
        XCTAssertEqual(try filling.masterWeights(), try plain.masterWeights())
        XCTAssertEqual(try trainer.masterWeights(), try plain.masterWeights())
    }

    /// `pea train` as a user runs it: a short run with a corrupt image and a caption-less record in the data
    /// (skipped and counted), a checkpoint, a resume from it, and the trained adapter driving `pea generate`.
    func testTrainCommandTrainsResumesAndFeedsGenerate() throws {
        let scratch = ScratchDirectory("pea-train-cli")
        let data = try Self.writeCorpus(in: scratch, count: 5, seed: 4)
        scratch.write("not a png", to: "corrupt.png")
        let extra = "{\"image\": \"corrupt.png\", \"text\": \"坏\", \"text_en\": \"bad\"}\n{\"image\": \"image0.png\", \"text_en\": \"no caption\"}\n"
        scratch.write((String(decoding: readFileBytes(data)!, as: UTF8.self)) + extra, to: "corpus.jsonl")
        let common = ["train", "--model", pipeline, "--text-encoder", encoder, "--data", data, "--batch-size", "2",
                      "--resolution", "32", "--adapter-hidden", "24", "--lr", "1e-3", "--backend", "cpu", "--threads", "2"]
        let output = scratch.file("run")
        let first = try runPea(common + ["--output", output, "--steps", "4", "--save-every", "2"])
        XCTAssertEqual(first.status, 0, first.stderr)
        XCTAssertEqual(first.stdout.trimmingCharacters(in: .whitespacesAndNewlines), output + "/adapter.safetensors")
        for fragment in ["step 4/4", "task", "logits", "features", "lr", "s/step", "ETA", "undecodableImage", "missingCaption", "saved " + output + "/checkpoint-2"] {
            XCTAssertTrue(first.stderr.contains(fragment), "the log lacks '\(fragment)':\n\(first.stderr)")
        }
        let resumedOutput = scratch.file("resumed")
        let resumed = try runPea(common + ["--output", resumedOutput, "--steps", "4", "--resume", output + "/checkpoint-2"])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        XCTAssertTrue(resumed.stderr.contains("resumed at step 2"), resumed.stderr)
        XCTAssertEqual(readFileBytes(resumedOutput + "/adapter.safetensors"), readFileBytes(output + "/adapter.safetensors"),
                       "resuming from the step-2 checkpoint must give the same adapter file as the uninterrupted run")

        let image = scratch.file("zh.png")
        let generated = try runPea(["generate", "--model", pipeline, "--prompt", "红色的猫", "--text-encoder", encoder,
                                    "--adapter", output + "/adapter.safetensors", "--width", "32", "--height", "32",
                                    "--steps", "2", "--output", image, "--backend", "cpu"])
        XCTAssertEqual(generated.status, 0, generated.stderr)
        XCTAssertTrue(fileExists(image))
    }

    /// A learning rate that blows the adapter up ends the run at the first non-finite gradient, with an error that
    /// names the learning rate (f32: no loss scale to halve).
    func testNonFiniteGradientsNameTheLearningRate() throws {
        let scratch = ScratchDirectory("pea-train-nan")
        let data = try Self.writeCorpus(in: scratch, count: 4, seed: 2)
        var options = TrainingOptions(steps: 4, batchSize: 2)
        options.resolution = 32
        options.learningRate = 1e38
        options.warmupSteps = 0
        let trainer = try makeTrainer(data: data, options: options, backend: CPUBackend(threads: 2))
        assertThrowsError(containing: ["gradients are not finite", "--lr, now 1e+38"]) {
            while trainer.step < options.steps { _ = try trainer.trainStep() }
        }
    }

    /// Bad usage and bad data are clear errors with a non-zero exit, and leave no adapter behind.
    func testTrainCommandErrors() throws {
        let scratch = ScratchDirectory("pea-train-errors")
        let data = try Self.writeCorpus(in: scratch, count: 2, seed: 5)
        let base = ["train", "--model", pipeline, "--text-encoder", encoder, "--output", scratch.file("out"), "--backend", "cpu"]
        let cases: [([String], Int32, [String])] = [
            (base + ["--data", data], 2, ["'--steps' is required"]),
            (base + ["--steps", "2"], 2, ["'--data' is required"]),
            (base + ["--data", data, "--steps", "2", "--resolution", "31"], 2, ["--resolution", "multiple of the VAE's factor 2"]),
            (base + ["--data", data, "--steps", "2", "--learning-rate", "1"], 2, ["unknown option '--learning-rate'"]),
            (base + ["--data", data, "--steps", "2", "--timestep-bias-strategy", "sideways"], 2,
             ["--timestep-bias-strategy", "later", "sideways"]),
            (base + ["--data", data, "--steps", "2", "--task-weight", "-1"], 2, ["--task-weight", "at least 0"]),
            (base + ["--data", data, "--steps", "2", "--feature-weight", "1e300"], 2, ["--feature-weight", "finite"]),
            (base + ["--data", data, "--steps", "2", "--timestep-bias-multiplier", "0"], 2, ["--timestep-bias-multiplier", "above 0"]),
            (base + ["--data", data, "--steps", "2", "--timestep-bias-portion", "2"], 2, ["--timestep-bias-portion", "[0, 1]"]),
            (base + ["--data", scratch.file("nothing.jsonl"), "--steps", "2"], 1, ["nothing.jsonl"]),
            (base + ["--data", data, "--steps", "2", "--resume", scratch.file("no-checkpoint")], 1, ["no-checkpoint"]),
        ]
        try assertPeaFails(cases, leavesNo: scratch.file("out/adapter.safetensors"))
    }
}

extension TrainingDataset {
    /// From now on, counts the records whose image is decoded (no cached geometry); the returned closure reads
    /// the count.
    func countingDecodes() -> () -> Int {
        var decoded = 0
        let lookup = cachedGeometry
        cachedGeometry = { record in
            let geometry = lookup?(record)
            if geometry == nil { decoded += 1 }
            return geometry
        }
        return { decoded }
    }
}
