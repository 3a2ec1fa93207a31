#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// The adapter's optimiser and learning-rate schedule, as the official scripts configure them (utils/model_utils.py):
// AdamW (β 0.9/0.999, ε 1e-8, weight decay 0.1 except the layer norm's parameters) and transformers'
// polynomial-decay schedule with linear warmup, decaying to `min_learning_rate` (5e-8).
//
// The adapter's f32 tensors are the master weights: the optimiser runs where they live (the backend's adamw and
// sumOfSquares ops, bit for bit the same on the CPU and the GPU), so a training step moves no weights, moments
// or gradients between host and device.

/// torch.optim.AdamW (its single-tensor path, which CPU tensors take), step by step in f32 as torch computes it.
/// The hyperparameters are f64, as torch's Python floats are; torch forms every scalar that meets a tensor in f64
/// and rounds it to f32 once, and its CPU kernels fuse the moment updates (lerp and addcmul are FMAs):
///   p ← p · f32(1 − lr·wd)
///   m ← fma(f32(1 − β1), g − m, m)                         (exp_avg.lerp_(grad, 1 − β1))
///   v ← fma(f32(1 − β2)·g, g, v · f32(β2))                 (exp_avg_sq.mul_(β2).addcmul_(grad, grad, value=1 − β2))
///   p ← p + (f32(−lr / (1 − β1ᵗ)) · m) / (√v / f32(√(1 − β2ᵗ)) + f32(ε))
/// with the bias corrections in f64. Forming 1 − β2 in f32 instead (1 − 0.999f = 0.00099998713) would put every
/// second moment 1.3e-5 away from torch's. What still differs now and then by an ulp is √v: this one is
/// correctly rounded, torch's CPU sqrt is not always (in the optimizer fixture, v = 4.1374077e-09 gives torch
/// 6.4322689e-05, 0.55 ulp from the exact root, against the correctly rounded 6.4322681e-05 here).
public struct AdamW {
    public var beta1: Double = 0.9
    public var beta2: Double = 0.999
    public var epsilon: Double = 1e-8
    public var weightDecay: Float
    /// Parameters without weight decay (the official `no_decay` list: biases and layer norms).
    public var decays: (String) -> Bool
    /// Completed steps.
    public private(set) var step = 0
    /// The first and second moments per parameter (torch's exp_avg, exp_avg_sq), on the parameters' backend.
    public private(set) var firstMoments: [String: Tensor] = [:]
    public private(set) var secondMoments: [String: Tensor] = [:]

    public init(weightDecay: Float = 0.1, decays: @escaping (String) -> Bool = AdamW.officialDecays) {
        self.weightDecay = weightDecay
        self.decays = decays
    }

    /// The official `no_decay` rule: no decay for names containing "bias", "LayerNorm.", "layer_norm." or
    /// "layernorm.".
    public static func officialDecays(_ name: String) -> Bool {
        !["bias", "LayerNorm.bias", "LayerNorm.weight", "layer_norm.", "layernorm."].contains { name.contains($0) }
    }

    /// Updates `parameters` from `gradients` (same names, same shapes, f32) at learning rate `lr`, on the
    /// parameters' backend (`ComputeBackend.adamw`: the weights never leave the device). `lr` is f64, as torch's
    /// param_groups hold it: rounding it to f32 first would move `−lr / (1 − β1ᵗ)` and `1 − lr·wd` by an ulp now
    /// and then.
    public mutating func update(_ parameters: inout [String: Tensor], gradients: [String: Tensor], lr: Double) throws {
        for (name, parameter) in parameters {
            guard let g = gradients[name], g.shape == parameter.shape else {
                throw PEAError.shapeMismatch("AdamW: no gradient of shape \(parameter.shape) for '\(name)'")
            }
        }
        step += 1
        let t = Double(step)
        let correction1 = 1 - pow(beta1, t)
        let correction2 = 1 - pow(beta2, t)
        let decayFactor = Float(1 - lr * Double(weightDecay))
        var scalars = AdamWScalars(decay: 1, weight1: Float(1 - beta1), keep2: Float(beta2), weight2: Float(1 - beta2),
                                   stepSize: Float(-(lr / correction1)), correction2Root: Float(pow(correction2, 0.5)),
                                   epsilon: Float(epsilon))
        for name in parameters.keys.sorted() {
            let p = parameters[name]!, backend = p.backend
            let m = try firstMoments[name] ?? backend.zeros(p.shape, dtype: .f32)
            let v = try secondMoments[name] ?? backend.zeros(p.shape, dtype: .f32)
            scalars.decay = decays(name) && weightDecay != 0 ? decayFactor : 1
            let next = try backend.adamw(parameter: p, firstMoment: m, secondMoment: v, gradient: gradients[name]!,
                                         scalars: scalars)
            parameters[name] = next.parameter
            firstMoments[name] = next.firstMoment
            secondMoments[name] = next.secondMoment
        }
    }

    /// The state to save for an exact resume, and its inverse. Ops never modify their inputs, so the tensors
    /// returned stay as they are when later steps run.
    public var state: (step: Int, first: [String: Tensor], second: [String: Tensor]) { (step, firstMoments, secondMoments) }

    public mutating func restore(step: Int, first: [String: Tensor], second: [String: Tensor]) {
        self.step = step
        firstMoments = first
        secondMoments = second
    }
}

/// Scales every gradient by max_norm / (‖g‖ + 1e-6) when the global L2 norm ‖g‖ over all of them exceeds
/// `maxNorm` (torch.nn.utils.clip_grad_norm_: the norm of the per-tensor f32 norms). Returns the norm before
/// clipping. Each tensor's Σ g² comes from its backend in f64 (`sumOfSquares`, the same bits on every backend);
/// names are visited in sorted order, so the result does not depend on the dictionary's hash order. The norm
/// is not finite when some gradient value is not (or when it exceeds the f32 range).
@discardableResult
public func clipGradientNorm(_ gradients: inout [String: Tensor], maxNorm: Float) throws -> Float {
    var sum = 0.0
    for name in gradients.keys.sorted() {
        let g = gradients[name]!
        let norm = Double(Float(try g.backend.sumOfSquares(g).squareRoot()))
        sum += norm * norm
    }
    let norm = Float(sum.squareRoot())
    // torch's `max_norm / (total_norm + 1e-6)` is Tensor.__rtruediv__: reciprocal(total_norm + 1e-6) · max_norm.
    let coefficient = (1 / (norm + 1e-6)) * maxNorm
    if coefficient < 1 {
        for (name, g) in gradients { gradients[name] = try g.backend.scale(g, by: coefficient) }
    }
    return norm
}

/// transformers' `get_polynomial_decay_schedule_with_warmup`: the learning rate for the optimiser step that
/// follows `step` completed steps — linear warmup from 0 over `warmupSteps`, then polynomial decay (power 1:
/// linear) from `peak` to `end` at `totalSteps`, constant after.
public struct PolynomialDecaySchedule: Sendable {
    /// The base and final learning rates, in f64 as the Python scripts hold them (5e-8 is not an f32 value).
    public var peak: Double
    public var end: Double
    public var warmupSteps: Int
    public var totalSteps: Int
    public var power: Double

    public init(peak: Double, end: Double = 5e-8, warmupSteps: Int, totalSteps: Int, power: Double = 1) {
        self.peak = peak
        self.end = end
        self.warmupSteps = warmupSteps
        self.totalSteps = totalSteps
        self.power = power
    }

    /// transformers' lr_lambda times the base lr, in f64 as Python computes them (AdamW takes it in f64).
    public func learningRate(afterSteps step: Int) -> Double {
        let initial = peak, final = end
        let factor: Double
        if step < warmupSteps {
            factor = Double(step) / Double(max(1, warmupSteps))
        } else if step > totalSteps || totalSteps <= warmupSteps {
            factor = final / initial
        } else {
            let remaining = 1 - Double(step - warmupSteps) / Double(totalSteps - warmupSteps)
            factor = ((initial - final) * pow(remaining, power) + final) / initial
        }
        return initial * factor
    }
}
