#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// `pea train`: the PEA adapter trained by knowledge distillation through a frozen English SD1.x/SD2.x or SDXL
// pipeline (UNet, VAE, CLIP text encoder(s)), from a corpus of images with target-language and English captions.
//
// SDXL (the official train_sdxl_zh.py): the adapter has the SDXL form (stack to the pooled width, `fc` head to
// cross_attention_dim; pooled = mean over tokens); the teacher's states are both English encoders' penultimate
// states concatenated, its text_embeds text_encoder_2's projected pooled vector (of the conditional caption for
// every sample: the pooled vectors are never switched by the dropout); time_ids come from each sample's
// `ImageGeometry` (original size, crop top-left, target size); the VAE encodes in f32 when the UNet is f16
// (`ModelFamily.vaeDType`: SDXL's VAE overflows f16). Aspect-ratio buckets (`TrainingImageShape.buckets`) give
// every batch one bucket.
//
// Each step: a batch of samples → VAE latents (mean and log-variance encoded once and optionally cached; a
// fresh sample of the latent distribution every step, × scaling_factor, as the official
// `latent_dist.sample()`) → noise and uniform timesteps → DDPM noisy latents (the folder's scheduler config) →
// student states (language-specific encoder) and teacher states (English CLIP), with their empty-prompt
// versions for the uncond samples → `KnowledgeDistillation.step` → gradient clipping → AdamW with the
// warmup + polynomial-decay learning rate.
//
// Every random draw of step k comes from generators seeded by (seed, k), and the data stream's position is
// saved, so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
//
// Data parallel (a `ProcessGroup` of N ranks, `pea train` under mpirun or srun): --batch-size B is per rank and
// step k's global batch is the next N·B samples of the data stream, which every rank reads alike; rank r trains on
// samples r·B ..< (r+1)·B of it. Every rank draws the random values below for the whole global batch and keeps its
// rows, so sample i's noise, timestep and dropout depend on (seed, k, i) and the global batch size, never on how
// many ranks share it: N ranks × B and one process × N·B train on the same numbers. Each rank's losses are means
// over its B samples; the ranks' gradients (and losses) are summed in one all-reduce and divided by N — the
// global batch's mean — before clipping and AdamW, so every rank holds the same adapter.
//
// Random draws of step k (k = 1, 2, …: the k-th optimiser step, `step + 1` when it is drawn), in this order:
//   Gaussian (torch's CPU generator, `TorchGenerator`, seeded with `PEATrainer.noiseSeed(seed:step:)` — the same
//   values as `g = torch.Generator("cpu").manual_seed(noise_seed(seed, k))` followed by these `torch.randn` calls):
//     1. ε_latent = torch.randn([B, C, h, w], generator=g)   the latent-distribution samples (C = latent channels,
//                                                           h = w = resolution / the VAE's factor), as
//                                                           `latent_dist.sample()`, row-major over the batch
//     2. noise    = torch.randn([B, C, h, w], generator=g)   the diffusion noise, as `torch.randn_like(latents)`
//     3. with --noise-offset o > 0: noise += o · torch.randn([B, C, 1, 1], generator=g)   (offset noise, as the
//                                                           SDXL script's `noise_offset`)
//   Uniform (SplitMix64 seeded with seed ^ (k · 0x9E3779B97F4A7C15)):
//     4. B timesteps, ⌊u · num_train_timesteps⌋            5. B uncond-dropout draws, u < --uncond-prob
//        (with a --timestep-bias-strategy, the inverse of its weights' distribution at u: `TimestepBias`)

/// The settings of a training run (the `pea train` flags).
public struct TrainingOptions: Sendable {
    public var steps: Int
    public var batchSize: Int
    public var learningRate: Double = 1e-5
    public var minLearningRate: Double = 5e-8
    public var warmupSteps: Int = 100
    public var weightDecay: Float = 0.1
    /// Global gradient-norm clip (nil: none).
    public var maxGradientNorm: Float?
    /// The square side of the training images (and of the validation images).
    public var resolution: Int = 512
    /// Aspect-ratio buckets instead of the square (nil: square images of `resolution`).
    public var buckets: AspectBuckets?
    /// Where a bucket crop lies.
    public var crop: CropMode = .random
    /// Offset noise: `noise += noiseOffset · randn(B, C, 1, 1)` (0: none).
    public var noiseOffset: Float = 0
    public var hybrid = false
    public var uncondProbability: Float = 0.1
    public var featureWeight: Float = 0.1
    public var taskWeight: Float = 1
    public var timestepBias = TimestepBias()
    public var seed: UInt64 = 0
    /// Gradient checkpointing of the student's resnets and transformer blocks (`KnowledgeDistillation`).
    public var gradientCheckpointing = false
    /// Save a checkpoint every this many steps (0: only at the end).
    public var saveEvery: Int = 0

    public init(steps: Int, batchSize: Int) {
        self.steps = steps
        self.batchSize = batchSize
    }

    /// The shape the data brings images to.
    public var imageShape: TrainingImageShape {
        buckets.map { .buckets($0, crop: crop) } ?? .square(resolution)
    }

    public var schedule: PolynomialDecaySchedule {
        PolynomialDecaySchedule(peak: learningRate, end: minLearningRate, warmupSteps: warmupSteps, totalSteps: steps)
    }
}

/// What one step reports to the log.
public struct TrainingStepReport: Sendable {
    public var step: Int
    public var losses: DistillationLosses
    public var learningRate: Float
    public var gradientNorm: Float
    public var seconds: Double
    public var skipped: TrainingSkipCounts
    /// Steps skipped because the f16 gradients overflowed (dynamic loss scaling).
    public var overflowSkipped: Bool
    /// Whether a rank was asked to stop during the step (`trainStep(requestingStop:)`).
    public var stopRequested = false
}

/// The frozen English pipeline the adapter is distilled against.
public struct DistillationTeacher {
    public let unet: UNet2DConditionModel
    public let vae: AutoencoderKL
    /// The folder's English conditioning: one CLIP encoder (SD1.x/SD2.x) or SDXL's two, with its pooled vector.
    public let text: any TextConditioner
    public let noise: DDPMScheduler
    /// The folder's `scheduler/scheduler_config.json` as read (validation samples with the scheduler it names).
    public let schedulerConfig: ConfigFile
    /// SD1, SD2 or SDXL (what `pea generate` detects from the folder; SD1 when the folder does not say).
    public let family: ModelFamily

    /// Whether the UNet is SDXL's (conditioned on a pooled text vector and time_ids too).
    public var isSDXL: Bool { unet.takesTextTime }

    /// The pooled width the SDXL UNet's add-embedding expects (the adapter's stack output), nil for SD1.x/SD2.x.
    public var pooledDim: Int? { unet.config.pooledTextDim }

    /// Loads UNet, VAE, the English text encoder(s) + tokenizer(s) and the scheduler config from an SD1.x/SD2.x or
    /// SDXL pipeline folder, as `pea generate` loads the folder (the VAE in the precision `ModelFamily.vaeDType`
    /// gives it).
    public static func load(folder: String, backend: any ComputeBackend, dtype: DType = .f32) throws -> DistillationTeacher {
        // The official scripts condition the teacher on the last hidden state (SD1.x) or the penultimate ones
        // (SDXL): the folder's conditioning with no clip skip.
        try DistillationTeacher(pipeline: StableDiffusionPipeline.load(folder: folder, backend: backend, clipSkip: 0, dtype: dtype))
    }

    /// The teacher of an English pipeline however it was loaded — a folder, a single-file checkpoint, with LoRAs
    /// merged or a VAE swapped (`pea train` loads it as `pea generate` does): its UNet, VAE and English
    /// conditioning (which must have no clip skip), and DDPM noise from its scheduler config (only the betas and
    /// prediction_type matter to training, so the SD1/SD2 repair of steps_offset and clip_sample changes nothing).
    public init(pipeline: StableDiffusionPipeline) throws {
        guard let unet = pipeline.denoiser as? UNet2DConditionModel else {
            throw PEAError.unsupported("train: the teacher must be a UNet2DConditionModel pipeline (SD1.x/SD2.x or SDXL)")
        }
        self.init(unet: unet, vae: pipeline.vae, text: pipeline.conditioner, noise: try DDPMScheduler(config: pipeline.schedulerConfig),
                  schedulerConfig: pipeline.schedulerConfig, family: pipeline.family)
    }

    init(unet: UNet2DConditionModel, vae: AutoencoderKL, text: any TextConditioner, noise: DDPMScheduler,
         schedulerConfig: ConfigFile, family: ModelFamily) {
        self.unet = unet
        self.vae = vae
        self.text = text
        self.noise = noise
        self.schedulerConfig = schedulerConfig
        self.family = family
    }
}

/// The adapter being trained: its f32 tensors are the master weights, updated by AdamW on their backend.
public final class AdapterOptimization {
    public let backend: any ComputeBackend
    public private(set) var adapter: PEAAdapter
    public var optimizer: AdamW

    public init(adapter: PEAAdapter, weightDecay: Float, backend: any ComputeBackend) throws {
        for (name, tensor) in adapter.namedParameters where tensor.dtype != .f32 {
            throw PEAError.unsupported("train: the adapter is trained in f32, but '\(name)' is \(tensor.dtype)")
        }
        self.adapter = adapter
        self.backend = backend
        optimizer = AdamW(weightDecay: weightDecay)
    }

    /// The master weights on the host, by official name (a download: for checkpoints and tests).
    public func masterWeights() throws -> [String: [Float]] {
        var weights: [String: [Float]] = [:]
        for (name, tensor) in adapter.namedParameters { weights[name] = try backend.downloadFloats(tensor) }
        return weights
    }

    /// Clips the gradients' global norm to `maxNorm` (when given) and takes one AdamW step at `lr`, all on the
    /// backend. Non-finite gradients change nothing and return nil; else the norm before clipping.
    public func apply(_ gradients: [String: Tensor], lr: Double, maxNorm: Float?) throws -> Float? {
        var gradients = gradients
        // A gradient value that is not finite makes the norm non-finite (then nothing is updated).
        let norm = try clipGradientNorm(&gradients, maxNorm: maxNorm ?? .infinity)
        guard norm.isFinite else { return nil }
        var parameters = Dictionary(uniqueKeysWithValues: adapter.namedParameters.map { ($0.name, $0.tensor) })
        try optimizer.update(&parameters, gradients: gradients, lr: lr)
        adapter = try adapter.replacingParameters(parameters)
        return norm
    }

    /// Replaces the master weights (a resumed checkpoint's), by official name.
    public func setMasterWeights(_ weights: [String: HostTensor]) throws {
        var tensors: [String: Tensor] = [:]
        for (name, tensor) in adapter.namedParameters {
            guard let host = weights[name], host.shape == tensor.shape else {
                throw PEAError.shapeMismatch("train: no weight of shape \(tensor.shape) for '\(name)'")
            }
            tensors[name] = try backend.upload(host.converted(to: .f32))
        }
        adapter = try adapter.replacingParameters(tensors)
    }
}

/// A training run's state: the adapter being optimised, the data position and the step.
public final class PEATrainer {
    public let teacher: DistillationTeacher
    public let student: any LanguageEncoder
    public let dataset: TrainingDataset
    public let options: TrainingOptions
    public let backend: any ComputeBackend
    public let latentCache: LatentCache?
    public let training: AdapterOptimization
    /// The ranks training this adapter together (`single`: this process alone).
    public let group: ProcessGroup
    /// The in-place sum over the ranks of a device tensor (NCCL: `CUDABackend.allReduceSumInPlace`); nil: the
    /// gradients go through the host and `group`'s MPI all-reduce.
    public var deviceAllReduce: ((Tensor) throws -> Void)?
    public private(set) var step = 0
    public var adapter: PEAAdapter { training.adapter }
    public var optimizer: AdamW { training.optimizer }
    /// The adapter's weights on the host (a download).
    public func masterWeights() throws -> [String: [Float]] { try training.masterWeights() }
    /// Dynamic loss scale (f16 UNet only; 1 otherwise), as torch's GradScaler: starts at 2¹⁶, halves when the
    /// gradients overflow (that step's update is skipped), doubles after `lossScaleGrowthInterval` steps without overflow.
    public private(set) var lossScale: Float
    private var stepsSinceOverflow = 0
    /// Steps without overflow after which the loss scale doubles.
    static let lossScaleGrowthInterval = 2000

    private var studentUncond: Tensor?
    private var teacherUncond: Tensor?
    /// The latent cache's key for this run's image shape.
    private var cacheKey: String { options.imageShape.cacheKey(seed: options.seed) }

    public init(teacher: DistillationTeacher, student: any LanguageEncoder, adapter: PEAAdapter, dataset: TrainingDataset,
                options: TrainingOptions, backend: any ComputeBackend, latentCache: LatentCache? = nil,
                group: ProcessGroup = .single) throws {
        guard adapter.inputDim == student.hiddenSize else {
            throw PEAError.shapeMismatch("pea train: the adapter reads \(adapter.inputDim)-wide states but the text encoder gives \(student.hiddenSize)")
        }
        let cross = teacher.unet.config.crossAttentionDim[0]
        if let pooled = teacher.pooledDim {
            guard adapter.isSDXL, adapter.outputDim == cross, adapter.pooledDim == pooled else {
                throw PEAError.shapeMismatch("pea train: this SDXL UNet needs the SDXL adapter form: a stack to \(pooled) (the pooled width its add-embedding expects) and an fc head to \(cross) (its cross_attention_dim); the adapter \(adapter.isSDXL ? "has a stack to \(adapter.pooledDim!) and a head to \(adapter.outputDim)" : "is the SD1.x form (no fc head)")")
            }
        } else {
            guard adapter.outputDim == cross, !adapter.isSDXL else {
                throw PEAError.shapeMismatch("pea train: the adapter must be the SD1.x form producing \(cross)-wide states (the UNet's cross_attention_dim), it produces \(adapter.outputDim)\(adapter.isSDXL ? " (SDXL form)" : "")")
            }
        }
        guard dataset.shape == options.imageShape else {
            throw PEAError.usage("pea train: the dataset shapes images as \(dataset.shape), the options as \(options.imageShape)")
        }
        self.teacher = teacher
        self.student = student
        self.dataset = dataset
        self.options = options
        self.backend = backend
        self.latentCache = latentCache
        self.group = group
        training = try AdapterOptimization(adapter: adapter, weightDecay: options.weightDecay, backend: backend)
        lossScale = teacher.unet.dtype == .f16 ? 65536 : 1
        if let latentCache {
            dataset.cachedGeometry = { [key = cacheKey] record in latentCache.load(id: record.id, shape: key)?.geometry }
        }
    }

    // MARK: one step

    /// The seed of the torch CPU generator that draws step `step`'s Gaussian values (1-based step number; see
    /// the draw order at the top of this file). A 32-bit value, since torch's engine only reads a seed's low 32
    /// bits: the high half of the first SplitMix64 output from the state `seed ^ (step · 0xD1B54A32D192ED03)`.
    /// In Python (noise_seed(3, 1) == 1010144496):
    ///
    ///     def noise_seed(seed, step):
    ///         z = ((seed ^ (step * 0xD1B54A32D192ED03 % 2**64)) + 0x9E3779B97F4A7C15) % 2**64
    ///         z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    ///         z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    ///         return (z ^ (z >> 31)) >> 32
    public static func noiseSeed(seed: UInt64, step: Int) -> UInt64 {
        var mixer = SplitMix64(seed: seed ^ (UInt64(step) &* 0xD1B5_4A32_D192_ED03))
        return mixer.next() >> 32
    }

    /// This rank's rows of a step's global batch.
    var share: Range<Int> { group.rank * options.batchSize ..< (group.rank + 1) * options.batchSize }

    /// Draws the next global batch of samples and the random values of step `step + 1` (the draw order at the top
    /// of the file) and builds the distillation batch of this rank's share; returns that share's samples.
    func drawBatch() throws -> (samples: [TrainingSample], batch: DistillationBatch) {
        var random = SplitMix64(seed: options.seed ^ (UInt64(step + 1) &* 0x9E37_79B9_7F4A_7C15))
        var gaussian = TorchGenerator(seed: Self.noiseSeed(seed: options.seed, step: step + 1))
        let samples = try dataset.nextBatch(options.batchSize * group.size)
        return (Array(samples[share]), try makeBatch(samples, share: share, &random, &gaussian))
    }

    /// Draws a batch and takes one optimiser step. `requestingStop`: this rank was asked to stop (a signal); the
    /// report's `stopRequested` says whether any rank was, the same answer on every rank, so all stop after the
    /// same step.
    public func trainStep(requestingStop: Bool = false) throws -> TrainingStepReport {
        let start = monotonicSeconds()
        let (_, batch) = try drawBatch()
        var (losses, gradients) = try KnowledgeDistillation(unet: teacher.unet, featureWeight: options.featureWeight,
                                                             taskWeight: options.taskWeight,
                                                             gradientCheckpointing: options.gradientCheckpointing)
            .step(adapter: adapter, batch: batch, lossScale: lossScale)
        var stopRequested = requestingStop
        if group.size > 1 { try averageAcrossRanks(&gradients, &losses, &stopRequested) }

        let lr = options.schedule.learningRate(afterSteps: step)
        let norm = try training.apply(gradients, lr: lr, maxNorm: options.maxGradientNorm)
        let finite = norm != nil
        if finite && lossScale > 1 {
            stepsSinceOverflow += 1
            if stepsSinceOverflow == Self.lossScaleGrowthInterval { lossScale *= 2; stepsSinceOverflow = 0 }
        } else if !finite && lossScale > 1 {
            lossScale /= 2   // f16 overflow: skip the update, retry the next batch at half the scale
            stepsSinceOverflow = 0
        } else if !finite {
            throw PEAError.backend("training step \(step + 1): the gradients are not finite (loss \(losses.total)); lower the learning rate (--lr, now \(options.learningRate)) or check the data")
        }
        step += 1
        return TrainingStepReport(step: step, losses: losses, learningRate: Float(lr), gradientNorm: norm ?? .nan,
                                  seconds: monotonicSeconds() - start, skipped: dataset.skipped, overflowSkipped: !finite,
                                  stopRequested: stopRequested)
    }

    /// One all-reduce of a fused f32 buffer — every adapter gradient (in `namedParameters` order), the four loss
    /// terms and the stop flag — then the sums divided by the rank count: the global batch's mean gradient and
    /// losses on every rank. A non-finite gradient on any rank makes every rank's sum non-finite, so all skip the
    /// same f16 updates. With `deviceAllReduce` the gradients' buffer is summed on the device and only the five
    /// host values go through MPI.
    func averageAcrossRanks(_ gradients: inout [String: Tensor], _ losses: inout DistillationLosses, _ stop: inout Bool) throws {
        let names = adapter.namedParameters.map(\.name)
        for name in names where gradients[name] == nil {
            throw PEAError.backend("training step \(step + 1): no gradient for the adapter's '\(name)' to all-reduce")
        }
        var buffer: [Float] = []
        if let deviceAllReduce {
            let fused = try backend.concat(names.map { try gradients[$0]!.reshaped([gradients[$0]!.count]) }, dim: 0)
            try deviceAllReduce(fused)
            let parts = try backend.split(backend.scale(fused, by: 1 / Float(group.size)), sizes: names.map { gradients[$0]!.count }, dim: 0)
            for (name, part) in zip(names, parts) { gradients[name] = try part.reshaped(gradients[name]!.shape) }
        } else {
            for name in names { buffer += try backend.downloadFloats(gradients[name]!) }
        }
        buffer += [losses.task, losses.logits, losses.features, losses.total, stop ? 1 : 0]
        try group.allReduceSum(&buffer)
        stop = buffer.removeLast() > 0
        let scale = 1 / Float(group.size)
        for i in buffer.indices { buffer[i] *= scale }
        losses = DistillationLosses(task: buffer[buffer.count - 4], logits: buffer[buffer.count - 3],
                                    features: buffer[buffer.count - 2], total: buffer[buffer.count - 1])
        guard deviceAllReduce == nil else { return }
        var offset = 0
        for name in names {
            let shape = gradients[name]!.shape, count = shape.reduce(1, *)
            gradients[name] = try backend.upload(Array(buffer[offset..<(offset + count)]), shape: shape)
            offset += count
        }
    }

    /// Latents, noise, timesteps and the four state tensors of the `share` rows of a global batch: the Gaussian
    /// draws (latent samples, then noise) from `gaussian`, the uniform ones (timesteps, then dropout) from
    /// `random`, each drawn for the whole global batch (`all`) and cut to the share.
    func makeBatch(_ all: [TrainingSample], share: Range<Int>, _ random: inout SplitMix64,
                   _ gaussian: inout TorchGenerator) throws -> DistillationBatch {
        let samples = Array(all[share]), size = samples.count
        let texts = samples.map(\.text)
        let english = try samples.map { sample -> String in
            if let english = sample.textEN { return english }
            if options.hybrid && sample.languageSpecific == true { return "" }   // masked out of the KD terms
            throw PEAError.invalidFile(path: sample.id, reason: "no English caption (text_en); plain distillation needs one for every record (hybrid training takes language-specific records without one)")
        }
        let latents = try encodeLatents(samples, globalCount: all.count, share: share, &gaussian)
        let sample = Array(latents.shape.dropFirst()), values = sample.reduce(1, *)
        /// The share's rows of a global draw of `count` values per sample.
        func rows(_ draw: [Float], _ count: Int) -> [Float] { Array(draw[(share.lowerBound * count)..<(share.upperBound * count)]) }
        var noiseValues = rows(gaussian.randn([all.count] + sample), values)
        if options.noiseOffset > 0 {
            let channels = latents.shape[1]
            let offsets = rows(gaussian.randn([all.count, channels, 1, 1]), channels), plane = values / channels
            for i in noiseValues.indices { noiseValues[i] += options.noiseOffset * offsets[i / plane] }
        }
        let noise = try backend.upload(noiseValues, shape: latents.shape)
        let timesteps = Array((0..<all.count).map { _ in
            options.timestepBias.timestep(forUniform: random.uniform(), count: teacher.noise.trainTimesteps)
        }[share])
        let uncond = Array((0..<all.count).map { _ in random.uniform() < options.uncondProbability ? Float(1) : 0 }[share])
        let noisy = try teacher.noise.addNoise(original: latents, noise: noise, timesteps: timesteps)
        let target = try teacher.noise.trainingTarget(sample: latents, noise: noise, timesteps: timesteps)

        let silent: (String) -> Void = { _ in }
        let studentStates = try student.encode(texts, warn: silent)
        let teacherConditioning = try teacher.text.encode(english, warn: silent)
        if studentUncond == nil {
            studentUncond = try student.encode([""], warn: silent)
            // The empty caption encoded (never SDXL's zeros), as the official scripts' uncond states.
            teacherUncond = try teacher.text.encode([""], warn: silent).states
        }
        func repeated(_ x: Tensor) throws -> Tensor { size == 1 ? x : try backend.concat(Array(repeating: x, count: size), dim: 0) }
        func f32(_ x: Tensor) throws -> Tensor { x.dtype == .f32 ? x : try backend.cast(x, to: .f32) }
        return DistillationBatch(
            noisyLatents: try f32(noisy), target: try f32(target),
            timesteps: try backend.upload(HostTensor(ids: timesteps, shape: [size])),
            studentStates: try f32(studentStates), studentStatesUncond: try f32(repeated(studentUncond!)),
            teacherStates: try f32(teacherConditioning.states), teacherStatesUncond: try f32(repeated(teacherUncond!)),
            uncondMask: uncond,
            languageSpecific: options.hybrid ? samples.map { $0.languageSpecific == true ? 1 : 0 } : nil,
            timeIds: teacher.isSDXL ? try backend.upload(samples.flatMap(\.geometry.timeIds), shape: [size, 6]) : nil,
            teacherTextEmbeds: try teacherConditioning.pooled.map(f32))
    }

    /// The latent distribution (mean ⊕ log-variance on channels) of each sample, from the cache or the VAE, then
    /// one sample of it × scaling_factor: [B, C, h, w] f32, with ε = the `share` rows of one
    /// `randn([globalCount, C, h, w])` from `gaussian` (`samples` are that share of the global batch).
    func encodeLatents(_ samples: [TrainingSample], globalCount: Int, share: Range<Int>,
                       _ gaussian: inout TorchGenerator) throws -> Tensor {
        let moments = try latentMoments(samples)
        for (sample, moment) in zip(samples, moments) where moment.shape != moments[0].shape {
            throw PEAError.shapeMismatch("pea train: \(sample.id)'s latent is \(moment.shape), the batch's first \(moments[0].shape)")
        }
        let channels = moments[0].shape[0] / 2, plane = moments[0].shape.dropFirst().reduce(1, *)
        let shape = [samples.count, channels] + Array(moments[0].shape.dropFirst())
        let eps = Array(gaussian.randn([globalCount] + shape.dropFirst())[(share.lowerBound * channels * plane)...])
        var values: [Float] = []
        values.reserveCapacity(samples.count * channels * plane)
        let scale = teacher.vae.config.scalingFactor
        for (n, moment) in moments.enumerated() {
            let m = moment.floats()
            for i in 0..<(channels * plane) {
                values.append(latentSample(mean: m[i], logvar: m[channels * plane + i], eps: eps[n * channels * plane + i]) * scale)
            }
        }
        return try backend.upload(values, shape: shape)
    }

    /// The latent distribution (mean ⊕ log-variance on channels, [2C, h, w] f32) of each sample, from the cache or
    /// the VAE (storing it in the cache).
    func latentMoments(_ samples: [TrainingSample]) throws -> [HostTensor] {
        var moments: [HostTensor] = []
        for sample in samples {
            if let cached = latentCache?.load(id: sample.id, shape: cacheKey) {
                moments.append(cached.latent)
                continue
            }
            guard let image = sample.image else {
                throw PEAError.backend("pea train: \(sample.id): no image and no cached latent")
            }
            var pixels = try backend.upload(image).reshaped([1] + image.shape)
            if teacher.vae.dtype != .f32 { pixels = try backend.cast(pixels, to: teacher.vae.dtype) }
            let (mean, logvar) = try teacher.vae.encode(pixels)
            let both = try backend.download(backend.concat([mean, logvar], dim: 1)).converted(to: .f32)
            let host = HostTensor(both.floats(), shape: Array(both.shape.dropFirst()))
            try latentCache?.store(host, geometry: sample.geometry, id: sample.id, shape: cacheKey)
            moments.append(host)
        }
        return moments
    }

    // MARK: checkpoints

    /// Writes a checkpoint as one unit: the folder appears whole or not at all (`writeFolderAtomically`, replacing
    /// one already there), holding the files of `writeCheckpointFiles`.
    public func saveCheckpoint(to folder: String) throws {
        try makeDirectories(parentFolder(folder))
        try writeFolderAtomically(to: folder) { try writeCheckpointFiles(into: $0) }
    }

    /// Writes `folder/adapter.safetensors` (official names, f32; loadable by `pea generate --adapter`) and
    /// `folder/optimizer.safetensors` (AdamW moments as `exp_avg.<name>` / `exp_avg_sq.<name>`; metadata: data
    /// position, loss scale), each atomically, both with the step in their metadata: in a folder that holds more
    /// than a checkpoint (`pea train --output`), a kill between the two writes leaves a pair that `resume` refuses.
    public func writeCheckpointFiles(into folder: String) throws {
        try makeDirectories(folder)
        let shapes = Dictionary(uniqueKeysWithValues: adapter.namedParameters.map { ($0.name, $0.tensor.shape) })
        let names = adapter.namedParameters.map(\.name)
        let weights = try masterWeights()
        try SafeTensorsWriter.write(names.map { (name: $0, tensor: HostTensor(weights[$0]!, shape: shapes[$0]!)) },
                                    metadata: ["pea": "pea train", "step": String(step)], to: joinPath(folder, "adapter.safetensors"))
        let state = optimizer.state
        var moments: [(name: String, tensor: HostTensor)] = []
        for name in names {
            let zeros = [Float](repeating: 0, count: shapes[name]!.reduce(1, *))
            func host(_ moment: Tensor?) throws -> HostTensor {
                HostTensor(try moment.map { try backend.downloadFloats($0) } ?? zeros, shape: shapes[name]!)
            }
            moments.append(("exp_avg.\(name)", try host(state.first[name])))
            moments.append(("exp_avg_sq.\(name)", try host(state.second[name])))
        }
        try SafeTensorsWriter.write(moments, metadata: ["step": String(step), "optimizer_step": String(state.step),
                                                        "data_position": dataset.position.serialized(),
                                                        "loss_scale": String(lossScale),
                                                        "steps_since_overflow": String(stepsSinceOverflow)],
                                    to: joinPath(folder, "optimizer.safetensors"))
    }

    /// Continues from a folder written by `saveCheckpoint`: adapter weights, optimiser moments, step, data
    /// position and loss scale. Every number of the metadata is checked (a step in 0...options.steps, the same
    /// in both files; a finite positive loss scale) before anything changes.
    public func resume(from folder: String) throws {
        let adapterPath = joinPath(folder, "adapter.safetensors"), optimizerPath = joinPath(folder, "optimizer.safetensors")
        let weights = try SafeTensorsFile(path: adapterPath)
        let saved = try SafeTensorsFile(path: optimizerPath)
        let adapterStep = try CheckpointMetadata(weights.metadata, path: adapterPath).count("step", in: 0...options.steps)
        let metadata = CheckpointMetadata(saved.metadata, path: optimizerPath)
        let savedStep = try metadata.count("step", in: 0...options.steps)
        guard adapterStep == savedStep else {
            throw PEAError.invalidFile(path: folder, reason: "adapter.safetensors is from step \(adapterStep) but optimizer.safetensors "
                                       + "from step \(savedStep): the two files are not one checkpoint")
        }
        let optimizerStep = try metadata.count("optimizer_step", in: 0...savedStep)
        let sinceOverflow = try metadata.count("steps_since_overflow", in: 0...(Self.lossScaleGrowthInterval - 1))
        let scale = try metadata.positiveFloat("loss_scale")
        let position = try metadata.parsed("data_position") { try TrainingDataPosition(serialized: $0) }
        var master: [String: HostTensor] = [:], first: [String: Tensor] = [:], second: [String: Tensor] = [:]
        for (name, tensor) in adapter.namedParameters {
            master[name] = try weights.tensor(name, expecting: tensor.shape)
            first[name] = try backend.upload(saved.tensor("exp_avg.\(name)", expecting: tensor.shape).converted(to: .f32))
            second[name] = try backend.upload(saved.tensor("exp_avg_sq.\(name)", expecting: tensor.shape).converted(to: .f32))
        }
        try dataset.restore(position)
        step = savedStep
        lossScale = scale
        stepsSinceOverflow = sinceOverflow
        try training.setMasterWeights(master)
        training.optimizer.restore(step: optimizerStep, first: first, second: second)
    }
}

/// One checkpoint file's metadata, read field by field: a missing or out-of-range value is an error naming the
/// file and the field.
private struct CheckpointMetadata {
    let values: [String: String]
    let path: String

    init(_ values: [String: String], path: String) {
        self.values = values
        self.path = path
    }

    func fail(_ key: String, _ reason: String) -> PEAError {
        .invalidFile(path: path, reason: "metadata '\(key)' \(reason)")
    }

    /// The field parsed by `parse`, whose errors are reported as the field's.
    func parsed<T>(_ key: String, _ parse: (String) throws -> T?) throws -> T {
        guard let text = values[key] else { throw fail(key, "is missing (not a pea train checkpoint)") }
        let value: T?
        do { value = try parse(text) } catch { throw fail(key, "is malformed: \(error)") }
        guard let value else { throw fail(key, "is malformed: '\(text)'") }
        return value
    }

    /// An integer count in `range`.
    func count(_ key: String, in range: ClosedRange<Int>) throws -> Int {
        let value = try parsed(key) { Int($0) }
        guard range.contains(value) else { throw fail(key, "is \(value), outside \(range.lowerBound)...\(range.upperBound)") }
        return value
    }

    /// A finite Float above 0.
    func positiveFloat(_ key: String) throws -> Float {
        let value = try parsed(key) { Float($0) }
        guard value.isFinite, value > 0 else { throw fail(key, "is \(value), not a finite value above 0") }
        return value
    }
}
