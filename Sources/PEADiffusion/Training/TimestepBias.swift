/// Which training timesteps a step samples more often — diffusers' `--timestep_bias_strategy` (its SDXL
/// text-to-image script's `generate_timestep_weights`): every timestep has weight 1, the biased ones
/// `multiplier`, and timesteps are drawn in proportion to their weights.
///
/// - `later`: the last ⌊portion · T⌋ timesteps (the noisiest), `earlier`: the first ⌊portion · T⌋,
///   `range`: [begin, end). `none` (multiplier 1) is uniform sampling.
///
/// Why a distiller wants it: the KD losses compare ε-predictions, and an ε error at timestep t moves the predicted
/// image by √((1 − ᾱ_t)/ᾱ_t) times as much, so the loss hardly sees the high-noise steps where a sampler fixes
/// the layout and colour of the picture. Sampling them more often gives those decisions more of the gradient.
public struct TimestepBias: Equatable, Sendable {
    public enum Strategy: String, CaseIterable, Sendable { case none, earlier, later, range }

    public var strategy: Strategy = .none
    public var multiplier: Double = 1
    public var portion: Double = 0.25
    public var begin = 0
    public var end = 1000

    public init(strategy: Strategy = .none, multiplier: Double = 1, portion: Double = 0.25, begin: Int = 0, end: Int = 1000) {
        self.strategy = strategy
        self.multiplier = multiplier
        self.portion = portion
        self.begin = begin
        self.end = end
    }

    /// True when every timestep is equally likely (the official scripts' sampling).
    public var isUniform: Bool { strategy == .none || multiplier == 1 || biasedRange(of: 1000).isEmpty }

    /// The biased timesteps among `count`, as diffusers slices them.
    func biasedRange(of count: Int) -> Range<Int> {
        let biased = Int(portion * Double(count))
        switch strategy {
        case .none: return 0..<0
        case .later: return (count - min(biased, count))..<count
        case .earlier: return 0..<min(biased, count)
        case .range: return max(0, begin)..<max(max(0, begin), min(count, end))
        }
    }

    /// The timestep for a uniform draw u ∈ [0, 1) among `count`: ⌊u · count⌋ when uniform, otherwise the inverse
    /// of the weights' cumulative distribution at u.
    public func timestep(forUniform u: Float, count: Int) -> Int {
        if isUniform { return min(Int(u * Float(count)), count - 1) }
        let biased = biasedRange(of: count)
        // Weights scaled so the larger is 1: the same distribution, and no overflow for a huge multiplier.
        let plain = 1 / max(1, multiplier), heavy = multiplier / max(1, multiplier)
        let total = plain * Double(count - biased.count) + heavy * Double(biased.count)
        var remaining = Double(u) * total
        // Three runs of equal weight: [0, lower), the biased run, [upper, count).
        for (run, weight) in [(0..<biased.lowerBound, plain), (biased, heavy), (biased.upperBound..<count, plain)] {
            let mass = Double(run.count) * weight
            if remaining < mass { return min(run.lowerBound + Int(remaining / weight), run.upperBound - 1) }
            remaining -= mass
        }
        return count - 1
    }
}
