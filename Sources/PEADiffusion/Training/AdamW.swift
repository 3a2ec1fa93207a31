#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// The adapter's optimiser and learning-rate schedule, as the official scripts configure them (utils/model_utils.py):
// AdamW (β 0.9/0.999, ε 1e-8, weight decay 0.1 except the layer norm's parameters) and transformers'
// polynomial-decay schedule with linear warmup, decaying to `min_learning_rate` (5e-8).
//
// The adapter is small (~6M parameters), so the optimiser works on f32 host copies of the parameters (the master
// weights); after each step the new values are uploaded and replace the adapter's tensors.

/// torch.optim.AdamW, step by step in f32 as torch computes it:
///   p ← p · (1 − lr·wd)
///   m ← β1·m + (1 − β1)·g;   v ← β2·v + (1 − β2)·g²
///   p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
public struct AdamW {
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    public var epsilon: Float = 1e-8
    public var weightDecay: Float
    /// Parameters without weight decay (the official `no_decay` list: biases and layer norms).
    public var decays: (String) -> Bool
    /// Completed steps.
    public private(set) var step = 0
    /// The first and second moments per parameter (torch's exp_avg, exp_avg_sq).
    public private(set) var firstMoments: [String: [Float]] = [:]
    public private(set) var secondMoments: [String: [Float]] = [:]

    public init(weightDecay: Float = 0.1, decays: @escaping (String) -> Bool = AdamW.officialDecays) {
        self.weightDecay = weightDecay
        self.decays = decays
    }

    /// The official `no_decay` rule: no decay for names containing "bias", "LayerNorm.", "layer_norm." or
    /// "layernorm.".
    public static func officialDecays(_ name: String) -> Bool {
        !["bias", "LayerNorm.bias", "LayerNorm.weight", "layer_norm.", "layernorm."].contains { name.contains($0) }
    }

    /// Updates `parameters` in place from `gradients` (same names, same counts) at learning rate `lr`.
    public mutating func update(_ parameters: inout [String: [Float]], gradients: [String: [Float]], lr: Float) throws {
        step += 1
        let correction1 = 1 - powf(beta1, Float(step))
        let correction2 = 1 - powf(beta2, Float(step))
        let stepSize = lr / correction1
        let correction2Root = correction2.squareRoot()
        for name in parameters.keys.sorted() {
            guard let g = gradients[name], g.count == parameters[name]!.count else {
                throw PEAError.shapeMismatch("AdamW: no gradient of the right size for '\(name)'")
            }
            var m = firstMoments[name] ?? [Float](repeating: 0, count: g.count)
            var v = secondMoments[name] ?? [Float](repeating: 0, count: g.count)
            let decay = decays(name) ? 1 - lr * weightDecay : 1
            parameters[name]!.withUnsafeMutableBufferPointer { p in
                for i in 0..<g.count {
                    p[i] *= decay
                    m[i] = beta1 * m[i] + (1 - beta1) * g[i]
                    v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i]
                    p[i] -= stepSize * m[i] / (v[i].squareRoot() / correction2Root + epsilon)
                }
            }
            firstMoments[name] = m
            secondMoments[name] = v
        }
    }

    /// The state to save for an exact resume, and its inverse.
    public var state: (step: Int, first: [String: [Float]], second: [String: [Float]]) { (step, firstMoments, secondMoments) }

    public mutating func restore(step: Int, first: [String: [Float]], second: [String: [Float]]) {
        self.step = step
        firstMoments = first
        secondMoments = second
    }
}

/// Scales every gradient by max_norm / (‖g‖ + 1e-6) when the global L2 norm ‖g‖ over all of them exceeds
/// `maxNorm` (torch.nn.utils.clip_grad_norm_). Returns the norm before clipping.
@discardableResult
public func clipGradientNorm(_ gradients: inout [String: [Float]], maxNorm: Float) -> Float {
    var sum = 0.0
    for g in gradients.values { for x in g { sum += Double(x) * Double(x) } }
    let norm = Float(sum.squareRoot())
    let coefficient = maxNorm / (norm + 1e-6)
    if coefficient < 1 {
        for name in gradients.keys { gradients[name] = gradients[name]!.map { $0 * coefficient } }
    }
    return norm
}

/// transformers' `get_polynomial_decay_schedule_with_warmup`: the learning rate for the optimiser step that
/// follows `step` completed steps — linear warmup from 0 over `warmupSteps`, then polynomial decay (power 1:
/// linear) from `peak` to `end` at `totalSteps`, constant after.
public struct PolynomialDecaySchedule: Sendable {
    public var peak: Float
    public var end: Float
    public var warmupSteps: Int
    public var totalSteps: Int
    public var power: Float

    public init(peak: Float, end: Float = 5e-8, warmupSteps: Int, totalSteps: Int, power: Float = 1) {
        self.peak = peak
        self.end = end
        self.warmupSteps = warmupSteps
        self.totalSteps = totalSteps
        self.power = power
    }

    public func learningRate(afterSteps step: Int) -> Float {
        if step < warmupSteps { return peak * Float(step) / Float(max(1, warmupSteps)) }
        if step > totalSteps || totalSteps <= warmupSteps { return end }
        let remaining = 1 - Float(step - warmupSteps) / Float(totalSteps - warmupSteps)
        return (peak - end) * powf(remaining, power) + end
    }
}
