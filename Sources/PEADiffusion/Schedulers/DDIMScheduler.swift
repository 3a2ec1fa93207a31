/// diffusers' `DDIMScheduler` (Song et al., "Denoising Diffusion Implicit Models"): the deterministic
/// sampler (η = 0) or, with `eta` > 0, the stochastic one, which draws noise at every step.
///
/// Config keys: the shared beta keys, `timestep_spacing` (default "leading"), `steps_offset`,
/// `prediction_type` (epsilon, v_prediction, sample), `clip_sample` (default true) and `clip_sample_range`,
/// `set_alpha_to_one` (default true), `rescale_betas_zero_snr`. `thresholding` must be false.
public struct DDIMScheduler: Scheduler {
    public static let className = "DDIMScheduler"
    public var className: String { Self.className }

    let schedule: TrainingNoiseSchedule
    /// ᾱ of the step after the last: 1, or ᾱ_0 when `set_alpha_to_one` is false (SD's configs).
    let finalAlphaCumprod: Float
    public let predictionType: PredictionType
    /// The range x̂₀ is clamped to, or nil when `clip_sample` is false.
    let clipRange: Float?
    let spacing: TimestepSpacing
    let stepsOffset: Int

    /// The weight of the fresh noise (DDIM's η; diffusers' `step(eta=)`, 0 in its pipelines by default).
    public var eta: Double = 0

    public private(set) var timesteps: [Double] = []
    public var timestepDType: DType { .i64 }
    public var initNoiseSigma: Float { 1 }
    /// N as given to setTimesteps; DDIM's previous timestep is always t − ⌊T/N⌋, whatever the spacing.
    private var inferenceSteps = 0

    public init(config file: ConfigFile) throws {
        let config = SchedulerConfig(file)
        schedule = try TrainingNoiseSchedule(config, readsZeroSNR: true)
        let setAlphaToOne = try file.bool("set_alpha_to_one", default: true)
        finalAlphaCumprod = setAlphaToOne ? 1 : schedule.alphasCumprod[0]
        predictionType = PredictionType(rawValue: try config.choice("prediction_type", default: "epsilon",
                                                                    allowed: ["epsilon", "v_prediction", "sample"]))!
        try config.requireOff("thresholding")
        clipRange = try file.bool("clip_sample", default: true) ? try file.float("clip_sample_range", default: 1, range: .positive) : nil
        spacing = try config.timestepSpacing(default: .leading)
        stepsOffset = try config.stepsOffset
    }

    public mutating func setTimesteps(_ steps: Int) throws {
        try checkStepCount(steps, trainTimesteps: schedule.count, scheduler: className)
        inferenceSteps = steps
        timesteps = spacing.timesteps(steps, trainTimesteps: schedule.count, stepsOffset: stepsOffset).map(numpyRound)
    }

    public func scaleModelInput(_ sample: Tensor, stepIndex: Int) throws -> Tensor { sample }

    public func addNoise(_ original: Tensor, noise: Tensor, stepIndex: Int) throws -> Tensor {
        try schedule.addNoise(original, noise: noise, timestep: Int(checkedTimestep(stepIndex)), scheduler: className)
    }

    public mutating func step(modelOutput: Tensor, stepIndex: Int, sample: Tensor, noise: () throws -> Tensor) throws -> Tensor {
        let t = Int(try checkedTimestep(stepIndex))
        guard t < schedule.count else {
            throw PEAError.usage("\(className): timestep \(t) is beyond num_train_timesteps \(schedule.count) (steps_offset too large?)")
        }
        let previous = t - schedule.count / inferenceSteps
        let alphaProduct = Double(schedule.alphasCumprod[t])
        let alphaProductPrevious = Double(schedule.alphaCumprod(previous, final: finalAlphaCumprod))
        let betaProduct = 1 - alphaProduct

        // The model's prediction as both x̂₀ and ε̂ (formula 12 of the paper needs both).
        var predictedOriginal: Tensor, predictedEpsilon: Tensor
        switch predictionType {
        case .epsilon:
            predictedOriginal = try linearCombination([(1 / alphaProduct.squareRoot(), sample),
                                                       (-betaProduct.squareRoot() / alphaProduct.squareRoot(), modelOutput)])
            predictedEpsilon = modelOutput
        case .sample:
            predictedOriginal = modelOutput
            predictedEpsilon = try linearCombination([(1 / betaProduct.squareRoot(), sample),
                                                      (-alphaProduct.squareRoot() / betaProduct.squareRoot(), modelOutput)])
        case .vPrediction:
            predictedOriginal = try linearCombination([(alphaProduct.squareRoot(), sample), (-betaProduct.squareRoot(), modelOutput)])
            predictedEpsilon = try linearCombination([(alphaProduct.squareRoot(), modelOutput), (betaProduct.squareRoot(), sample)])
        }
        if let clipRange {
            predictedOriginal = try clamped(predictedOriginal, to: clipRange)
        }

        // σ_t of formula 16, scaled by η.
        let variance = ((1 - alphaProductPrevious) / betaProduct) * (1 - alphaProduct / alphaProductPrevious)
        let standardDeviation = eta * variance.squareRoot()
        // x_{t−1} = √ᾱ_{t−1}·x̂₀ + √(1 − ᾱ_{t−1} − σ_t²)·ε̂ (+ σ_t·z)
        var previousSample = try linearCombination([
            (alphaProductPrevious.squareRoot(), predictedOriginal),
            ((1 - alphaProductPrevious - standardDeviation * standardDeviation).squareRoot(), predictedEpsilon),
        ])
        if eta > 0 {
            previousSample = try linearCombination([(1, previousSample), (standardDeviation, try noise())])
        }
        return previousSample
    }

    /// x clamped to [−range, range]. The backend has no clamp op, so this one goes through the host: a latent
    /// is small, and only configs with `clip_sample` true (not SD's) take this path.
    private func clamped(_ x: Tensor, to range: Float) throws -> Tensor {
        let backend = x.backend
        let values = try backend.downloadFloats(x).map { min(max($0, -range), range) }
        return try backend.upload(values, shape: x.shape)
    }
}
