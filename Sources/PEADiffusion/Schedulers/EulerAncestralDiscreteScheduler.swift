/// diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to σ_down followed by fresh noise of
/// standard deviation σ_up, with σ_down² + σ_up² = σ_next² (k-diffusion's `sample_euler_ancestral`, η = 1).
///
/// It draws noise at every step, the last one included (where σ_up = 0 and the noise is multiplied by zero),
/// so a pipeline's generator advances exactly as diffusers' does.
///
/// Config keys: the shared beta keys, `timestep_spacing` (default "linspace"), `steps_offset`,
/// `prediction_type` (epsilon, v_prediction; diffusers does not implement sample), `rescale_betas_zero_snr`.
public struct EulerAncestralDiscreteScheduler: EulerScheduler {
    public static let className = "EulerAncestralDiscreteScheduler"
    public var className: String { Self.className }

    let schedule: TrainingNoiseSchedule
    let trainingSigmas: [Float]
    public let predictionType: PredictionType
    let spacing: TimestepSpacing
    let stepsOffset: Int

    public private(set) var timesteps: [Double] = []
    /// σ of each timestep, then 0.
    public private(set) var sigmas: [Float]
    public var timestepDType: DType { .f32 }

    public init(config file: ConfigFile) throws {
        let config = SchedulerConfig(file)
        schedule = try TrainingNoiseSchedule(config, readsZeroSNR: true).withFiniteTerminalSigma()
        trainingSigmas = schedule.sigmas
        predictionType = PredictionType(rawValue: try config.choice("prediction_type", default: "epsilon",
                                                                    allowed: ["epsilon", "v_prediction"]))!
        spacing = try config.timestepSpacing(default: .linspace)
        stepsOffset = try config.stepsOffset
        sigmas = trainingSigmas.reversed() + [0]
    }

    public mutating func setTimesteps(_ steps: Int) throws {
        try checkStepCount(steps, trainTimesteps: schedule.count, scheduler: className)
        let steps32 = spacing.timesteps(steps, trainTimesteps: schedule.count, stepsOffset: stepsOffset).map { Float($0) }
        sigmas = steps32.map { Float(numpyInterp(Double($0), trainingSigmas)) } + [0]
        timesteps = steps32.map { Double($0) }
    }

    public mutating func step(modelOutput: Tensor, stepIndex: Int, sample: Tensor, noise: () throws -> Tensor) throws -> Tensor {
        _ = try checkedTimestep(stepIndex)
        let sigma = sigmas[stepIndex], next = sigmas[stepIndex + 1]
        let predictedOriginal = try eulerPredictedOriginal(modelOutput: modelOutput, sample: sample, sigma: Double(sigma),
                                                           predictionType: predictionType)
        // σ_up and σ_down in float32 as diffusers computes them (σ_down² is a float32 difference that cancels).
        let sigmaUp = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).squareRoot()
        let sigmaDown = (next * next - sigmaUp * sigmaUp).squareRoot()
        let derivative = try divided(sample.backend.sub(sample, predictedOriginal), by: sigma)
        let deterministic = try linearCombination([(1, sample), (Double(sigmaDown - sigma), derivative)])
        return try linearCombination([(1, deterministic), (Double(sigmaUp), try noise())])
    }
}
