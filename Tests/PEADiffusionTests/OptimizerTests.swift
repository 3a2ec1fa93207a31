import Foundation
import XCTest
@testable import PEADiffusion

/// The trainer's optimiser (`AdamW`, `clipGradientNorm`, `PolynomialDecaySchedule`) against torch.optim.AdamW,
/// torch.nn.utils.clip_grad_norm_ and transformers' get_polynomial_decay_schedule_with_warmup, on the fixture
/// of tools/reference/make_optimizer_fixtures.py: a tiny adapter-like parameter set split into the official
/// decay / no-decay groups, 7 steps of seeded gradients, with clipping (some steps clipped, some not) and without.
///
/// Tolerances: torch runs the same f32 operations as `AdamW.update` (same constants, same fused multiply-adds,
/// same order), so the results agree to the bit (they do against torch 2.15's AVX2 kernels) or, where torch's
/// kernels differ (no FMA on another CPU, its own norm accumulation), by an ulp or two. An ulp is ≤ 1.2e-7 relative, so relative L2 ≤ 1e-6 per
/// step (and |Δ| ≤ 1e-6·max(1,|ref|) per element) leaves room for a few ulps and nothing more: the discrepancy
/// this suite was written to catch (1 − β2 formed in f32, 1.3e-5 relative in exp_avg_sq) is 13× over it.
/// The learning rates: ≤ 1e-7 relative to transformers' f64 values (the schedule computes in f64 from f64 base
/// rates, as Python does, and rounds once to the f32 the optimiser uses).
final class OptimizerTests: XCTestCase {
    static let path = fixturesDirectory() + "/training/optimizer.safetensors"
    static let tolerance = ParityTolerance(relativeL2: 1e-6, maxAbsolute: 1e-6)

    struct Fixture {
        let file: SafeTensorsFile
        let names: [String]
        let steps: Int
        let hyper: [String: JSONValue]
        /// torch's lr before each step, exact (float64).
        let lrs: [Double]
        /// A fresh scheduler's lr after k = 0, 1, … steps, exact.
        let scheduleLRs: [Double]
        let decays: [String: Bool]

        init() throws {
            let file = try SafeTensorsFile(path: OptimizerTests.path)
            self.file = file
            func metadata(_ key: String) throws -> JSONValue {
                guard let value = file.metadata[key] else {
                    throw PEAError.invalidFile(path: OptimizerTests.path, reason: "no metadata '\(key)'")
                }
                return try JSONValue.parse(value)
            }
            names = try metadata("names").arrayValue!.map { $0.stringValue! }
            steps = try metadata("steps").intValue!
            hyper = try metadata("hyper").objectValue!
            lrs = try metadata("lrs").arrayValue!.map { $0.doubleValue! }
            scheduleLRs = try metadata("schedule_lrs").arrayValue!.map { $0.doubleValue! }
            decays = try metadata("decays").objectValue!.mapValues { $0.boolValue! }
        }

        func floats(_ name: String) throws -> [Float] { try file.tensor(name).floats() }
        func number(_ key: String) -> Double { hyper[key]!.doubleValue! }
        /// The tensors `prefix.<name>`, uploaded to `backend` (the optimiser runs where its tensors live).
        func tensors(_ prefix: String, on backend: any ComputeBackend) throws -> [String: Tensor] {
            Dictionary(uniqueKeysWithValues: try names.map { ($0, try backend.upload(file.tensor("\(prefix).\($0)"))) })
        }

        var schedule: PolynomialDecaySchedule {
            PolynomialDecaySchedule(peak: number("lr"), end: number("lr_end"),
                                    warmupSteps: hyper["num_warmup_steps"]!.intValue!,
                                    totalSteps: hyper["num_training_steps"]!.intValue!, power: number("power"))
        }

        func makeOptimizer() -> AdamW {
            var optimizer = AdamW(weightDecay: Float(number("weight_decay")))
            let betas = hyper["betas"]!.arrayValue!.map { $0.doubleValue! }
            optimizer.beta1 = .init(betas[0])
            optimizer.beta2 = .init(betas[1])
            optimizer.epsilon = .init(number("eps"))
            return optimizer
        }
    }

    let backend = CPUBackend()

    func host(_ tensors: [String: Tensor]) throws -> [String: [Float]] {
        try tensors.mapValues { try backend.downloadFloats($0) }
    }

    /// Relative error of an f32 value against torch's f64 one (0 must be 0).
    func assertRelativelyClose(_ actual: Float, _ expected: Double, _ tolerance: Double, _ what: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        let error = abs(Double(actual) - expected)
        XCTAssertLessThanOrEqual(error, tolerance * abs(expected), "\(what): \(actual), expected \(expected)",
                                 file: file, line: line)
    }

    /// The largest distance in f32 ulps between two arrays, for the log.
    func maxULPs(_ a: [Float], _ b: [Float]) -> Int {
        zip(a, b).map { x, y in
            func ordered(_ v: Float) -> Int64 { let bits = Int64(Int32(bitPattern: v.bitPattern)); return bits < 0 ? Int64(Int32.min) - bits : bits }
            return Int(abs(ordered(x) - ordered(y)))
        }.max() ?? 0
    }

    /// Replays one trajectory as PEATrainer steps: lr from the schedule, optional clipping, AdamW update.
    func replay(_ prefix: String, clip: Bool) throws {
        let fixture = try Fixture()
        let schedule = fixture.schedule
        var optimizer = fixture.makeOptimizer()
        var parameters = try fixture.tensors("initial", on: backend)
        let expectedLR = try fixture.floats("lr")
        XCTAssertEqual(expectedLR.count, fixture.steps)
        let maxNorm = Float(fixture.number("max_norm"))
        let totalNorms = clip ? try fixture.floats("clip.total_norm") : []
        let clipped = clip ? try fixture.floats("clip.clipped") : []
        if clip { XCTAssertTrue(clipped.contains(1) && clipped.contains(0), "the fixture must clip some steps and not others") }
        var worst = (lr: 0, parameters: 0, moments: 0)
        for i in 0..<fixture.steps {
            let lr = schedule.learningRate(afterSteps: i)
            XCTAssertLessThanOrEqual(abs(lr - fixture.lrs[i]), 1e-15 * fixture.lrs[i], "\(prefix) step \(i) lr \(lr), torch's \(fixture.lrs[i])")
            worst.lr = max(worst.lr, maxULPs([Float(lr)], [expectedLR[i]]))
            var gradients = try fixture.tensors("grad.\(i)", on: backend)
            if clip {
                let norm = try clipGradientNorm(&gradients, maxNorm: maxNorm)
                assertClose([norm], [totalNorms[i]], Self.tolerance, "\(prefix) step \(i) total norm")
                XCTAssertEqual(norm > maxNorm, clipped[i] == 1, "\(prefix) step \(i): clipped or not")
                let clippedGradients = try host(gradients)
                for name in fixture.names {
                    assertClose(clippedGradients[name]!, try fixture.floats("clip.grad.\(i).\(name)"), Self.tolerance,
                                "\(prefix) step \(i) clipped gradient \(name)")
                }
            }
            try optimizer.update(&parameters, gradients: gradients, lr: lr)
            XCTAssertEqual(optimizer.step, i + 1)
            let (p, first, second) = (try host(parameters), try host(optimizer.firstMoments), try host(optimizer.secondMoments))
            for name in fixture.names {
                let expected = try fixture.floats("\(prefix).param.\(i).\(name)")
                assertClose(p[name]!, expected, Self.tolerance, "\(prefix) step \(i) \(name)")
                let m = try fixture.floats("\(prefix).exp_avg.\(i).\(name)")
                let v = try fixture.floats("\(prefix).exp_avg_sq.\(i).\(name)")
                assertClose(first[name]!, m, Self.tolerance, "\(prefix) step \(i) exp_avg \(name)")
                assertClose(second[name]!, v, Self.tolerance, "\(prefix) step \(i) exp_avg_sq \(name)")
                worst.parameters = max(worst.parameters, maxULPs(p[name]!, expected))
                worst.moments = max(worst.moments, maxULPs(first[name]!, m), maxULPs(second[name]!, v))
            }
        }
        let (first, second) = (try host(optimizer.state.first), try host(optimizer.state.second))
        for name in fixture.names {
            assertClose(first[name]!, try fixture.floats("\(prefix).exp_avg.\(name)"), Self.tolerance,
                        "\(prefix) final exp_avg \(name)")
            assertClose(second[name]!, try fixture.floats("\(prefix).exp_avg_sq.\(name)"), Self.tolerance,
                        "\(prefix) final exp_avg_sq \(name)")
        }
        print("OptimizerTests \(prefix): largest difference from torch over \(fixture.steps) steps: lr \(worst.lr) ulp, parameters \(worst.parameters) ulp, moments \(worst.moments) ulp")
        if !clip {
            // Unclipped, the gradients are torch's bit for bit, so the update must be too: the moments exactly,
            // the parameters within the one ulp torch's not-always-correctly-rounded sqrt can cost (AdamW).
            XCTAssertEqual(worst.moments, 0, "moments differ from torch by \(worst.moments) ulp")
            XCTAssertLessThanOrEqual(worst.parameters, 1, "parameters differ from torch by \(worst.parameters) ulp")
        }
    }

    func testClippedTrajectoryMatchesTorch() throws {
        try replay("clip", clip: true)
    }

    func testUnclippedTrajectoryMatchesTorch() throws {
        try replay("noclip", clip: false)
    }

    /// The schedule alone, past the warmup, the decay and num_training_steps (lr_end after it).
    func testScheduleMatchesTransformers() throws {
        let fixture = try Fixture()
        let schedule = fixture.schedule
        let table = try fixture.floats("schedule.lr")
        XCTAssertEqual(table.count, fixture.scheduleLRs.count)
        XCTAssertGreaterThan(table.count, fixture.hyper["num_training_steps"]!.intValue! + 1, "the table must go past the end")
        for (k, expected) in fixture.scheduleLRs.enumerated() {
            let lr = schedule.learningRate(afterSteps: k)
            XCTAssertLessThanOrEqual(abs(lr - expected), 1e-15 * expected, "lr after \(k) steps: \(lr), transformers' \(expected)")
            assertRelativelyClose(Float(lr), Double(table[k]), 1e-7, "lr after \(k) steps (the fixture's f32)")
        }
    }

    /// The official no_decay rule: the layer norm and biases are not decayed, the projection and head weights are.
    func testOfficialDecayRule() throws {
        for name in ["layernorm.weight", "layernorm.bias", "fc.bias"] {
            XCTAssertFalse(AdamW.officialDecays(name), "\(name) must not be decayed")
        }
        for name in ["projector.0.weight", "projector.2.weight", "projector.4.weight", "fc.weight"] {
            XCTAssertTrue(AdamW.officialDecays(name), "\(name) must be decayed")
        }
        // The fixture's split is the Python rule's, name by name.
        let fixture = try Fixture()
        XCTAssertEqual(Set(fixture.decays.keys), Set(fixture.names))
        for (name, decays) in fixture.decays {
            XCTAssertEqual(AdamW.officialDecays(name), decays, name)
        }
    }

    /// Saving the state after some steps and continuing in a fresh optimiser gives exactly the parameters of an
    /// uninterrupted run (what `pea train --resume` relies on).
    func testStateRoundTripResumesBitIdentically() throws {
        let fixture = try Fixture()
        let schedule = fixture.schedule
        let maxNorm = Float(fixture.number("max_norm"))
        func run(_ optimizer: inout AdamW, _ parameters: inout [String: Tensor], steps: Range<Int>) throws {
            for i in steps {
                var gradients = try fixture.tensors("grad.\(i)", on: backend)
                try clipGradientNorm(&gradients, maxNorm: maxNorm)
                try optimizer.update(&parameters, gradients: gradients, lr: schedule.learningRate(afterSteps: i))
            }
        }
        func bits(_ tensors: [String: Tensor], _ name: String) throws -> [UInt32] {
            try backend.downloadFloats(tensors[name]!).map(\.bitPattern)
        }
        let initial = try fixture.tensors("initial", on: backend)
        var uninterrupted = fixture.makeOptimizer()
        var straight = initial
        try run(&uninterrupted, &straight, steps: 0..<fixture.steps)

        for cut in 1..<fixture.steps {
            var first = fixture.makeOptimizer()
            var resumed = initial
            try run(&first, &resumed, steps: 0..<cut)
            let saved = first.state
            XCTAssertEqual(saved.step, cut)
            var second = fixture.makeOptimizer()
            second.restore(step: saved.step, first: saved.first, second: saved.second)
            XCTAssertEqual(second.step, cut)
            try run(&second, &resumed, steps: cut..<fixture.steps)
            for name in fixture.names {
                XCTAssertEqual(try bits(resumed, name), try bits(straight, name), "cut after \(cut): \(name)")
                XCTAssertEqual(try bits(second.firstMoments, name), try bits(uninterrupted.firstMoments, name), "cut after \(cut): exp_avg \(name)")
                XCTAssertEqual(try bits(second.secondMoments, name), try bits(uninterrupted.secondMoments, name), "cut after \(cut): exp_avg_sq \(name)")
            }
            XCTAssertEqual(second.step, uninterrupted.step)
        }
        // A restored step count matters: the bias corrections depend on it, so a fresh optimiser given only the
        // moments would not continue the run.
        var fresh = fixture.makeOptimizer()
        var partial = initial
        try run(&fresh, &partial, steps: 0..<3)
        var wrong = fixture.makeOptimizer()
        wrong.restore(step: 0, first: fresh.state.first, second: fresh.state.second)
        try run(&wrong, &partial, steps: 3..<fixture.steps)
        XCTAssertNotEqual(try bits(partial, "projector.0.weight"), try bits(straight, "projector.0.weight"))
    }

    /// A step whose gradients hold a NaN or an infinity changes nothing and reports nil (the f16 loss scale
    /// then halves); finite gradients update every parameter and report their norm, clipping's norm.
    func testNonFiniteGradientsSkipTheStep() throws {
        let training = try AdapterOptimization(adapter: PEAAdapter.initialized(widths: [6, 8, 4], backend: backend, seed: 3),
                                               weightDecay: 0.1, backend: backend)
        let before = try training.masterWeights()
        func gradients(poison: Float?, at target: String) throws -> [String: Tensor] {
            var out: [String: Tensor] = [:]
            for (k, (name, tensor)) in training.adapter.namedParameters.enumerated() {
                var values = (0..<tensor.count).map { Float(($0 * 7 + k) % 11) * 0.01 - 0.05 }
                if let poison, name == target { values[values.count / 2] = poison }
                out[name] = try backend.upload(values, shape: tensor.shape)
            }
            return out
        }
        let last = training.adapter.namedParameters.last!.name
        for poison in [Float.nan, .infinity, -.infinity] {
            XCTAssertNil(try training.apply(gradients(poison: poison, at: last), lr: 1e-3, maxNorm: 1), "\(poison)")
            XCTAssertEqual(try training.masterWeights(), before, "a step with a \(poison) gradient changed the weights")
            XCTAssertEqual(training.optimizer.step, 0)
        }
        let clean = try gradients(poison: nil, at: last)
        var copy = clean
        let expectedNorm = try clipGradientNorm(&copy, maxNorm: .infinity)
        let norm = try XCTUnwrap(training.apply(clean, lr: 1e-3, maxNorm: 1))
        XCTAssertEqual(norm, expectedNorm)
        XCTAssertEqual(training.optimizer.step, 1)
        for (name, values) in try training.masterWeights() { XCTAssertNotEqual(values, before[name], name) }
    }

    /// The optimizer ops refuse mismatched shapes and non-f32 tensors, naming the op and the tensor.
    func testOptimizerOpsRefuseBadInput() throws {
        let p = try backend.upload(HostTensor([1, 2, 3, 4], shape: [2, 2])), g = try backend.upload(HostTensor([1, 2], shape: [2]))
        let scalars = AdamWScalars(decay: 1, weight1: 0.1, keep2: 0.999, weight2: 0.001, stepSize: -1e-3, correction2Root: 1, epsilon: 1e-8)
        XCTAssertThrowsError(try backend.adamw(parameter: p, firstMoment: p, secondMoment: p, gradient: g, scalars: scalars)) {
            XCTAssertTrue("\($0)".contains("adamw") && "\($0)".contains("gradient"), "\($0)")
        }
        let half = try backend.upload(HostTensor([1, 2, 3, 4], shape: [2, 2]).converted(to: .f16))
        XCTAssertThrowsError(try backend.sumOfSquares(half)) { XCTAssertTrue("\($0)".contains("sumOfSquares"), "\($0)") }
    }
}
