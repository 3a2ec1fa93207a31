#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// diffusers' `DPMSolverMultistepScheduler` with `algorithm_type` "dpmsolver++" (Lu et al., "DPM-Solver++",
/// the data-prediction multistep solver): DPM++ 2M with the defaults, 3M with `solver_order` 3.
///
/// The model's output is first turned into x̂₀; each step then extrapolates in λ = log(α/σ) from the last
/// one, two or three x̂₀. The first step is first order (no history yet). The last step is first order too
/// when `final_sigmas_type` is "zero" (the default, where it simply returns x̂₀), with `euler_at_final`,
/// or with `lower_order_final` and fewer than 15 steps; with that rule the second-to-last step of a 3M solver
/// is second order.
///
/// Config keys: the shared beta keys, `timestep_spacing` (default "linspace"), `steps_offset`,
/// `prediction_type` (epsilon, v_prediction, sample), `solver_order` (1–3), `solver_type` (midpoint, heun;
/// UniPC's and DEIS's values map to midpoint as in diffusers), `lower_order_final`, `euler_at_final`,
/// `use_karras_sigmas` with `sigma_min`/`sigma_max` (read when present, as diffusers reads them), `final_sigmas_type`,
/// `lambda_min_clipped`, `rescale_betas_zero_snr`. `algorithm_type` must be "dpmsolver++" ("deis" maps to it);
/// `thresholding`, `variance_type`, and the exponential, beta, Lu-lambda and flow sigma schedules are refused.
public struct DPMSolverMultistepScheduler: Scheduler {
    public static let className = "DPMSolverMultistepScheduler"
    public var className: String { Self.className }

    enum SolverType: String { case midpoint, heun }

    let schedule: TrainingNoiseSchedule
    let trainingSigmas: [Float]
    let logSigmas: [Float]
    let roundsKarrasTimesteps: Bool
    public let predictionType: PredictionType
    let solverOrder: Int
    let solverType: SolverType
    let lowerOrderFinal: Bool
    let eulerAtFinal: Bool
    let usesKarrasSigmas: Bool
    let karrasRange: (min: Double?, max: Double?)
    let finalSigmaIsMinimum: Bool
    let lambdaMinClipped: Double
    let spacing: TimestepSpacing
    let stepsOffset: Int

    public private(set) var timesteps: [Double] = []
    /// σ of each timestep, then the final σ (0, or the smallest training σ).
    public private(set) var sigmas: [Float] = []
    public var timestepDType: DType { .i64 }
    public var initNoiseSigma: Float { 1 }

    /// The x̂₀ of the last `solverOrder` steps, oldest first, and how many steps have run (up to the order).
    private var modelOutputs: [Tensor?] = []
    private var lowerOrderCount = 0

    public init(config file: ConfigFile) throws {
        let config = SchedulerConfig(file)
        schedule = try TrainingNoiseSchedule(config, readsZeroSNR: true).withFiniteTerminalSigma()
        trainingSigmas = schedule.sigmas
        logSigmas = logSigmaTable(trainingSigmas)
        // diffusers rounds Karras timesteps to whole numbers except for the cosine schedule, where the int64
        // conversion truncates them instead.
        roundsKarrasTimesteps = try file.string("beta_schedule", default: "linear") != "squaredcos_cap_v2"
        predictionType = PredictionType(rawValue: try config.choice("prediction_type", default: "epsilon",
                                                                    allowed: ["epsilon", "v_prediction", "sample"]))!
        // DEIS's "deis" and UniPC's/DEIS's solver types are what diffusers itself maps them to.
        _ = try config.choice("algorithm_type", default: "dpmsolver++", allowed: ["dpmsolver++", "deis"])
        solverOrder = try file.int("solver_order", default: 2)
        guard (1...3).contains(solverOrder) else { throw config.invalid("solver_order", "\(solverOrder) is not supported (1, 2 or 3)") }
        let solver = try config.choice("solver_type", default: "midpoint", allowed: ["midpoint", "heun", "logrho", "bh1", "bh2"])
        solverType = solver == "heun" ? .heun : .midpoint
        lowerOrderFinal = try file.bool("lower_order_final", default: true)
        eulerAtFinal = try file.bool("euler_at_final", default: false)
        usesKarrasSigmas = try file.bool("use_karras_sigmas", default: false)
        karrasRange = (try file.optionalDouble("sigma_min", range: .atLeast(0)), try file.optionalDouble("sigma_max", range: .atLeast(0)))
        finalSigmaIsMinimum = try config.choice("final_sigmas_type", default: "zero", allowed: ["zero", "sigma_min"]) == "sigma_min"
        lambdaMinClipped = try file.double("lambda_min_clipped", default: -.infinity)
        spacing = try config.timestepSpacing(default: .linspace)
        stepsOffset = try config.stepsOffset
        try config.requireOff("thresholding")
        for key in ["use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"] {
            try config.requireOff(key)
        }
        if let variance = try file.optionalString("variance_type") {
            throw config.invalid("variance_type", "'\(variance)' is not supported (only null)")
        }
    }

    public mutating func setTimesteps(_ steps: Int) throws {
        let trainCount = schedule.count
        try checkStepCount(steps, trainTimesteps: trainCount, scheduler: className)
        // `lambda_min_clipped` drops the noisiest training timesteps, whose λ = log(α/σ) is below it.
        let clipped = schedule.alphasCumprod.filter { Double(log($0.squareRoot()) - log((1 - $0).squareRoot())) < lambdaMinClipped }.count
        let lastTimestep = trainCount - clipped

        // N + 1 points, the last (0) dropped, for linspace and leading; trailing counts down from the last timestep.
        var stepTimesteps: [Double]
        switch spacing {
        case .linspace:
            stepTimesteps = Array(numpyLinspace(0, Double(lastTimestep - 1), steps + 1).map(numpyRound).reversed().dropLast())
        case .leading:
            let ratio = lastTimestep / (steps + 1)
            stepTimesteps = (1...steps).reversed().map { Double($0 * ratio + stepsOffset) }
        case .trailing:
            let ratio = Double(trainCount) / Double(steps)
            stepTimesteps = numpyArange(Double(lastTimestep), 0, -ratio).map { numpyRound($0) - 1 }
        }

        var stepSigmas: [Double]
        if usesKarrasSigmas {
            stepSigmas = karrasSigmas(sigmaMin: karrasRange.min ?? Double(trainingSigmas[0]),
                                      sigmaMax: karrasRange.max ?? Double(trainingSigmas[trainCount - 1]), count: steps)
            stepTimesteps = stepSigmas.map { sigma in
                let t = timestep(forSigma: sigma, logSigmas: logSigmas)
                return (roundsKarrasTimesteps ? numpyRound(t) : t).rounded(.towardZero)
            }
        } else {
            stepSigmas = stepTimesteps.map { numpyInterp($0, trainingSigmas) }
        }
        let last: Float = finalSigmaIsMinimum ? trainingSigmas[0] : 0
        sigmas = stepSigmas.map { Float($0) } + [last]
        timesteps = stepTimesteps
        modelOutputs = Array(repeating: nil, count: solverOrder)
        lowerOrderCount = 0
    }

    public func scaleModelInput(_ sample: Tensor, stepIndex: Int) throws -> Tensor { sample }

    /// α_t·x₀ + σ_t·ε with α_t = 1/√(σ²+1), σ_t = σ·α_t at the begin index's σ, in float32 as diffusers'
    /// `_sigma_to_alpha_sigma_t`. A loop started there is first order on its first step (no history yet), as
    /// diffusers' `lower_order_nums` is 0 after `set_timesteps`.
    public func addNoise(_ original: Tensor, noise: Tensor, stepIndex: Int) throws -> Tensor {
        _ = try checkedTimestep(stepIndex)
        let sigma = sigmas[stepIndex]
        let alpha = 1 / (sigma * sigma + 1).squareRoot()
        return try linearCombination([(Double(alpha), original), (Double(sigma * alpha), noise)])
    }

    public mutating func step(modelOutput: Tensor, stepIndex: Int, sample: Tensor, noise: () throws -> Tensor) throws -> Tensor {
        _ = try checkedTimestep(stepIndex)
        let count = timesteps.count
        let isLast = stepIndex == count - 1
        let firstOrderNow = isLast && (eulerAtFinal || (lowerOrderFinal && count < 15) || !finalSigmaIsMinimum)
        let secondOrderNow = stepIndex == count - 2 && lowerOrderFinal && count < 15

        let predictedOriginal = try dataPrediction(modelOutput, sample: sample, sigma: sigmas[stepIndex])
        modelOutputs.removeFirst()
        modelOutputs.append(predictedOriginal)

        let previous: Tensor
        if solverOrder == 1 || lowerOrderCount < 1 || firstOrderNow {
            previous = try firstOrderUpdate(sample: sample, stepIndex: stepIndex)
        } else if solverOrder == 2 || lowerOrderCount < 2 || secondOrderNow {
            previous = try secondOrderUpdate(sample: sample, stepIndex: stepIndex)
        } else {
            previous = try thirdOrderUpdate(sample: sample, stepIndex: stepIndex)
        }
        if lowerOrderCount < solverOrder { lowerOrderCount += 1 }
        return previous
    }

    /// α_t = 1/√(σ²+1) and σ_t = σ·α_t (the VP coefficients behind k-diffusion's σ) and λ = log α_t − log σ_t.
    private func coefficients(_ sigma: Float) -> (alpha: Double, sigma: Double, lambda: Double) {
        let s = Double(sigma)
        let alpha = 1 / (s * s + 1).squareRoot()
        return (alpha, s * alpha, log(alpha) - log(s * alpha))
    }

    /// diffusers' `convert_model_output` for dpmsolver++: x̂₀.
    private func dataPrediction(_ modelOutput: Tensor, sample: Tensor, sigma: Float) throws -> Tensor {
        let c = coefficients(sigma)
        switch predictionType {
        case .epsilon:
            return try linearCombination([(1 / c.alpha, sample), (-c.sigma / c.alpha, modelOutput)])
        case .vPrediction:
            return try linearCombination([(c.alpha, sample), (-c.sigma, modelOutput)])
        case .sample:
            return modelOutput
        }
    }

    /// DPM-Solver++(1), i.e. DDIM in λ: x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·x̂₀. With a final σ of 0 it is x̂₀.
    private func firstOrderUpdate(sample: Tensor, stepIndex: Int) throws -> Tensor {
        let t = coefficients(sigmas[stepIndex + 1]), s = coefficients(sigmas[stepIndex])
        let h = t.lambda - s.lambda
        return try linearCombination([(t.sigma / s.sigma, sample), (-t.alpha * (exp(-h) - 1), modelOutputs[solverOrder - 1]!)])
    }

    /// DPM-Solver++(2M): the first-order step plus a correction from the difference of the last two x̂₀.
    private func secondOrderUpdate(sample: Tensor, stepIndex: Int) throws -> Tensor {
        let t = coefficients(sigmas[stepIndex + 1]), s0 = coefficients(sigmas[stepIndex]), s1 = coefficients(sigmas[stepIndex - 1])
        let m0 = modelOutputs[solverOrder - 1]!, m1 = modelOutputs[solverOrder - 2]!
        let h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda
        let r0 = h0 / h
        let backend = sample.backend
        let d1 = try backend.scale(backend.sub(m0, m1), by: Float(1 / r0))
        let correction: Double
        switch solverType {
        case .midpoint: correction = -0.5 * (t.alpha * (exp(-h) - 1))
        case .heun: correction = t.alpha * ((exp(-h) - 1) / h + 1)
        }
        return try linearCombination([(t.sigma / s0.sigma, sample), (-t.alpha * (exp(-h) - 1), m0), (correction, d1)])
    }

    /// DPM-Solver++(3M): first and second differences of the last three x̂₀.
    private func thirdOrderUpdate(sample: Tensor, stepIndex: Int) throws -> Tensor {
        let t = coefficients(sigmas[stepIndex + 1]), s0 = coefficients(sigmas[stepIndex])
        let s1 = coefficients(sigmas[stepIndex - 1]), s2 = coefficients(sigmas[stepIndex - 2])
        let m0 = modelOutputs[solverOrder - 1]!, m1 = modelOutputs[solverOrder - 2]!, m2 = modelOutputs[solverOrder - 3]!
        let h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda, h1 = s1.lambda - s2.lambda
        let r0 = h0 / h, r1 = h1 / h
        let backend = sample.backend
        let d10 = try backend.scale(backend.sub(m0, m1), by: Float(1 / r0))
        let d11 = try backend.scale(backend.sub(m1, m2), by: Float(1 / r1))
        let d10MinusD11 = try backend.sub(d10, d11)
        let d1 = try linearCombination([(1, d10), (r0 / (r0 + r1), d10MinusD11)])
        let d2 = try backend.scale(d10MinusD11, by: Float(1 / (r0 + r1)))
        let e = exp(-h) - 1
        return try linearCombination([
            (t.sigma / s0.sigma, sample),
            (-t.alpha * e, m0),
            (t.alpha * (e / h + 1), d1),
            (-t.alpha * ((e + h) / (h * h) - 0.5), d2),
        ])
    }
}
