#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// torch's CPU random number generator, bit for bit: `torch.Generator("cpu").manual_seed(seed)` followed by
/// any sequence of `torch.randn(shape, generator=g, dtype=torch.float32)` calls gives the same floats as
/// the same sequence of `randn(shape)` calls here. The diffusers pipelines draw their initial latents (and
/// the ancestral samplers their per-step noise) this way, so a seed means the same image in both.
///
/// What it reproduces (ATen sources: core/MT19937RNGEngine.h, CPUGeneratorImpl.cpp, core/DistributionsHelper.h,
/// core/TransformationHelper.h, native/cpu/DistributionTemplates.h, native/cpu/avx_mathfun.h):
/// - The engine is MT19937 seeded with the low 32 bits of the seed (seeds 5 and 2³²+5 give one stream).
///   `random()` is one 32-bit output; `random64()` is two, the first in the high half.
/// - Uniform floats are `(random() & (2²⁴−1)) · 2⁻²⁴`; uniform doubles `(random64() & (2⁵³−1)) · 2⁻⁵³`.
/// - Tensors of 16 elements or more take torch's vectorised `normal_fill` path. First one uniform float per
///   element is drawn, in order; then every block of 16 turns into normals by Box–Muller, element j of the
///   block paired with element j+8: `r = √(−2·log(1−u[j]))`, `θ = 2π·u[j+8]`, `u[j] ← r·cos θ`,
///   `u[j+8] ← r·sin θ`. When the count n is not a multiple of 16, 16 *more* uniforms are then drawn into
///   the last 16 elements (overwriting normals of the last full block too) and transformed as one block.
///   So such a draw consumes n + 16 engine outputs, and its last 16 values come from the extra uniforms.
///   log, sin and cos are not libm's: torch's x86-64 builds run the AVX2 kernel with the Cephes-derived
///   polynomials of avx_mathfun.h, compiled by GCC with multiply–add contraction (the AVX-512 build
///   dispatches this op to the AVX2 kernel too). We evaluate the same polynomials lane by lane with the
///   same fused multiply–adds, which is what makes the results bit-identical.
/// - Tensors of fewer than 16 elements take the scalar path: `normal_distribution<double>`. Each new pair
///   draws two uniform doubles u1, u2 and returns `r·cos θ` with `r = √(−2·log1p(−u2))`, `θ = 2π·u1`
///   (libm, in double), rounded to float; `r·sin θ` is *cached in the generator* and returned by the next
///   scalar-path draw, even one in a later `randn` call. The vectorised path neither uses nor clears it.
///   Each new pair consumes 4 engine outputs (two `random64()`).
///
/// Caveats: torch builds without AVX2 (ARM, including Apple silicon) use libm's float log/sin/cos in the
/// vectorised path, so their `randn` can differ from this one in the last bit of some elements. The scalar
/// path calls the platform's libm, as torch does: bit-identical where both use the same one (glibc on Linux).
public struct TorchGenerator {
    /// The seed as given (torch keeps all 64 bits; only the low 32 reach the engine).
    public let seed: UInt64
    private var engine: MersenneTwister19937
    /// Box–Muller's second value from the scalar (< 16 elements) path, waiting for the next scalar draw.
    private var cachedDoubleNormal: Double?

    public init(seed: UInt64) {
        self.seed = seed
        engine = MersenneTwister19937(seed: UInt32(truncatingIfNeeded: seed))
        cachedDoubleNormal = nil
    }

    /// One 32-bit output of the engine (torch's `CPUGeneratorImpl::random`).
    public mutating func random() -> UInt32 { engine.next() }

    /// Two engine outputs, the first as the high half (torch's `CPUGeneratorImpl::random64`).
    public mutating func random64() -> UInt64 {
        let high = UInt64(engine.next())
        let low = UInt64(engine.next())
        return high << 32 | low
    }

    /// Standard normal values for a tensor of `shape`, in row-major order, exactly as torch.randn draws them.
    public mutating func randn(_ shape: [Int]) -> [Float] {
        precondition(shape.allSatisfy { $0 >= 0 }, "TorchGenerator.randn: negative dimension in \(shape)")
        let count = shape.reduce(1, *)
        if count >= 16 { return vectorisedNormals(count) }
        return (0..<count).map { _ in Float(scalarNormal()) }
    }

    /// `randn(shape)` uploaded to `backend` as an f32 tensor.
    public mutating func randnTensor(_ shape: [Int], backend: any ComputeBackend) throws -> Tensor {
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw PEAError.shapeMismatch("randn: negative dimension in \(shape)")
        }
        return try backend.upload(randn(shape), shape: shape)
    }

    // MARK: - The two paths of torch's normal_kernel

    /// torch's `normal_fill_AVX2` with mean 0 and std 1.
    private mutating func vectorisedNormals(_ count: Int) -> [Float] {
        var values = [Float](repeating: 0, count: count)
        for index in 0..<count { values[index] = uniformFloat() }
        var start = 0
        while start + 16 <= count {
            Self.boxMullerBlock(&values, start: start)
            start += 16
        }
        if count % 16 != 0 {
            // torch redraws the last 16 (not just the leftover ones) and transforms them as a block.
            let tailStart = count - 16
            for index in tailStart..<count { values[index] = uniformFloat() }
            Self.boxMullerBlock(&values, start: tailStart)
        }
        return values
    }

    /// torch's `normal_fill_16_AVX2`: 16 uniforms in place → 16 normals, pairing element j with j+8.
    private static func boxMullerBlock(_ values: inout [Float], start: Int) {
        // _mm256_set1_ps(2.0f * c10::pi<double>): the product is a double, rounded once to float.
        let twoPi = Float(2.0 * Double.pi)
        let mean: Float = 0, std: Float = 1
        for j in start..<(start + 8) {
            let u1 = 1 - values[j]  // [0, 1) → (0, 1], so the log is finite
            let u2 = values[j + 8]
            let radius = (-2 * CephesFloat.log(u1)).squareRoot()
            let (sine, cosine) = CephesFloat.sinCos(twoPi * u2)
            // torch stores fmadd(n, std, mean); with mean +0 this also turns a −0 into +0.
            values[j] = mean.addingProduct(radius * cosine, std)
            values[j + 8] = mean.addingProduct(radius * sine, std)
        }
    }

    /// torch's `normal_distribution<double>` with mean 0 and std 1, including its cached second value.
    private mutating func scalarNormal() -> Double {
        let mean = 0.0, std = 1.0
        if let cached = cachedDoubleNormal {
            cachedDoubleNormal = nil
            return cached * std + mean
        }
        let u1 = uniformDouble()
        let u2 = uniformDouble()
        let radius = (-2.0 * log1p(-u2)).squareRoot()
        let theta = 2.0 * Double.pi * u1
        cachedDoubleNormal = radius * sin(theta)
        return radius * cos(theta) * std + mean
    }

    private mutating func uniformFloat() -> Float {
        Float(random() & 0xFF_FFFF) * 0x1p-24
    }

    private mutating func uniformDouble() -> Double {
        Double(random64() & 0x1F_FFFF_FFFF_FFFF) * 0x1p-53
    }
}

/// The MT19937 engine as torch seeds and steps it (`at::mt19937`): the reference algorithm of Matsumoto and
/// Nishimura, with the whole state regenerated every 624 outputs.
struct MersenneTwister19937 {
    private static let stateSize = 624
    private static let shift = 397
    private static let matrixA: UInt32 = 0x9908_B0DF

    private var state: [UInt32]
    /// Index of the next state word to temper; `stateSize` means the state must be regenerated first.
    private var nextIndex: Int

    init(seed: UInt32) {
        state = [UInt32](repeating: 0, count: Self.stateSize)
        state[0] = seed
        for index in 1..<Self.stateSize {
            let previous = state[index - 1]
            state[index] = 1_812_433_253 &* (previous ^ (previous >> 30)) &+ UInt32(index)
        }
        // torch seeds with left = 1: the very first output already regenerates the state.
        nextIndex = Self.stateSize
    }

    mutating func next() -> UInt32 {
        if nextIndex == Self.stateSize { regenerate() }
        var y = state[nextIndex]
        nextIndex += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y
    }

    private mutating func regenerate() {
        let n = Self.stateSize
        for index in 0..<n {
            let following = state[(index + 1) % n]
            let mixed = (state[index] & 0x8000_0000) | (following & 0x7FFF_FFFF)
            state[index] = state[(index + Self.shift) % n] ^ (mixed >> 1) ^ (following & 1 == 1 ? Self.matrixA : 0)
        }
        nextIndex = 0
    }
}

/// The float log and sine/cosine of torch's `avx_mathfun.h` (Cephes polynomials, after Pommier's
/// sse_mathfun), one lane at a time. Every `a * b + c` that GCC contracts into one fused multiply–add in
/// torch's build is an `addingProduct` here; the other operations round after each step, as the vector
/// instructions do. Changing either changes the last bit of some results.
enum CephesFloat {
    /// Natural log for x in (0, 1] (what Box–Muller feeds it). avx_mathfun's NaN for x ≤ 0 is not needed.
    static func log(_ input: Float) -> Float {
        // Split x = m · 2^e with m in [0.5, 1); denormals are first clamped to the smallest normal float.
        var x = max(input, Float.leastNormalMagnitude)
        let bits = x.bitPattern
        var exponent = Float(Int32(bitPattern: bits >> 23) - 0x7F) + 1
        x = Float(bitPattern: (bits & ~0x7F80_0000) | Float(0.5).bitPattern)
        // Keep m near 1: if m < √½, use 2m and e − 1. The additions are exact selections of x or 0.
        let belowHalfRoot = x < 0.707106781186547524
        let doubled: Float = belowHalfRoot ? x : 0
        x = x - 1
        exponent = exponent - (belowHalfRoot ? 1 : 0)
        x = x + doubled

        let z = x * x
        var y: Float = 7.0376836292E-2
        for coefficient: Float in [-1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1, 1.4249322787E-1,
                                   -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1, 3.3333331174E-1] {
            y = coefficient.addingProduct(y, x)
        }
        y = y * x
        // log(2) split in two parts (q2 + q1) so that e·log 2 keeps its precision.
        let log2Low: Float = -2.12194440e-4, log2High: Float = 0.693359375
        y = (exponent * log2Low).addingProduct(y, z)
        y = y.addingProduct(-z, 0.5)
        x = x + y
        return x.addingProduct(exponent, log2High)
    }

    /// sin and cos of x ≥ 0 below 2²³ (Box–Muller's θ is in [0, 2π)), from one range reduction.
    static func sinCos(_ input: Float) -> (sin: Float, cos: Float) {
        let signMask: UInt32 = 0x8000_0000
        var x = input.magnitude
        // j = the octant, rounded up to even: x is reduced to [−π/4, π/4] around j·π/4.
        var octant = Int32(x * 1.27323954473516)  // 4/π; truncation as _mm256_cvttps_epi32
        octant = (octant + 1) & ~1
        let y = Float(octant)
        var sinSign = input.bitPattern & signMask
        sinSign ^= UInt32(bitPattern: octant & 4) << 29
        let cosSign = UInt32(bitPattern: ~(octant - 2) & 4) << 29
        let usesSinPolynomialForSin = octant & 2 == 0

        // Cody–Waite reduction with π/4 split in three parts: x − y·π/4 in extended precision.
        x = x.addingProduct(y, -0.78515625)
        x = x.addingProduct(y, -2.4187564849853515625e-4)
        x = x.addingProduct(y, -3.77489497744594108e-8)

        let z = x * x
        var cosPolynomial: Float = 2.443315711809948E-005
        cosPolynomial = Float(-1.388731625493765E-003).addingProduct(cosPolynomial, z)
        cosPolynomial = Float(4.166664568298827E-002).addingProduct(cosPolynomial, z)
        cosPolynomial = cosPolynomial * z
        cosPolynomial = (-(z * 0.5)).addingProduct(cosPolynomial, z)
        cosPolynomial = cosPolynomial + 1

        var sinPolynomial: Float = -1.9515295891E-4
        sinPolynomial = Float(8.3321608736E-3).addingProduct(sinPolynomial, z)
        sinPolynomial = Float(-1.6666654611E-1).addingProduct(sinPolynomial, z)
        sinPolynomial = sinPolynomial * z
        sinPolynomial = x.addingProduct(sinPolynomial, x)

        // The vector code selects with masks and adds the unselected +0 (which turns −0 into +0).
        let sinValue = (usesSinPolynomialForSin ? 0 : cosPolynomial) + (usesSinPolynomialForSin ? sinPolynomial : 0)
        let cosValue = (usesSinPolynomialForSin ? cosPolynomial : 0) + (usesSinPolynomialForSin ? 0 : sinPolynomial)
        return (Float(bitPattern: sinValue.bitPattern ^ sinSign), Float(bitPattern: cosValue.bitPattern ^ cosSign))
    }
}
