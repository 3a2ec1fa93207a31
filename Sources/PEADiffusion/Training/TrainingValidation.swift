// Validation while training (`pea train --validation-prompt … --validation-every N`): every N steps and after the
// last one, each validation prompt is drawn with seeds 0..<K through the frozen UNet + VAE + the folder's scheduler,
// conditioned by the language-specific encoder through the *current* adapter — the images
// `pea generate --model DIR --text-encoder ENC --adapter CURRENT --seed S --width R --height R --steps … --guidance …`
// makes — and the images are written as one grid PNG, OUTPUT/validation/step-000500.png.
//
// It reuses the trainer's loaded models and `StableDiffusionPipeline.generate` (one call per prompt and seed, each
// with its own torch CPU generator seeded S, as `pea generate --seed S`), and touches no training random stream:
// a run with validation trains exactly the adapter a run without it does.

/// The settings of validation while training.
public struct ValidationOptions: Sendable {
    /// One grid row each.
    public var prompts: [String]
    /// Validate after every this many steps (and after the last step).
    public var every: Int
    /// Images per prompt, seeds 0..<seeds: one grid column each.
    public var seeds: Int = 2
    /// Denoising steps.
    public var steps: Int = 30
    /// Classifier-free guidance scale (≤ 1: none, as `pea generate`).
    public var guidance: Float = 7.5

    public init(prompts: [String], every: Int) {
        self.prompts = prompts
        self.every = every
    }

    /// Whether a validation follows step `step` (1-based) of a run of `totalSteps`.
    public func isDue(step: Int, totalSteps: Int) -> Bool {
        step > 0 && (step % every == 0 || step == totalSteps)
    }
}

/// Draws the validation images of a training run with its already-loaded models.
public final class TrainingValidator {
    /// White pixels between neighbouring images of the grid (none around it).
    public static let gutter = 2

    public let options: ValidationOptions
    /// Width and height of each image (the training resolution, or a bucket).
    public let width, height: Int
    public let teacher: DistillationTeacher
    public let student: any LanguageEncoder
    public let backend: any ComputeBackend
    /// The scheduler config as `StableDiffusionPipeline.load` repairs it for the teacher's family.
    let samplingConfig: ConfigFile

    /// Square images of side `resolution`.
    public convenience init(teacher: DistillationTeacher, student: any LanguageEncoder, options: ValidationOptions, resolution: Int,
                            backend: any ComputeBackend) throws {
        try self.init(teacher: teacher, student: student, options: options, width: resolution, height: resolution, backend: backend)
    }

    public init(teacher: DistillationTeacher, student: any LanguageEncoder, options: ValidationOptions, width: Int, height: Int,
                backend: any ComputeBackend) throws {
        guard !options.prompts.isEmpty, options.every >= 1, options.seeds >= 1, options.steps >= 1 else {
            throw PEAError.usage("validation needs at least one prompt, every ≥ 1, seeds ≥ 1 and steps ≥ 1")
        }
        let multiple = teacher.family.sizeMultiple(vaeScaleFactor: teacher.vae.downsamplingFactor)   // as `pea generate`
        for side in [width, height] where side <= 0 || side % multiple != 0 {
            throw PEAError.usage("validation: the image size must be a positive multiple of \(multiple), got \(width)x\(height)")
        }
        self.teacher = teacher
        self.student = student
        self.options = options
        self.width = width
        self.height = height
        self.backend = backend
        samplingConfig = teacher.family.schedulerConfig(teacher.schedulerConfig)   // as `pea generate`
        _ = try makeScheduler(name: nil, config: samplingConfig)   // an unsupported scheduler fails now, not at step N
    }

    /// The images for `adapter`: [prompt][seed].
    public func images(adapter: PEAAdapter) throws -> [[RGBImage]] {
        let conditioner = try PEAConditioner(encoder: student, adapter: try inferenceAdapter(adapter))
        return try options.prompts.map { prompt in
            try (0..<options.seeds).map { seed in
                // A fresh scheduler per image: what a fresh `pea generate` process starts from.
                let pipeline = StableDiffusionPipeline(family: teacher.family, denoiser: teacher.unet, vae: teacher.vae,
                                                       conditioner: conditioner,
                                                       scheduler: try makeScheduler(name: nil, config: samplingConfig),
                                                       schedulerConfig: samplingConfig, backend: backend)
                var request = GenerationRequest(prompt: prompt, width: width, height: height)
                request.steps = options.steps
                request.guidance = options.guidance
                request.seed = UInt64(seed)
                request.imagesPerPrompt = 1
                return try pipeline.generate(request)[0]
            }
        }
    }

    /// The images laid out as one image: row r = prompt r, column c = seed c, white gutters.
    public func grid(_ images: [[RGBImage]]) throws -> RGBImage {
        try RGBImage.tiled(images.flatMap { $0 }, columns: options.seeds, gutter: Self.gutter)
    }

    /// `output/validation/step-SSSSSS.png` (step zero-padded to 6 digits).
    public static func gridPath(output: String, step: Int) -> String {
        let digits = String(step)
        let name = "step-" + String(repeating: "0", count: max(0, 6 - digits.count)) + digits + ".png"
        return joinPath(joinPath(output, "validation"), name)
    }

    /// Draws the images for `adapter` after step `step` and writes their grid atomically to
    /// `gridPath(output:step:)`, with the settings in a `pea-validation` text chunk (JSON); returns the path.
    @discardableResult
    public func write(adapter: PEAAdapter, step: Int, output: String) throws -> String {
        let image = try grid(try images(adapter: adapter))
        let path = Self.gridPath(output: output, step: step)
        try makeDirectories(parentFolder(path))
        let settings = JSONValue.object([
            "step": .number(Double(step)), "prompts": .array(options.prompts.map { .string($0) }),
            "seeds": .array((0..<options.seeds).map { .number(Double($0)) }), "steps": .number(Double(options.steps)),
            "guidance": .number(Double(String(options.guidance)) ?? Double(options.guidance)),
            "width": .number(Double(width)), "height": .number(Double(height)),
            "scheduler": .string((try? samplingConfig.string("_class_name")) ?? ""),
        ])
        try PNGWriter.write(rgb: image.pixels, width: image.width, height: image.height,
                            textChunks: [("pea-validation", settings.serialized())], to: path)
        return path
    }

    /// The adapter as `pea generate --adapter` loads it next to this UNet: its parameters in the UNet's dtype.
    private func inferenceAdapter(_ adapter: PEAAdapter) throws -> PEAAdapter {
        let dtype = teacher.unet.dtype
        guard adapter.namedParameters.contains(where: { $0.tensor.dtype != dtype }) else { return adapter }
        var parameters: [String: Tensor] = [:]
        for (name, tensor) in adapter.namedParameters {
            parameters[name] = tensor.dtype == dtype ? tensor : try backend.cast(tensor, to: dtype)
        }
        return try adapter.replacingParameters(parameters)
    }
}
