/// A small, fast, seedable generator (SplitMix64) for test data and benchmarks. Not torch's generator.
public struct SplitMix64 {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    public mutating func uniform() -> Float { Float(next() >> 40) * 0x1p-24 }

    /// Approximately standard normal values (sum of four uniforms, rescaled): cheap and good enough for data.
    public mutating func normals(_ count: Int) -> [Float] {
        (0..<count).map { _ in (uniform() + uniform() + uniform() + uniform() - 2) * 1.7320508 }
    }
}
