/// diffusers' `PNDMScheduler` (Liu et al., "Pseudo Numerical Methods for Diffusion Models"): linear
/// multistep (PLMS) steps on ε, warmed up either by Runge-Kutta (PRK) steps or, with `skip_prk_steps` —
/// SD1.x's configs — by one second-order step.
///
/// The loop is longer than the requested N: with `skip_prk_steps` the second-highest timestep appears twice
/// (N + 1 model evaluations: the first step goes forward, the second averages the two ε at the same point);
/// without it, 12 PRK evaluations on the 4 highest timesteps and their midpoints precede N − 3 PLMS steps
/// (N + 9 in all, and N must be at least 4). The scheduler counts its own calls, as diffusers' does.
///
/// Config keys: the shared beta keys (but not `rescale_betas_zero_snr`, which PNDM does not know),
/// `timestep_spacing` (default "leading"), `steps_offset`, `prediction_type` (epsilon, v_prediction),
/// `skip_prk_steps` (default false), `set_alpha_to_one` (default false).
public struct PNDMScheduler: Scheduler {
    public static let className = "PNDMScheduler"
    public var className: String { Self.className }

    let schedule: TrainingNoiseSchedule
    let finalAlphaCumprod: Float
    let skipsRungeKutta: Bool
    public let predictionType: PredictionType
    let spacing: TimestepSpacing
    let stepsOffset: Int

    public private(set) var timesteps: [Double] = []
    public var timestepDType: DType { .i64 }
    public var initNoiseSigma: Float { 1 }

    private var inferenceSteps = 0
    /// The PRK part of `timesteps` (empty with skip_prk_steps).
    private var rungeKuttaTimesteps: [Int] = []
    /// Calls to `step` since setTimesteps.
    private var counter = 0
    /// The ε of past steps, oldest first (at most 4 are used).
    private var pastOutputs: [Tensor] = []
    /// The sample a multi-evaluation step started from.
    private var startSample: Tensor?
    /// The running 1/6, 1/3, 1/3, 1/6 weighted sum of a Runge-Kutta step's four ε.
    private var rungeKuttaSum: Tensor?

    public init(config file: ConfigFile) throws {
        let config = SchedulerConfig(file)
        schedule = try TrainingNoiseSchedule(config, readsZeroSNR: false)
        finalAlphaCumprod = try file.bool("set_alpha_to_one", default: false) ? 1 : schedule.alphasCumprod[0]
        skipsRungeKutta = try file.bool("skip_prk_steps", default: false)
        predictionType = PredictionType(rawValue: try config.choice("prediction_type", default: "epsilon",
                                                                    allowed: ["epsilon", "v_prediction"]))!
        spacing = try config.timestepSpacing(default: .leading)
        stepsOffset = try config.stepsOffset
    }

    public mutating func setTimesteps(_ steps: Int) throws {
        let trainCount = schedule.count
        try checkStepCount(steps, trainTimesteps: trainCount, scheduler: className)
        let ascending = spacing.timesteps(steps, trainTimesteps: trainCount, stepsOffset: stepsOffset).reversed().map { Int(numpyRound($0)) }
        let plms: [Int]
        if skipsRungeKutta {
            // The second-highest timestep twice: ascending[..<n-1], ascending[n-2], ascending[n-1], reversed.
            let n = ascending.count
            let repeated = n >= 2 ? [ascending[n - 2]] : []
            rungeKuttaTimesteps = []
            plms = (ascending.dropLast() + repeated + [ascending[n - 1]]).reversed()
        } else {
            guard steps >= 4 else {
                throw PEAError.usage("\(className): with skip_prk_steps false (Runge-Kutta warm-up) the number of inference steps must be at least 4, got \(steps)")
            }
            // The 4 highest timesteps t and their midpoints t + ⌊T/N/2⌋ in the order the RK steps visit them:
            // d, c+h, c+h, c, c, b+h, b+h, b, b, a+h, a+h, a for ascending a < b < c < d.
            let half = trainCount / steps / 2
            let points = ascending.suffix(4).flatMap { [$0, $0 + half] }.dropLast()
            rungeKuttaTimesteps = Array(points.flatMap { [$0, $0] }.dropFirst().dropLast().reversed())
            plms = ascending.dropLast(3).reversed()
        }
        timesteps = (rungeKuttaTimesteps + plms).map { Double($0) }
        inferenceSteps = steps
        counter = 0
        pastOutputs = []
        startSample = nil
        rungeKuttaSum = nil
    }

    public func scaleModelInput(_ sample: Tensor, stepIndex: Int) throws -> Tensor { sample }

    /// PNDM keeps no begin index: it counts its own `step` calls, so a loop that starts mid-schedule runs its
    /// warm-up from there, as diffusers' does.
    public func addNoise(_ original: Tensor, noise: Tensor, stepIndex: Int) throws -> Tensor {
        try schedule.addNoise(original, noise: noise, timestep: Int(checkedTimestep(stepIndex)), scheduler: className)
    }

    public mutating func step(modelOutput: Tensor, stepIndex: Int, sample: Tensor, noise: () throws -> Tensor) throws -> Tensor {
        let t = Int(try checkedTimestep(stepIndex))
        if counter < rungeKuttaTimesteps.count && !skipsRungeKutta {
            return try rungeKuttaStep(modelOutput: modelOutput, timestep: t, sample: sample)
        }
        return try linearMultistepStep(modelOutput: modelOutput, timestep: t, sample: sample)
    }

    /// One of the four evaluations of a classical Runge-Kutta step; every one moves from the step's start.
    private mutating func rungeKuttaStep(modelOutput: Tensor, timestep: Int, sample: Tensor) throws -> Tensor {
        let backend = sample.backend
        let halfStep = counter % 2 == 1 ? 0 : schedule.count / inferenceSteps / 2
        let previous = timestep - halfStep
        let start = rungeKuttaTimesteps[counter / 4 * 4]
        var output = modelOutput
        switch counter % 4 {
        case 0:
            rungeKuttaSum = try backend.scale(modelOutput, by: Float(1.0 / 6))
            pastOutputs.append(modelOutput)
            startSample = sample
        case 1, 2:
            rungeKuttaSum = try linearCombination([(1, rungeKuttaSum!), (1.0 / 3, modelOutput)])
        default:
            output = try linearCombination([(1, rungeKuttaSum!), (1.0 / 6, modelOutput)])
            rungeKuttaSum = nil
        }
        let result = try previousSample(startSample ?? sample, timestep: start, previous: previous, output: output)
        counter += 1
        return result
    }

    /// A PLMS step: Adams-Bashforth on the last ε (1st to 4th order as history accumulates).
    private mutating func linearMultistepStep(modelOutput: Tensor, timestep: Int, sample: Tensor) throws -> Tensor {
        if !skipsRungeKutta && pastOutputs.count < 3 {
            throw PEAError.usage("\(className): PLMS steps need the Runge-Kutta warm-up first (call step for every timestep in order)")
        }
        let stride = schedule.count / inferenceSteps
        var timestep = timestep, previous = timestep - stride
        if counter != 1 {
            pastOutputs = Array(pastOutputs.suffix(3)) + [modelOutput]
        } else {
            // The second evaluation of the warm-up step: the same step again, from the first step's start.
            previous = timestep
            timestep += stride
        }

        var output = modelOutput, start = sample
        let e = pastOutputs.reversed().map { $0 }   // newest first
        if e.count == 1 && counter == 0 {
            startSample = sample
        } else if e.count == 1 && counter == 1 {
            output = try linearCombination([(0.5, modelOutput), (0.5, e[0])])
            start = startSample!
            startSample = nil
        } else if e.count == 2 {
            output = try linearCombination([(3.0 / 2, e[0]), (-1.0 / 2, e[1])])
        } else if e.count == 3 {
            output = try linearCombination([(23.0 / 12, e[0]), (-16.0 / 12, e[1]), (5.0 / 12, e[2])])
        } else {
            output = try linearCombination([(55.0 / 24, e[0]), (-59.0 / 24, e[1]), (37.0 / 24, e[2]), (-9.0 / 24, e[3])])
        }
        let result = try previousSample(start, timestep: timestep, previous: previous, output: output)
        counter += 1
        return result
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the paper, x_{t−δ} from x_t and ε.
    private func previousSample(_ sample: Tensor, timestep: Int, previous: Int, output: Tensor) throws -> Tensor {
        guard timestep < schedule.count else {
            throw PEAError.usage("\(className): timestep \(timestep) is beyond num_train_timesteps \(schedule.count) (steps_offset too large?)")
        }
        let alphaProduct = Double(schedule.alphasCumprod[timestep])
        let alphaProductPrevious = Double(schedule.alphaCumprod(previous, final: finalAlphaCumprod))
        let betaProduct = 1 - alphaProduct, betaProductPrevious = 1 - alphaProductPrevious
        var epsilon = output
        if predictionType == .vPrediction {
            epsilon = try linearCombination([(alphaProduct.squareRoot(), output), (betaProduct.squareRoot(), sample)])
        }
        let sampleCoefficient = (alphaProductPrevious / alphaProduct).squareRoot()
        let denominator = alphaProduct * betaProductPrevious.squareRoot()
            + (alphaProduct * betaProduct * alphaProductPrevious).squareRoot()
        return try linearCombination([(sampleCoefficient, sample),
                                      (-(alphaProductPrevious - alphaProduct) / denominator, epsilon)])
    }
}
