import CKernels
import XCTest
@testable import PEADiffusion

/// Finite-difference checks of every backward op (docs/testing.md: "every backward op also passes a
/// finite-difference check"). The reference is the backend's own forward op, differentiated numerically.
///
/// Method. For an op f and a fixed random r, the scalar L(x) = Σ r ⊙ f(x) is accumulated in Double on the
/// host; its analytic gradient is the backward op applied to r. On small shapes every element i is checked
/// by central differences D(h) = (L(x + h·eᵢ) − L(x − h·eᵢ)) / 2h; on larger ones random directions v are,
/// <g, v> against (L(x + h·v) − L(x − h·v)) / 2h. Element steps are the ones f32 can represent
/// (fl(x + h) − fl(x − h), computed in Double), so rounding the perturbed input adds no error.
///
/// Step and tolerance. The central differences at h and h/2 are Richardson-extrapolated, (4·D(h/2) − D(h))/3,
/// which cancels the h² truncation term (plain central differences at h = 1e-2 were measured 4e-4 off on a
/// peaked softmax, shrinking 4× per halving of h: truncation, not a bug). What is left is the f32 rounding of
/// the forward's outputs, divided by h, so h is large: h = 4e-2 × the scale of x (inputs are ~N(0, 1)·scale).
/// The check is
///     max_i |numeric_i − analytic_i|  ≤  2e-4 · max_i |analytic_i|,
/// about eight times above the largest error measured on the CPU (2.5e-5), and fifty times below an error of
/// 1% of the gradient's largest element; an element wrong by 1% of its own value fails whenever it is at
/// least 2% of the largest. Each check proves it is not vacuous: the same comparison must reject the analytic
/// gradient scaled by 1.01 and (element checks) the analytic gradient with its largest element 1% larger.
///
/// The checks take `any ComputeBackend`, so that other test files can run them on other backends:
/// `checkBackwardOps(on:)` and `checkComposedBackward(on:)`. PEA_FD_VERBOSE=1 prints each check's error.
final class BackwardOpTests: XCTestCase {
    func testBackwardOpsPassFiniteDifferenceChecksOnCPU() throws {
        try checkBackwardOps(on: CPUBackend())
    }

    /// The same with the convolution's data gradient made a band of one output row at a time (as large images are).
    func testBackwardOpsPassWithOneRowConvolutionBands() throws {
        ck_conv2d_set_band_floats(1)
        defer { ck_conv2d_set_band_floats(0) }
        try checkBackwardOps(on: CPUBackend())
    }

    func testAttentionBackwardAndSumToShapePassFiniteDifferenceChecksOnCPU() throws {
        try checkComposedBackward(on: CPUBackend())
    }

    func testLayerNormParameterGradientsDoNotDependOnThreadCount() throws {
        defer { ck_set_num_threads(0) }
        var results: [[Float]] = []
        for threads in [1, 3] {
            let backend = CPUBackend(threads: threads)
            var random = SplitMix64(seed: 77)
            let x = try backend.upload(random.normals(300 * 200), shape: [300, 200])
            let dy = try backend.upload(random.normals(300 * 200), shape: [300, 200])
            let w = try backend.upload(random.normals(200), shape: [200])
            let g = try backend.layerNormBackward(dy, input: x, weight: w, eps: 1e-5, parameterGradients: true)
            results.append(try backend.downloadFloats(g.weight!) + backend.downloadFloats(g.bias!) + backend.downloadFloats(g.input))
        }
        XCTAssertEqual(results[0], results[1])
    }

    func testBackwardShapeErrorsNameTheOp() throws {
        let backend = CPUBackend()
        let x = try backend.zeros([1, 3, 8, 8], dtype: .f32), w = try backend.zeros([4, 3, 3, 3], dtype: .f32)
        func assertThrows(_ fragment: String, _ body: () throws -> Any, line: UInt = #line) {
            do {
                _ = try body()
                XCTFail("expected an error mentioning '\(fragment)'", line: line)
            } catch {
                XCTAssertTrue("\(error)".contains(fragment), "'\(error)' does not mention '\(fragment)'", line: line)
            }
        }
        assertThrows("conv2dBackwardData: gradOutput must have the forward output's shape [1, 4, 8, 8]") {
            try backend.conv2dBackwardData(backend.zeros([1, 4, 7, 8], dtype: .f32), weight: w, inputShape: [1, 3, 8, 8],
                                           stride: (1, 1), padding: .uniform(1))
        }
        assertThrows("conv2dBackwardData: conv2d: input has 2 channels") {
            try backend.conv2dBackwardData(backend.zeros([1, 4, 8, 8], dtype: .f32), weight: w, inputShape: [1, 2, 8, 8],
                                           stride: (1, 1), padding: .uniform(1))
        }
        assertThrows("groupNormBackward: 3 channels cannot be split into 2 groups") {
            try backend.groupNormBackward(x, input: x, groups: 2, weight: nil, bias: nil, eps: 1e-5, fuseSiLU: false)
        }
        assertThrows("layerNormBackward: weight must have shape [8]") {
            try backend.layerNormBackward(x, input: x, weight: backend.zeros([7], dtype: .f32), eps: 1e-5, parameterGradients: true)
        }
        assertThrows("softmaxBackward: gradOutput must have") { try backend.softmaxBackward(backend.zeros([2, 3], dtype: .f32), output: x) }
        assertThrows("activationBackward: gradOutput must have") {
            try backend.activationBackward(backend.zeros([3], dtype: .f32), input: x, .silu)
        }
        assertThrows("activationBackward: quickGELU") { try backend.activationBackward(x, input: x, .quickGELU) }
        assertThrows("gegluBackward: gradOutput must have the forward output's shape [1, 3, 8, 4]") {
            try backend.gegluBackward(x, input: x)
        }
        assertThrows("upsampleNearest2xBackward: gradOutput [1, 3, 8, 7]") {
            try backend.upsampleNearest2xBackward(backend.zeros([1, 3, 8, 7], dtype: .f32))
        }
        let q = try backend.zeros([2, 5, 6], dtype: .f32)
        assertThrows("attentionBackward: gradOutput must have") {
            try backend.attentionBackward(backend.zeros([2, 5, 4], dtype: .f32), q: q, k: q, v: q, heads: 2, scale: nil)
        }
        assertThrows("sumToShape: [4, 1] does not broadcast") { try backend.sumToShape(x, [4, 1]) }
    }
}

// MARK: - the checks, for any backend

/// h relative to the scale of x, and the tolerance relative to the gradient's largest element (see above).
let finiteDifferenceStep: Float = 4e-2
let finiteDifferenceTolerance = 2e-4

/// Every backward op of the protocol against finite differences of its forward op.
func checkBackwardOps(on backend: any ComputeBackend, file: StaticString = #filePath, line: UInt = #line) throws {
    let c = GradientChecker(backend: backend, file: file, line: line)

    // conv2d: 3×3 padded; the VAE's stride-2 downsampler with (top 0, bottom 1, left 0, right 1) padding;
    // an uneven kernel, stride and padding; 1×1 (the plain GEMM path); and a larger case by directions.
    try c.conv2d(input: [2, 3, 7, 9], weight: [5, 3, 3, 3], stride: (1, 1), padding: .uniform(1))
    try c.conv2d(input: [1, 3, 7, 9], weight: [4, 3, 3, 3], stride: (2, 2), padding: Padding2D(top: 0, bottom: 1, left: 0, right: 1))
    try c.conv2d(input: [1, 2, 6, 7], weight: [3, 2, 3, 2], stride: (1, 2), padding: Padding2D(top: 2, bottom: 0, left: 1, right: 1))
    try c.conv2d(input: [2, 6, 5, 7], weight: [5, 6, 1, 1], stride: (1, 1), padding: .uniform(0))
    try c.conv2d(input: [2, 16, 17, 13], weight: [12, 16, 3, 3], stride: (2, 2), padding: .uniform(1), directions: 6)

    // group norm: 4 groups of 3 channels, with γ/β, with and without the fused SiLU, and without γ/β;
    // then SD-like 32 groups by directions.
    try c.groupNorm(input: [2, 12, 3, 5], groups: 4, affine: true, fuseSiLU: false)
    try c.groupNorm(input: [2, 12, 3, 5], groups: 4, affine: true, fuseSiLU: true)
    try c.groupNorm(input: [2, 12, 3, 5], groups: 4, affine: false, fuseSiLU: true)
    try c.groupNorm(input: [1, 12, 7], groups: 3, affine: false, fuseSiLU: false)
    try c.groupNorm(input: [2, 64, 9, 11], groups: 32, affine: true, fuseSiLU: true, directions: 6)

    // layer norm: dx, dγ, dβ; without γ; a larger case (several threads over rows and columns).
    try c.layerNorm(input: [3, 4, 7], affine: true)
    try c.layerNorm(input: [5, 9], affine: false)
    try c.layerNorm(input: [150, 130], affine: true, directions: 6)

    try c.softmax(input: [3, 4, 7], scale: 2)
    try c.softmax(input: [40, 33], scale: 3, directions: 6)

    for kind in Activation.allCases {
        try c.activation(kind, input: [5, 13], scale: 2.5)
    }
    try c.geglu(input: [2, 3, 10], scale: 2)
    try c.upsample(input: [2, 3, 4, 5])
}

/// attentionBackward (self- and cross-attention, several heads, head widths that are not powers of two; the
/// backend's own, and the composed one chunked) and sumToShape against finite differences.
func checkComposedBackward(on backend: any ComputeBackend, file: StaticString = #filePath, line: UInt = #line) throws {
    let c = GradientChecker(backend: backend, file: file, line: line)
    try c.attention(batch: 2, queries: 5, keys: 5, heads: 2, headDim: 3, valueHeadDim: 3, scale: nil)
    try c.attention(batch: 2, queries: 6, keys: 4, heads: 3, headDim: 3, valueHeadDim: 5, scale: 0.7)
    // a score budget of 4 heads' matrices: B·H = 6 heads in chunks of 4 and 2
    try c.attention(batch: 2, queries: 6, keys: 4, heads: 3, headDim: 5, valueHeadDim: 3, scale: nil, chunkBytes: 4 * 6 * 4 * 4)

    try c.sumToShape(full: [2, 3, 4, 5], reduced: [3, 1, 5])
    try c.sumToShape(full: [2, 3, 4, 5], reduced: [5])
    try c.sumToShape(full: [2, 3, 4, 5], reduced: [1, 3, 1, 1])
    try c.sumToShape(full: [2, 3, 4, 5], reduced: [4, 1])
    try c.sumToShape(full: [2, 3, 4, 5], reduced: [1])
    try c.sumToShape(full: [2, 3, 4, 5], reduced: [2, 3, 4, 5])
}

/// The finite-difference machinery: build L(x) = Σ r ⊙ f(x), compare the backward op's gradient with
/// central differences, and prove that the comparison rejects a gradient 1% off.
struct GradientChecker {
    let backend: any ComputeBackend
    let file: StaticString
    let line: UInt

    private func random(_ count: Int, seed: UInt64, scale: Float = 1, offset: Float = 0) -> [Float] {
        var generator = SplitMix64(seed: seed)
        return generator.normals(count).map { $0 * scale + offset }
    }

    private func upload(_ values: [Float], _ shape: [Int]) throws -> Tensor { try backend.upload(values, shape: shape) }

    /// Σ r ⊙ y in Double.
    private func dot(_ r: [Float], _ y: Tensor) throws -> Double {
        let values = try backend.downloadFloats(y)
        precondition(values.count == r.count, "weights and outputs differ in size")
        var sum = 0.0
        for i in values.indices { sum += Double(r[i]) * Double(values[i]) }
        return sum
    }

    /// The derivative from central differences D(t) at steps h and h/2, extrapolated: (4·D(h/2) − D(h)) / 3
    /// cancels the h² term of the truncation error.
    private func richardson(_ h: Float, _ difference: (Float) throws -> Double) rethrows -> Double {
        let coarse = try difference(h), fine = try difference(h / 2)
        return (4 * fine - coarse) / 3
    }

    /// Checks `analytic` (the gradient of `loss` at x) against central differences: every element, or
    /// `directions` random directions when that is non-zero.
    func check(_ what: String, at x: [Float], scale: Float, analytic: [Float], directions: Int = 0,
               loss: ([Float]) throws -> Double) rethrows {
        XCTAssertEqual(analytic.count, x.count, "\(what): gradient size", file: file, line: line)
        guard analytic.count == x.count else { return }
        let h = finiteDifferenceStep * scale
        var expected: [Double] = []
        let project: ([Double]) -> [Double]
        if directions == 0 {
            var probe = x
            for i in x.indices {
                // the step f32 actually took: fl(x + t) − fl(x − t)
                expected.append(try richardson(h) { t in
                    let plus = x[i] + t, minus = x[i] - t
                    probe[i] = plus
                    let lp = try loss(probe)
                    probe[i] = minus
                    let lm = try loss(probe)
                    probe[i] = x[i]
                    return (lp - lm) / (Double(plus) - Double(minus))
                })
            }
            project = { $0 }
        } else {
            var vs: [[Float]] = []
            for k in 0..<directions {
                let v = random(x.count, seed: 0xD1EC + UInt64(k))
                vs.append(v)
                expected.append(try richardson(h) { t in
                    let plus = zip(x, v).map { $0 + t * $1 }, minus = zip(x, v).map { $0 - t * $1 }
                    return (try loss(plus) - loss(minus)) / (2 * Double(t))
                })
            }
            project = { g in vs.map { v in zip(g, v).reduce(0.0) { $0 + $1.0 * Double($1.1) } } }
        }
        assertMatches(what, analytic: analytic.map(Double.init), expected: expected, project: project, elementwise: directions == 0)
    }

    /// max |project(g) − expected| ≤ tolerance · max |project(g)| for the analytic gradient g; and, so that
    /// the check is not vacuous, the same comparison must fail for g scaled by 1.01 and (element checks) for
    /// g with its largest element 1% larger.
    private func assertMatches(_ what: String, analytic g: [Double], expected: [Double], project: ([Double]) -> [Double],
                               elementwise: Bool) {
        func error(_ gradient: [Double]) -> Double {
            let a = project(gradient)
            let scale = a.map(abs).max() ?? 0
            let worst = zip(a, expected).map { abs($0 - $1) }.max() ?? 0
            return scale > 0 ? worst / scale : .infinity
        }
        let e = error(g)
        XCTAssertLessThanOrEqual(e, finiteDifferenceTolerance,
                                 "\(what): gradient differs from finite differences (max error \(e) of the largest)",
                                 file: file, line: line)
        if ProcessInfo.processInfo.environment["PEA_FD_VERBOSE"] != nil { print("FD \(e) \(what)") }
        XCTAssertGreaterThan(error(g.map { $0 * 1.01 }), finiteDifferenceTolerance,
                             "\(what): the check accepts a gradient scaled by 1.01", file: file, line: line)
        if elementwise, let largest = g.indices.max(by: { abs(g[$0]) < abs(g[$1]) }) {
            var one = g
            one[largest] *= 1.01
            XCTAssertGreaterThan(error(one), finiteDifferenceTolerance,
                                 "\(what): the check accepts a gradient with one element 1% off", file: file, line: line)
        }
    }

    // MARK: ops

    func conv2d(input: [Int], weight wShape: [Int], stride: (Int, Int), padding: Padding2D, directions: Int = 0) throws {
        let what = "conv2dBackwardData x\(input) w\(wShape) stride \(stride) padding \(padding)"
        let x = random(input.reduce(1, *), seed: 1)
        let w = try upload(random(wShape.reduce(1, *), seed: 2, scale: 0.5), wShape)
        let outShape = try ShapeRules.conv2dOutput(input, weight: wShape, stride: stride, padding: padding)
        let r = random(outShape.reduce(1, *), seed: 3)
        let forward = { (x: [Float]) in
            try self.dot(r, self.backend.conv2d(self.upload(x, input), weight: w, bias: nil, stride: stride, padding: padding))
        }
        let dx = try backend.conv2dBackwardData(upload(r, outShape), weight: w, inputShape: input, stride: stride, padding: padding)
        XCTAssertEqual(dx.shape, input, "\(what): shape", file: file, line: line)
        try check(what, at: x, scale: 1, analytic: backend.downloadFloats(dx), directions: directions, loss: forward)
    }

    func groupNorm(input: [Int], groups: Int, affine: Bool, fuseSiLU: Bool, directions: Int = 0) throws {
        let what = "groupNormBackward \(input) groups \(groups) affine \(affine) silu \(fuseSiLU)"
        let count = input.reduce(1, *), channels = input[1]
        let scale: Float = 1.5
        let x = random(count, seed: 4, scale: scale, offset: 0.5)
        let gamma = affine ? try upload(random(channels, seed: 5, scale: 0.5, offset: 1), [channels]) : nil
        let beta = affine ? try upload(random(channels, seed: 6, scale: 0.5), [channels]) : nil
        let r = random(count, seed: 7)
        let eps: Float = 1e-5
        let forward = { (x: [Float]) in
            try self.dot(r, self.backend.groupNorm(self.upload(x, input), groups: groups, weight: gamma, bias: beta,
                                                   eps: eps, fuseSiLU: fuseSiLU))
        }
        let dx = try backend.groupNormBackward(upload(r, input), input: upload(x, input), groups: groups, weight: gamma,
                                               bias: beta, eps: eps, fuseSiLU: fuseSiLU)
        try check(what, at: x, scale: scale, analytic: backend.downloadFloats(dx), directions: directions, loss: forward)
    }

    func layerNorm(input: [Int], affine: Bool, directions: Int = 0) throws {
        let what = "layerNormBackward \(input) affine \(affine)"
        let count = input.reduce(1, *), width = input.last!
        let scale: Float = 1.5
        let x = random(count, seed: 8, scale: scale, offset: -0.3)
        let gammaValues = random(width, seed: 9, scale: 0.5, offset: 1), betaValues = random(width, seed: 10, scale: 0.5)
        let gamma = affine ? try upload(gammaValues, [width]) : nil
        let beta = affine ? try upload(betaValues, [width]) : nil
        let r = random(count, seed: 11)
        let eps: Float = 1e-5
        let xTensor = try upload(x, input)
        let g = try backend.layerNormBackward(upload(r, input), input: xTensor, weight: gamma, eps: eps, parameterGradients: affine)
        try check("\(what): input", at: x, scale: scale, analytic: backend.downloadFloats(g.input), directions: directions) { x in
            try self.dot(r, self.backend.layerNorm(self.upload(x, input), weight: gamma, bias: beta, eps: eps))
        }
        guard affine else {
            XCTAssertNil(g.weight, "\(what): no weight gradient asked for", file: file, line: line)
            XCTAssertNil(g.bias, "\(what): no bias gradient asked for", file: file, line: line)
            return
        }
        guard let dWeight = g.weight, let dBias = g.bias else {
            XCTFail("\(what): parameter gradients missing", file: file, line: line)
            return
        }
        try check("\(what): weight", at: gammaValues, scale: 1, analytic: backend.downloadFloats(dWeight)) { gammaValues in
            try self.dot(r, self.backend.layerNorm(xTensor, weight: self.upload(gammaValues, [width]), bias: beta, eps: eps))
        }
        try check("\(what): bias", at: betaValues, scale: 1, analytic: backend.downloadFloats(dBias)) { betaValues in
            try self.dot(r, self.backend.layerNorm(xTensor, weight: gamma, bias: self.upload(betaValues, [width]), eps: eps))
        }
    }

    func softmax(input: [Int], scale: Float, directions: Int = 0) throws {
        let what = "softmaxBackward \(input)"
        let count = input.reduce(1, *)
        let x = random(count, seed: 12, scale: scale), r = random(count, seed: 13)
        let y = try backend.softmax(upload(x, input))
        let dx = try backend.softmaxBackward(upload(r, input), output: y)
        try check(what, at: x, scale: scale, analytic: backend.downloadFloats(dx), directions: directions) { x in
            try self.dot(r, self.backend.softmax(self.upload(x, input)))
        }
    }

    /// Every activation the backend differentiates; one it declines must say so with `unsupported`.
    func activation(_ kind: Activation, input: [Int], scale: Float) throws {
        let what = "activationBackward \(kind) \(input)"
        let count = input.reduce(1, *)
        let x = random(count, seed: 14, scale: scale), r = random(count, seed: 15)
        let dx: Tensor
        do {
            dx = try backend.activationBackward(upload(r, input), input: upload(x, input), kind)
        } catch PEAError.unsupported {
            XCTAssertFalse(kind.hasBackward, "\(what): only an activation without a backward (quickGELU) may be unsupported",
                           file: file, line: line)
            return
        }
        try check(what, at: x, scale: scale, analytic: backend.downloadFloats(dx)) { x in
            try self.dot(r, self.backend.activation(self.upload(x, input), kind))
        }
    }

    func geglu(input: [Int], scale: Float) throws {
        let what = "gegluBackward \(input)"
        let count = input.reduce(1, *)
        let outShape = Array(input.dropLast()) + [input.last! / 2]
        let x = random(count, seed: 16, scale: scale), r = random(count / 2, seed: 17)
        let dx = try backend.gegluBackward(upload(r, outShape), input: upload(x, input))
        try check(what, at: x, scale: scale, analytic: backend.downloadFloats(dx)) { x in
            try self.dot(r, self.backend.geglu(self.upload(x, input)))
        }
    }

    func upsample(input: [Int]) throws {
        let what = "upsampleNearest2xBackward \(input)"
        let outShape = [input[0], input[1], 2 * input[2], 2 * input[3]]
        let x = random(input.reduce(1, *), seed: 18), r = random(outShape.reduce(1, *), seed: 19)
        let dx = try backend.upsampleNearest2xBackward(upload(r, outShape))
        XCTAssertEqual(dx.shape, input, "\(what): shape", file: file, line: line)
        try check(what, at: x, scale: 1, analytic: backend.downloadFloats(dx)) { x in
            try self.dot(r, self.backend.upsampleNearest2x(self.upload(x, input)))
        }
    }

    func attention(batch: Int, queries: Int, keys: Int, heads: Int, headDim: Int, valueHeadDim: Int, scale: Float?,
                   chunkBytes: Int? = nil) throws {
        let what = "attentionBackward B\(batch) Tq\(queries) Tk\(keys) H\(heads) D\(headDim) Dv\(valueHeadDim)"
            + (chunkBytes.map { " chunks of \($0) bytes" } ?? "")
        let qShape = [batch, queries, heads * headDim], kShape = [batch, keys, heads * headDim]
        let vShape = [batch, keys, heads * valueHeadDim], oShape = [batch, queries, heads * valueHeadDim]
        let q = random(qShape.reduce(1, *), seed: 20), k = random(kShape.reduce(1, *), seed: 21)
        let v = random(vShape.reduce(1, *), seed: 22), r = random(oShape.reduce(1, *), seed: 23)
        let (qT, kT, vT, rT) = (try upload(q, qShape), try upload(k, kShape), try upload(v, vShape), try upload(r, oShape))
        let g = try chunkBytes.map {
            try backend.composedAttentionBackward(rT, q: qT, k: kT, v: vT, heads: heads, scale: scale, scoreBytesPerChunk: $0)
        } ?? backend.attentionBackward(rT, q: qT, k: kT, v: vT, heads: heads, scale: scale)
        XCTAssertEqual([g.q.shape, g.k.shape, g.v.shape], [qShape, kShape, vShape], "\(what): shapes", file: file, line: line)
        func loss(_ q: Tensor, _ k: Tensor, _ v: Tensor) throws -> Double {
            try dot(r, backend.attention(q: q, k: k, v: v, heads: heads, mask: nil, causal: false, scale: scale))
        }
        try check("\(what): q", at: q, scale: 1, analytic: backend.downloadFloats(g.q)) { try loss(self.upload($0, qShape), kT, vT) }
        try check("\(what): k", at: k, scale: 1, analytic: backend.downloadFloats(g.k)) { try loss(qT, self.upload($0, kShape), vT) }
        try check("\(what): v", at: v, scale: 1, analytic: backend.downloadFloats(g.v)) { try loss(qT, kT, self.upload($0, vShape)) }
    }

    /// sumToShape is the gradient of broadcasting: for L(a) = Σ R ⊙ (a · b) with a broadcast to b's shape,
    /// ∂L/∂a = sumToShape(R ⊙ b, a.shape).
    func sumToShape(full: [Int], reduced: [Int]) throws {
        let what = "sumToShape \(full) → \(reduced)"
        let a = random(reduced.reduce(1, *), seed: 24), b = try upload(random(full.reduce(1, *), seed: 25), full)
        let r = random(full.reduce(1, *), seed: 26)
        let gradient = try backend.sumToShape(backend.mul(upload(r, full), b), reduced)
        XCTAssertEqual(gradient.shape, reduced, "\(what): shape", file: file, line: line)
        try check(what, at: a, scale: 1, analytic: backend.downloadFloats(gradient)) { a in
            try self.dot(r, self.backend.mul(self.upload(a, reduced), b))
        }
    }
}
