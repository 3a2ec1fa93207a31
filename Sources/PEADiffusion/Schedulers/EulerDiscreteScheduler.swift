/// diffusers' `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in k-diffusion's σ
/// parameterisation (Karras et al. 2022, algorithm 2 without churn). SDXL's default scheduler.
///
/// Its timesteps are float32 and need not be whole: "linspace" spacing (its default) and Karras sigmas give
/// fractional ones, and the UNet receives them as they are. The model sees x/√(σ²+1).
///
/// Config keys: the shared beta keys, `timestep_spacing` (default "linspace"), `steps_offset`,
/// `prediction_type` (epsilon, v_prediction, sample/original_sample), `interpolation_type` ("linear" only),
/// `use_karras_sigmas` with `sigma_min`/`sigma_max`, `final_sigmas_type` (zero, sigma_min),
/// `rescale_betas_zero_snr`. `use_exponential_sigmas`, `use_beta_sigmas` must be false and `timestep_type`
/// "discrete".
public struct EulerDiscreteScheduler: EulerScheduler {
    public static let className = "EulerDiscreteScheduler"
    public var className: String { Self.className }

    let schedule: TrainingNoiseSchedule
    /// σ of every training timestep (float32) and its log, which Karras timesteps are interpolated in.
    let trainingSigmas: [Float]
    let logSigmas: [Float]
    public let predictionType: PredictionType
    let spacing: TimestepSpacing
    let stepsOffset: Int
    let usesKarrasSigmas: Bool
    let karrasRange: (min: Double?, max: Double?)
    let finalSigmaIsMinimum: Bool

    public private(set) var timesteps: [Double] = []
    /// σ of each timestep, then the final σ (0, or the smallest training σ): timesteps.count + 1 values.
    public private(set) var sigmas: [Float]
    public var timestepDType: DType { .f32 }

    public init(config file: ConfigFile) throws {
        let config = SchedulerConfig(file)
        schedule = try TrainingNoiseSchedule(config, readsZeroSNR: true).withFiniteTerminalSigma()
        trainingSigmas = schedule.sigmas
        logSigmas = logSigmaTable(trainingSigmas)
        let prediction = try config.choice("prediction_type", default: "epsilon",
                                           allowed: ["epsilon", "v_prediction", "sample", "original_sample"])
        predictionType = prediction == "original_sample" ? .sample : PredictionType(rawValue: prediction)!
        spacing = try config.timestepSpacing(default: .linspace)
        stepsOffset = try config.stepsOffset
        _ = try config.choice("interpolation_type", default: "linear", allowed: ["linear"])
        _ = try config.choice("timestep_type", default: "discrete", allowed: ["discrete"])
        try config.requireOff("use_exponential_sigmas")
        try config.requireOff("use_beta_sigmas")
        usesKarrasSigmas = try file.bool("use_karras_sigmas", default: false)
        karrasRange = (try file.optionalDouble("sigma_min", range: .atLeast(0)), try file.optionalDouble("sigma_max", range: .atLeast(0)))
        finalSigmaIsMinimum = try config.choice("final_sigmas_type", default: "zero", allowed: ["zero", "sigma_min"]) == "sigma_min"
        // Before setTimesteps, diffusers' sigmas are every training σ, largest first, then 0.
        sigmas = trainingSigmas.reversed() + [0]
    }

    public mutating func setTimesteps(_ steps: Int) throws {
        try checkStepCount(steps, trainTimesteps: schedule.count, scheduler: className)
        var steps32 = spacing.timesteps(steps, trainTimesteps: schedule.count, stepsOffset: stepsOffset).map { Float($0) }
        // σ at each (possibly fractional) timestep, interpolated linearly in t between the training σ.
        var stepSigmas = steps32.map { numpyInterp(Double($0), trainingSigmas) }
        if usesKarrasSigmas {
            stepSigmas = karrasSigmas(sigmaMin: karrasRange.min ?? stepSigmas[stepSigmas.count - 1],
                                      sigmaMax: karrasRange.max ?? stepSigmas[0], count: steps)
            steps32 = stepSigmas.map { Float(timestep(forSigma: $0, logSigmas: logSigmas)) }
        }
        let last: Float = finalSigmaIsMinimum ? trainingSigmas[0] : 0
        sigmas = stepSigmas.map { Float($0) } + [last]
        timesteps = steps32.map { Double($0) }
    }

    public mutating func step(modelOutput: Tensor, stepIndex: Int, sample: Tensor, noise: () throws -> Tensor) throws -> Tensor {
        _ = try checkedTimestep(stepIndex)
        let sigma = sigmas[stepIndex], next = sigmas[stepIndex + 1]
        let predictedOriginal = try eulerPredictedOriginal(modelOutput: modelOutput, sample: sample, sigma: Double(sigma),
                                                           predictionType: predictionType)
        // dx/dσ = (x − x̂₀)/σ, one Euler step from σ to the next σ (dt in float32, as diffusers has it).
        let derivative = try divided(sample.backend.sub(sample, predictedOriginal), by: sigma)
        return try linearCombination([(1, sample), (Double(next - sigma), derivative)])
    }
}

/// What the two Euler schedulers share: σ per step (plus a final one), and the initial noise and input scaling
/// that follow from it.
protocol EulerScheduler: Scheduler {
    var sigmas: [Float] { get }
    var spacing: TimestepSpacing { get }
}

extension EulerScheduler {
    /// The largest σ, or √(σ²+1) for "leading" spacing (whose first timestep is below T − 1), as diffusers has it.
    public var initNoiseSigma: Float {
        let largest = sigmas.max() ?? 0
        return spacing == .leading ? (largest * largest + 1).squareRoot() : largest
    }

    public func scaleModelInput(_ sample: Tensor, stepIndex: Int) throws -> Tensor {
        _ = try checkedTimestep(stepIndex)
        return try eulerScaledInput(sample, sigma: sigmas[stepIndex])
    }

    /// x₀ + ε·σ at the begin index's σ (not `initNoiseSigma`: no √(σ²+1) for "leading" spacing), as diffusers'.
    public func addNoise(_ original: Tensor, noise: Tensor, stepIndex: Int) throws -> Tensor {
        _ = try checkedTimestep(stepIndex)
        return try linearCombination([(1, original), (Double(sigmas[stepIndex]), noise)])
    }
}

/// x/√(σ²+1), the input scaling of the Euler schedulers (the divisor in float32, as diffusers computes it).
func eulerScaledInput(_ sample: Tensor, sigma: Float) throws -> Tensor {
    try divided(sample, by: (sigma * sigma + 1).squareRoot())
}

/// x̂₀ from the model's output at noise level σ in the Euler schedulers (on the unscaled sample x):
/// ε: x − σ·ε; v: −σ/√(σ²+1)·v + x/(σ²+1); sample: the output itself.
func eulerPredictedOriginal(modelOutput: Tensor, sample: Tensor, sigma: Double, predictionType: PredictionType) throws -> Tensor {
    switch predictionType {
    case .epsilon:
        return try linearCombination([(1, sample), (-sigma, modelOutput)])
    case .vPrediction:
        return try linearCombination([(-sigma / (sigma * sigma + 1).squareRoot(), modelOutput), (1 / (sigma * sigma + 1), sample)])
    case .sample:
        return modelOutput
    }
}
