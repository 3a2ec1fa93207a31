/// The training half of diffusers' `DDPMScheduler`: the forward process that noises latents at a timestep
/// per sample (`add_noise`), and the v-prediction target (`get_velocity`). PEA's distillation builds its
/// noisy latents with it, as the official code does with `DDPMScheduler.from_pretrained(…, "scheduler")`.
/// Sampling with DDPM is not implemented.
///
/// Config keys: the shared beta keys (`linear`, `scaled_linear`, `squaredcos_cap_v2`, `trained_betas`),
/// `rescale_betas_zero_snr`, `prediction_type` (which training target the model learns).
public struct DDPMScheduler {
    public static let className = "DDPMScheduler"

    let schedule: TrainingNoiseSchedule
    public let predictionType: PredictionType

    public init(config file: ConfigFile) throws {
        let config = SchedulerConfig(file)
        schedule = try TrainingNoiseSchedule(config, readsZeroSNR: true)
        predictionType = PredictionType(rawValue: try config.choice("prediction_type", default: "epsilon",
                                                                    allowed: ["epsilon", "v_prediction", "sample"]))!
    }

    /// T: training timesteps are drawn from 0..<trainTimesteps.
    public var trainTimesteps: Int { schedule.count }

    /// ᾱ_t for every training timestep (float32, as diffusers holds them).
    public var alphasCumprod: [Float] { schedule.alphasCumprod }

    /// x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, with `timesteps[b]` for sample b of the batch (dimension 0).
    public func addNoise(original: Tensor, noise: Tensor, timesteps: [Int]) throws -> Tensor {
        let (signal, noiseLevel) = try perSampleCoefficients(timesteps, like: original)
        let backend = original.backend
        return try backend.add(backend.mul(signal, original), backend.mul(noiseLevel, noise))
    }

    /// v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀ (Salimans & Ho, "Progressive Distillation"), the v_prediction target.
    public func velocity(sample: Tensor, noise: Tensor, timesteps: [Int]) throws -> Tensor {
        let (signal, noiseLevel) = try perSampleCoefficients(timesteps, like: sample)
        let backend = sample.backend
        return try backend.sub(backend.mul(signal, noise), backend.mul(noiseLevel, sample))
    }

    /// What a model with this `prediction_type` is trained to output: ε, v, or x₀.
    public func trainingTarget(sample: Tensor, noise: Tensor, timesteps: [Int]) throws -> Tensor {
        switch predictionType {
        case .epsilon: return noise
        case .vPrediction: return try velocity(sample: sample, noise: noise, timesteps: timesteps)
        case .sample: return sample
        }
    }

    /// √ᾱ_t and √(1 − ᾱ_t) per sample, shaped [B, 1, 1, …] to broadcast over `like`. diffusers computes both
    /// in float32 from the float32 ᾱ table; a float32 square root of a float32 value is what this rounds to.
    private func perSampleCoefficients(_ timesteps: [Int], like x: Tensor) throws -> (Tensor, Tensor) {
        guard x.rank >= 1, timesteps.count == x.shape[0] else {
            throw PEAError.shapeMismatch("\(Self.className): \(timesteps.count) timesteps for a batch of shape \(x.shape)")
        }
        for t in timesteps where !(0..<schedule.count).contains(t) {
            throw PEAError.usage("\(Self.className): timestep \(t) is outside 0..<\(schedule.count)")
        }
        let shape = [timesteps.count] + Array(repeating: 1, count: x.rank - 1)
        let coefficients = timesteps.map(schedule.forwardCoefficients)
        let backend = x.backend
        return (try backend.upload(coefficients.map(\.signal), shape: shape),
                try backend.upload(coefficients.map(\.noise), shape: shape))
    }
}
