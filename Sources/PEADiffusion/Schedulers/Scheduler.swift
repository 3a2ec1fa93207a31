#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A sampling scheduler with the semantics of the diffusers class of the same name: the timesteps of a
/// denoising loop and the update from one latent to the next.
///
/// How a pipeline drives one (diffusers' StableDiffusionPipeline loop, with explicit step indices):
///
///     try scheduler.setTimesteps(steps)
///     var latents = noise · scheduler.initNoiseSigma
///     for i in scheduler.timesteps.indices {
///         let input = try scheduler.scaleModelInput(latents, stepIndex: i)      // before the UNet, every step
///         let prediction = unet(input, timestep: scheduler.modelTimestep(stepIndex: i), …)  // (+ guidance)
///         latents = try scheduler.step(modelOutput: prediction, stepIndex: i, sample: latents,
///                                      noise: { /* randn of latents' shape from the pipeline's generator */ })
///     }
///
/// `timesteps.count` may differ from the requested step count (PNDM evaluates the model N+1 times; with its
/// Runge-Kutta warm-up N+9). The `noise` closure is called only by schedulers that draw noise, exactly when
/// diffusers' `step` draws it (`randn_tensor(model_output.shape, generator=…)`), so a torch-compatible
/// generator behind it keeps the whole random stream in step with diffusers.
public protocol Scheduler {
    /// The diffusers class this scheduler reproduces ("DDIMScheduler", …).
    var className: String { get }

    /// The loop's timesteps in order, as diffusers' `scheduler.timesteps` after `set_timesteps`: whole numbers
    /// for DDIM, PNDM and DPM-Solver (int64 there), float32 values for the Euler schedulers; held as Double,
    /// which represents both exactly.
    var timesteps: [Double] { get }

    /// How diffusers holds `timesteps`, hence what its pipeline hands the UNet: `.i64` or `.f32`.
    var timestepDType: DType { get }

    /// The standard deviation of the initial latent noise (diffusers' `init_noise_sigma`).
    var initNoiseSigma: Float { get }

    /// diffusers' `set_timesteps(steps)`: computes `timesteps` (and sigmas) and resets the multistep state.
    mutating func setTimesteps(_ steps: Int) throws

    /// diffusers' `scale_model_input(sample, timesteps[stepIndex])`: what the UNet receives.
    func scaleModelInput(_ sample: Tensor, stepIndex: Int) throws -> Tensor

    /// diffusers' `step(model_output, timesteps[stepIndex], sample).prev_sample`. `noise` supplies a standard
    /// normal tensor of `sample`'s shape whenever the scheduler draws one.
    mutating func step(modelOutput: Tensor, stepIndex: Int, sample: Tensor, noise: () throws -> Tensor) throws -> Tensor

    /// diffusers' `add_noise(original, noise, timesteps[stepIndex:stepIndex+1])` as its image-to-image pipelines
    /// call it, right after `set_begin_index(stepIndex)`: the noisy latents a loop that starts at `stepIndex`
    /// begins from (the whole batch at that one timestep). The σ-based schedulers (Euler, Euler ancestral,
    /// DPM-Solver) read σ at the begin index; DDIM and PNDM use ᾱ of the timestep (`TrainingNoiseSchedule.addNoise`).
    func addNoise(_ original: Tensor, noise: Tensor, stepIndex: Int) throws -> Tensor
}

extension Scheduler {
    /// The timestep of step `stepIndex` as diffusers passes it to the UNet: shape [1], `timestepDType`.
    public func modelTimestep(stepIndex: Int) throws -> HostTensor {
        let t = try checkedTimestep(stepIndex)
        return timestepDType == .i64 ? HostTensor(ids: [Int(t)], shape: [1], dtype: .i64) : HostTensor([Float(t)], shape: [1])
    }

    /// A step of a scheduler that draws no noise (everything but Euler ancestral, and DDIM with eta > 0).
    public mutating func step(modelOutput: Tensor, stepIndex: Int, sample: Tensor) throws -> Tensor {
        let name = className
        return try step(modelOutput: modelOutput, stepIndex: stepIndex, sample: sample, noise: {
            throw PEAError.usage("\(name) draws noise at every step: pass a noise source to step(…, noise:)")
        })
    }

    func checkedTimestep(_ stepIndex: Int) throws -> Double {
        guard timesteps.indices.contains(stepIndex) else {
            throw PEAError.usage("\(className): step index \(stepIndex) is outside the \(timesteps.count) timesteps set by setTimesteps")
        }
        return timesteps[stepIndex]
    }
}

// MARK: - Choosing a scheduler

/// The names `pea generate --scheduler` accepts.
public enum SchedulerName: String, CaseIterable, Sendable {
    case ddim, euler
    case eulerAncestral = "euler-a"
    case dpmpp2M = "dpmpp-2m"
    case dpmpp2MKarras = "dpmpp-2m-karras"
    case pndm
}

/// The scheduler a model folder's `scheduler_config.json` describes, or another one built from the same
/// config: `name` is a `SchedulerName` raw value, or nil for the folder's own `_class_name`.
///
/// Picking another scheduler reads the same file the way diffusers' `Target.from_config(pipe.scheduler.config)`
/// does: the target reads the keys it knows, ignores the others, and takes its own defaults for missing ones
/// (so SD1.5's PNDM config gives an Euler scheduler with Euler's default `timestep_spacing`, "linspace").
/// The DPM-Solver++ names also set what the name says, as `from_config(config, **overrides)` would:
/// `algorithm_type` "dpmsolver++", `solver_order` 2, and `use_karras_sigmas` true for "-karras", false otherwise.
public func makeScheduler(name: String?, config: ConfigFile) throws -> any Scheduler {
    let className: String
    var overrides: [String: JSONValue] = [:]
    if let name {
        guard let picked = SchedulerName(rawValue: name) else {
            let known = SchedulerName.allCases.map(\.rawValue).joined(separator: ", ")
            throw PEAError.usage("unknown scheduler '\(name)' (expected one of: \(known))")
        }
        switch picked {
        case .ddim: className = DDIMScheduler.className
        case .euler: className = EulerDiscreteScheduler.className
        case .eulerAncestral: className = EulerAncestralDiscreteScheduler.className
        case .pndm: className = PNDMScheduler.className
        case .dpmpp2M, .dpmpp2MKarras:
            className = DPMSolverMultistepScheduler.className
            overrides = ["algorithm_type": .string("dpmsolver++"), "solver_order": .number(2),
                         "use_karras_sigmas": .bool(picked == .dpmpp2MKarras)]
        }
    } else {
        className = try config.string("_class_name")
    }
    let effective = overrides.isEmpty ? config : ConfigFile(path: config.path, values: config.values.merging(overrides) { $1 })
    switch className {
    case DDIMScheduler.className: return try DDIMScheduler(config: effective)
    case EulerDiscreteScheduler.className: return try EulerDiscreteScheduler(config: effective)
    case EulerAncestralDiscreteScheduler.className: return try EulerAncestralDiscreteScheduler(config: effective)
    case DPMSolverMultistepScheduler.className: return try DPMSolverMultistepScheduler(config: effective)
    case PNDMScheduler.className: return try PNDMScheduler(config: effective)
    default:
        let names = SchedulerName.allCases.map(\.rawValue).joined(separator: ", ")
        throw PEAError.invalidConfig(path: config.path, reason: "key '_class_name': \(className) is not supported for sampling; pick a scheduler by name (\(names))")
    }
}

// MARK: - Reading a scheduler config

/// The config keys every diffusers scheduler shares, read with the defaults they share, plus checks that
/// name the file and the key when a value is one we do not implement.
struct SchedulerConfig {
    let file: ConfigFile

    init(_ file: ConfigFile) { self.file = file }

    var trainTimesteps: Int {
        get throws {
            let count = try file.int("num_train_timesteps", default: 1000, range: .atLeast(2))
            // The schedules are arrays of that length (β, ᾱ, σ, timesteps: a few dozen bytes per step).
            try MemoryBudget.require(Double(count) * Self.scheduleBytesPerTimestep, for: "the schedule of \(count) timesteps") {
                invalid("num_train_timesteps", $0)
            }
            return count
        }
    }

    /// A generous bound on the bytes the schedule arrays take per training timestep.
    static let scheduleBytesPerTimestep = 64.0

    var stepsOffset: Int { get throws { try file.int("steps_offset", default: 0, range: .atLeast(0)) } }

    /// A string key restricted to `allowed` (diffusers' Literal arguments).
    func choice(_ key: String, default defaultValue: String, allowed: [String]) throws -> String {
        let value = try file.string(key, default: defaultValue)
        guard allowed.contains(value) else {
            throw invalid(key, "'\(value)' is not supported (supported: \(allowed.map { "'\($0)'" }.joined(separator: ", ")))")
        }
        return value
    }

    /// A boolean feature that Pea does not implement: only false (or absent) is accepted.
    func requireOff(_ key: String) throws {
        if try file.bool(key, default: false) { throw invalid(key, "true is not supported") }
    }

    func timestepSpacing(default defaultValue: TimestepSpacing) throws -> TimestepSpacing {
        TimestepSpacing(rawValue: try choice("timestep_spacing", default: defaultValue.rawValue,
                                             allowed: TimestepSpacing.allCases.map(\.rawValue)))!
    }

    func invalid(_ key: String, _ problem: String) -> PEAError {
        .invalidConfig(path: file.path, reason: "key '\(key)': \(problem)")
    }
}

/// diffusers' `timestep_spacing`: how N inference timesteps are picked from the training ones
/// (table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
enum TimestepSpacing: String, CaseIterable {
    case leading, linspace, trailing
}

extension TimestepSpacing {
    /// The `count` inference timesteps of DDIM's, PNDM's and the Euler schedulers' `set_timesteps`, in
    /// descending order. "leading" and "trailing" give whole numbers; "linspace" gives numpy's float64
    /// linspace, which DDIM and PNDM round (halves to even) and the Euler schedulers keep as float32.
    func timesteps(_ count: Int, trainTimesteps: Int, stepsOffset: Int) -> [Double] {
        switch self {
        case .linspace:
            return numpyLinspace(0, Double(trainTimesteps - 1), count).reversed()
        case .leading:
            // Multiples of ⌊T/N⌋ from 0, shifted by steps_offset (SD's configs use 1: 1, 21, …, 981 for N = 50).
            let ratio = trainTimesteps / count
            return (0..<count).reversed().map { Double($0 * ratio + stepsOffset) }
        case .trailing:
            // Counted down from T in steps of T/N, so the first one is always T − 1.
            let ratio = Double(trainTimesteps) / Double(count)
            return numpyArange(Double(trainTimesteps), 0, -ratio).map { numpyRound($0) - 1 }
        }
    }
}

/// What the model predicts (`prediction_type`).
public enum PredictionType: String, Sendable {
    case epsilon
    case vPrediction = "v_prediction"
    case sample
}

// MARK: - The training noise schedule

/// ᾱ_t = ∏ (1 − β_s) of a diffusers scheduler, from `beta_schedule` (or `trained_betas`), held in float32
/// as diffusers holds it: its betas and alphas are float32 torch tensors, and torch's CPU cumprod multiplies
/// in double and rounds each product to float32 — which is what this does.
struct TrainingNoiseSchedule {
    let alphasCumprod: [Float]
    /// Whether `rescale_betas_zero_snr` made the last ᾱ zero.
    let hasZeroTerminalSNR: Bool

    /// Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas` and, when
    /// `readsZeroSNR` (every scheduler here but PNDM knows the key), `rescale_betas_zero_snr`.
    init(_ config: SchedulerConfig, readsZeroSNR: Bool) throws {
        let count = try config.trainTimesteps
        var betas: [Float]
        let betasKey: String   // what the betas come from, for the error below
        if config.file.value("trained_betas").map({ $0 != .null }) ?? false {
            betasKey = "trained_betas"
            betas = try config.file.floatList("trained_betas", range: .openUnitInterval)
            guard betas.count == count else {
                throw config.invalid("trained_betas", "has \(betas.count) values for num_train_timesteps \(count)")
            }
        } else {
            betasKey = "beta_schedule"
            let start = try config.file.double("beta_start", default: 0.0001, range: .openUnitInterval)
            let end = try config.file.double("beta_end", default: 0.02, range: .openUnitInterval)
            switch try config.choice("beta_schedule", default: "linear", allowed: ["linear", "scaled_linear", "squaredcos_cap_v2"]) {
            case "linear":
                betas = torchLinspaceFloat32(start, end, count)
            case "scaled_linear":
                // Linear in √β (the schedule Stable Diffusion was trained with).
                betas = torchLinspaceFloat32(start.squareRoot(), end.squareRoot(), count).map { $0 * $0 }
            default:
                betas = cosineBetas(count)
            }
        }
        // Each β as float32 must leave a positive ᾱ: a β of 0 or 1 (rounded there, or underflowing ᾱ) makes σ
        // zero or infinite, and the samplers divide by both.
        if let bad = betas.firstIndex(where: { !($0 > 0 && $0 < 1) }) {
            throw config.invalid(betasKey, "β at timestep \(bad) is \(betas[bad]) as a float32; every β must be in (0, 1)")
        }
        if let last = cumulativeProduct(betas.map { 1 - $0 }).last, !(last > 0) {
            throw config.invalid(betasKey, "the betas make alphas_cumprod reach 0 by the last timestep; it must stay positive")
        }
        hasZeroTerminalSNR = try readsZeroSNR && config.file.bool("rescale_betas_zero_snr", default: false)
        if hasZeroTerminalSNR {
            betas = rescaledToZeroTerminalSNR(betas)
        }
        alphasCumprod = cumulativeProduct(betas.map { 1 - $0 })
    }

    /// The schedule the sigma-based schedulers (Euler, Euler ancestral, DPM-Solver) use: with a zero terminal
    /// SNR, diffusers sets the last ᾱ to 2⁻²⁴ so that the largest σ is finite (4096).
    func withFiniteTerminalSigma() -> TrainingNoiseSchedule {
        guard hasZeroTerminalSNR else { return self }
        var alphas = alphasCumprod
        alphas[alphas.count - 1] = 0x1p-24
        return TrainingNoiseSchedule(alphasCumprod: alphas, hasZeroTerminalSNR: true)
    }

    private init(alphasCumprod: [Float], hasZeroTerminalSNR: Bool) {
        self.alphasCumprod = alphasCumprod
        self.hasZeroTerminalSNR = hasZeroTerminalSNR
    }

    var count: Int { alphasCumprod.count }

    /// ᾱ_t, with diffusers' convention that a negative t (the step after the last) is `final`.
    func alphaCumprod(_ t: Int, final: Float) -> Float { t >= 0 ? alphasCumprod[t] : final }

    /// √ᾱ_t and √(1 − ᾱ_t), the forward process's coefficients, in float32 from the float32 ᾱ as diffusers'
    /// `add_noise` computes them (`alphas_cumprod[t] ** 0.5`, `(1 - alphas_cumprod[t]) ** 0.5`).
    func forwardCoefficients(_ t: Int) -> (signal: Float, noise: Float) {
        let alpha = alphasCumprod[t]
        return (alpha.squareRoot(), (1 - alpha).squareRoot())
    }

    /// The forward process at one timestep for the whole batch, x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε: the `add_noise` of
    /// diffusers' DDPM, DDIM and PNDM schedulers. `scheduler` names the caller in errors.
    func addNoise(_ original: Tensor, noise: Tensor, timestep t: Int, scheduler: String) throws -> Tensor {
        guard (0..<count).contains(t) else {
            throw PEAError.usage("\(scheduler): timestep \(t) is outside 0..<\(count) (steps_offset too large?)")
        }
        let (signal, noiseLevel) = forwardCoefficients(t)
        return try linearCombination([(Double(signal), original), (Double(noiseLevel), noise)])
    }

    /// σ_t = √((1 − ᾱ_t)/ᾱ_t), the k-diffusion noise level of every training timestep, computed in float32 as
    /// diffusers' Euler and DPM-Solver schedulers compute it.
    var sigmas: [Float] { alphasCumprod.map { ((1 - $0) / $0).squareRoot() } }
}

/// torch.linspace(start, end, count, dtype=float32) on the CPU: float32 arithmetic, the first half counted
/// up from `start` and the second half down from `end`, each entry one fused multiply-add (as torch's x86
/// build compiles its kernel; this reproduces its betas bit for bit, which matters once
/// `rescale_betas_zero_snr` amplifies the last bit).
func torchLinspaceFloat32(_ start: Double, _ end: Double, _ count: Int) -> [Float] {
    let first = Float(start), last = Float(end)
    guard count > 1 else { return count == 1 ? [first] : [] }
    let step = (last - first) / Float(count - 1)
    let half = count / 2
    return (0..<count).map { i in
        i < half ? first.addingProduct(step, Float(i)) : last.addingProduct(-step, Float(count - 1 - i))
    }
}

/// diffusers' `betas_for_alpha_bar` with the cosine ᾱ of Nichol & Dhariwal (squaredcos_cap_v2), computed in
/// double and stored as float32, each β capped at 0.999.
func cosineBetas(_ count: Int) -> [Float] {
    func alphaBar(_ t: Double) -> Double {
        let c = cos((t + 0.008) / 1.008 * Double.pi / 2)
        return c * c
    }
    return (0..<count).map { i in
        let t1 = Double(i) / Double(count), t2 = Double(i + 1) / Double(count)
        return Float(min(1 - alphaBar(t2) / alphaBar(t1), 0.999))
    }
}

/// torch.cumprod of a float32 tensor on the CPU: the running product in double, each entry rounded to float32.
func cumulativeProduct(_ values: [Float]) -> [Float] {
    var product = 1.0
    return values.map { value in
        product *= Double(value)
        return Float(product)
    }
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1), in float32 as diffusers runs it:
/// shifts and scales √ᾱ so that the last timestep has √ᾱ = 0 and the first keeps its value.
func rescaledToZeroTerminalSNR(_ betas: [Float]) -> [Float] {
    var root = cumulativeProduct(betas.map { 1 - $0 }).map { $0.squareRoot() }
    let first = root[0], last = root[root.count - 1]
    let gain = first / (first - last)
    root = root.map { ($0 - last) * gain }
    let alphasBar = root.map { $0 * $0 }
    var alphas = [alphasBar[0]]
    for i in 1..<alphasBar.count { alphas.append(alphasBar[i] / alphasBar[i - 1]) }
    return alphas.map { 1 - $0 }
}

// MARK: - numpy, as diffusers' set_timesteps uses it (float64 unless said otherwise)

/// numpy.linspace(start, stop, count): i·step + start, the last value exactly `stop`.
func numpyLinspace(_ start: Double, _ stop: Double, _ count: Int) -> [Double] {
    guard count > 1 else { return count == 1 ? [start] : [] }
    let step = (stop - start) / Double(count - 1)
    var values = (0..<count).map { Double($0) * step + start }
    values[count - 1] = stop
    return values
}

/// numpy.arange(start, stop, step) for floats: ⌈(stop − start)/step⌉ values start + i·δ, where δ is
/// (start + step) − start as numpy fills the array.
func numpyArange(_ start: Double, _ stop: Double, _ step: Double) -> [Double] {
    let count = max(0, Int(((stop - start) / step).rounded(.up)))
    let second = start + step, delta = second - start
    return (0..<count).map { i in i == 0 ? start : i == 1 ? second : start + Double(i) * delta }
}

/// numpy.round: halves to even.
func numpyRound(_ value: Double) -> Double { value.rounded(.toNearestOrEven) }

/// numpy.interp(x, arange(table.count), table) for x inside the table's range, in double.
func numpyInterp(_ x: Double, _ table: [Float]) -> Double {
    let last = table.count - 1
    if x <= 0 { return Double(table[0]) }
    if x >= Double(last) { return Double(table[last]) }
    let j = Int(x.rounded(.down))
    let slope = Double(table[j + 1]) - Double(table[j])   // over xp[j+1] − xp[j] = 1
    return slope * (x - Double(j)) + Double(table[j])
}

// MARK: - Sigma schedules shared by the Euler and DPM-Solver schedulers

/// diffusers' `_convert_to_karras`: ρ = 7 noise levels from σ_max down to σ_min (Karras et al. 2022, eq. 5).
func karrasSigmas(sigmaMin: Double, sigmaMax: Double, count: Int) -> [Double] {
    let rho = 7.0
    let minInvRho = pow(sigmaMin, 1 / rho), maxInvRho = pow(sigmaMax, 1 / rho)
    return numpyLinspace(0, 1, count).map { pow(maxInvRho + $0 * (minInvRho - maxInvRho), rho) }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose σ is `sigma`, interpolating linearly in
/// log σ. `logSigmas` is float32 (numpy's log of the float32 sigma table), and diffusers' denominator
/// `low − high` is a float32 subtraction; both are kept.
func timestep(forSigma sigma: Double, logSigmas: [Float]) -> Double {
    let logSigma = log(max(sigma, 1e-10))
    // The last table entry not above log σ (the table ascends), leaving room for the one after it.
    var low = 0
    for (i, value) in logSigmas.enumerated() where Double(value) <= logSigma { low = i }
    low = min(low, logSigmas.count - 2)
    let lowLog = logSigmas[low], highLog = logSigmas[low + 1]
    let weight = min(max((Double(lowLog) - logSigma) / Double(lowLog - highLog), 0), 1)
    return (1 - weight) * Double(low) + weight * Double(low + 1)
}

/// The float32 log σ table that `timestep(forSigma:logSigmas:)` searches.
func logSigmaTable(_ sigmas: [Float]) -> [Float] { sigmas.map { Float(log(Double($0))) } }

// MARK: - Step arithmetic

/// Σ cᵢ·xᵢ with the tensors' backend ops; the coefficients are computed on the host in double and applied
/// in float32, as diffusers applies its scalar coefficients to float32 latents.
func linearCombination(_ terms: [(Double, Tensor)]) throws -> Tensor {
    precondition(!terms.isEmpty, "linearCombination of nothing")
    let backend = terms[0].1.backend
    func scaled(_ term: (Double, Tensor)) throws -> Tensor {
        term.0 == 1 ? term.1 : try backend.scale(term.1, by: Float(term.0))
    }
    var sum = try scaled(terms[0])
    for term in terms.dropFirst() {
        sum = try backend.add(sum, scaled(term))
    }
    return sum
}

/// x / divisor as torch divides a float32 tensor by a 0-d float32 tensor: a true division, not a product
/// with 1/divisor, which can differ in the last bit. The Euler steps need this: at a large σ they add and
/// cancel terms of size σ, so a last-bit difference in x/σ shows in the result.
func divided(_ x: Tensor, by divisor: Float) throws -> Tensor {
    let backend = x.backend
    return try backend.div(x, backend.upload([divisor], shape: [1]))
}

/// Checks that `setTimesteps` was given a usable count.
func checkStepCount(_ steps: Int, trainTimesteps: Int, scheduler: String) throws {
    guard steps >= 1, steps <= trainTimesteps else {
        throw PEAError.usage("\(scheduler): the number of inference steps must be between 1 and num_train_timesteps (\(trainTimesteps)), got \(steps)")
    }
}
