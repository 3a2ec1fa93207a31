import XCTest
@testable import PEADiffusion

/// The tape's plumbing: which ops it records, how gradients meet at a buffer used twice or read through a
/// reshape, and that a gradient it cannot give is an error. (The ops' own backward rules are checked by finite
/// differences in BackwardOpTests; the whole distillation step against torch in KnowledgeDistillationTests.)
final class TapedBackendTests: XCTestCase {
    let cpu = CPUBackend(threads: 1)

    func testOnlyOpsThatDependOnTrackedTensorsAreRecorded() throws {
        let tape = TapedBackend(wrapping: cpu)
        let x = try tape.upload([1, 2, 3, 4], shape: [2, 2])
        let constant = try tape.upload([5, 6, 7, 8], shape: [2, 2])
        tape.requireGradient(x)
        _ = try tape.add(constant, constant)          // no tracked input: not recorded
        let y = try tape.mul(x, constant)             // recorded
        _ = try tape.affine(y, scale: 2, shift: 1)    // recorded
        XCTAssertEqual(tape.recordedOps, 2)
        XCTAssertTrue(tape.requiresGradient(y))
        XCTAssertFalse(tape.requiresGradient(constant))
    }

    func testGradientsAccumulateOverUsesAndFlowThroughReshapes() throws {
        let tape = TapedBackend(wrapping: cpu)
        let values: [Float] = [1, -2, 3, 0.5, 2, -1]
        let x = try tape.upload(values, shape: [2, 3])
        tape.requireGradient(x)
        // L = Σ (x ⊙ x) + Σ 3·xᵀ-reshaped: dL/dx = 2x + 3, the second term read through a reshape and a permute.
        let squares = try tape.mul(x, x)
        let viewed = try tape.permute(x.reshaped([3, 2]), [1, 0])
        let sum = try tape.add(tape.mean(squares.reshaped([6]).reshaped([1, 6]), dim: 1, keepDim: false),
                               tape.mean(tape.scale(viewed, by: 3).reshaped([1, 6]), dim: 1, keepDim: false))
        try tape.backward(from: sum)
        let gradient = try tape.downloadFloats(XCTUnwrap(tape.gradient(of: x)))
        // The means divide by 6.
        for (g, v) in zip(gradient, values) { XCTAssertEqual(g, (2 * v + 3) / 6, accuracy: 1e-6) }
    }

    /// linear and conv2d with a `residual:` go through the protocol's composed default on the tape (the op, then
    /// add), so the residual gets its gradient: with L = mean(y ⊙ c), dL/dresidual = c / count.
    func testResidualLinearAndConvPassTheGradientToTheirResidual() throws {
        let tape = TapedBackend(wrapping: cpu)
        func lossAndResidualGradient(_ y: (Tensor) throws -> Tensor, residualShape: [Int]) throws -> (got: [Float], expected: [Float]) {
            let count = residualShape.reduce(1, *)
            let residual = try tape.upload((0..<count).map { Float($0) / 4 - 1 }, shape: residualShape)
            let weights = (0..<count).map { Float($0 % 5) - 2 }
            tape.requireGradient(residual)
            let product = try tape.mul(y(residual), tape.upload(weights, shape: residualShape))
            try tape.backward(from: tape.mean(product.reshaped([1, count]), dim: 1, keepDim: false))
            return (try tape.downloadFloats(XCTUnwrap(tape.gradient(of: residual))), weights.map { $0 / Float(count) })
        }
        let x = try tape.upload([1, -2, 3, 0.5, 2, -1], shape: [2, 3])
        let w = try tape.upload((0..<12).map { Float($0) / 10 - 0.5 }, shape: [4, 3])
        let linear = try lossAndResidualGradient({ try tape.linear(x, weight: w, bias: nil, residual: $0) }, residualShape: [2, 4])
        XCTAssertEqual(linear.got, linear.expected)
        let image = try tape.upload((0..<18).map { Float($0) / 9 }, shape: [1, 2, 3, 3])
        let kernel = try tape.upload((0..<36).map { Float($0 % 7) / 7 }, shape: [2, 2, 3, 3])
        let conv = try lossAndResidualGradient({
            try tape.conv2d(image, weight: kernel, bias: nil, stride: (1, 1), padding: .uniform(1), residual: $0)
        }, residualShape: [1, 2, 3, 3])
        XCTAssertEqual(conv.got, conv.expected)
    }

    func testAGradientTheRulesCannotGiveIsAnError() throws {
        let tape = TapedBackend(wrapping: cpu)
        let x = try tape.upload((0..<8).map(Float.init), shape: [1, 4, 2])
        let weight = try cpu.upload([1, 1, 1, 1], shape: [4])
        tape.requireGradient(weight)   // group norm's parameters are frozen UNet weights: no rule for them
        assertThrowsError(containing: ["groupNorm", "no gradient"]) {
            _ = try tape.groupNorm(x, groups: 2, weight: weight, bias: nil, eps: 1e-5, fuseSiLU: false)
        }
    }
}
