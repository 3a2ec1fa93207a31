#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels

// The adapter's optimiser and learning-rate schedule, as the official scripts configure them (utils/model_utils.py):
// AdamW (β 0.9/0.999, ε 1e-8, weight decay 0.1 except the layer norm's parameters) and transformers'
// polynomial-decay schedule with linear warmup, decaying to `min_learning_rate` (5e-8).
//
// The adapter is small (~6M parameters), so the optimiser works on f32 host copies of the parameters (the master
// weights); after each step the new values are uploaded and replace the adapter's tensors.

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
    /// `lr` is f64, as torch's param_groups hold it: rounding it to f32 first would move `−lr / (1 − β1ᵗ)` and
    /// `1 − lr·wd` by an ulp now and then.
    public mutating func update(_ parameters: inout [String: [Float]], gradients: [String: [Float]], lr: Double) throws {
        for name in parameters.keys {
            guard let g = gradients[name], g.count == parameters[name]!.count else {
                throw PEAError.shapeMismatch("AdamW: no gradient of the right size for '\(name)'")
            }
        }
        step += 1
        let t = Double(step)
        let correction1 = 1 - pow(beta1, t)
        let correction2 = 1 - pow(beta2, t)
        let stepSize = Float(-(lr / correction1))
        let correction2Root = Float(pow(correction2, 0.5))
        let weight1 = Float(1 - beta1), keep2 = Float(beta2), weight2 = Float(1 - beta2), eps = Float(epsilon)
        let decayFactor = Float(1 - lr * Double(weightDecay))
        for name in parameters.keys.sorted() {
            let g = gradients[name]!
            // Taken out of their dictionaries while updated, so the writes below touch the only copy (no
            // copy-on-write of the whole array each step).
            var p = parameters.removeValue(forKey: name)!
            var m = firstMoments.removeValue(forKey: name) ?? [Float](repeating: 0, count: g.count)
            var v = secondMoments.removeValue(forKey: name) ?? [Float](repeating: 0, count: g.count)
            let decay = decays(name) && weightDecay != 0 ? decayFactor : 1
            p.withUnsafeMutableBufferPointer { p in
                m.withUnsafeMutableBufferPointer { m in
                    v.withUnsafeMutableBufferPointer { v in
                        g.withUnsafeBufferPointer { g in
                            var hyper = ck_adamw_hyper(decay: decay, weight1: weight1, keep2: keep2, weight2: weight2,
                                                       step_size: stepSize, correction2_root: correction2Root, eps: eps)
                            ck_adamw_f32(p.baseAddress!, m.baseAddress!, v.baseAddress!, g.baseAddress!, Int64(g.count), &hyper)
                        }
                    }
                }
            }
            parameters[name] = p
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
/// `maxNorm` (torch.nn.utils.clip_grad_norm_: the norm of the per-tensor f32 norms). Returns the norm before
/// clipping. Names are visited in sorted order, so the result does not depend on the dictionary's hash order.
/// The norm is not finite when some gradient value is not (or when it exceeds the f32 range).
@discardableResult
public func clipGradientNorm(_ gradients: inout [String: [Float]], maxNorm: Float) -> Float {
    var sum = 0.0
    for name in gradients.keys.sorted() {
        let squares = gradients[name]!.withUnsafeBufferPointer { ck_sum_squares_f32($0.baseAddress, Int64($0.count)) }
        let norm = Double(Float(squares.squareRoot()))
        sum += norm * norm
    }
    let norm = Float(sum.squareRoot())
    // torch's `max_norm / (total_norm + 1e-6)` is Tensor.__rtruediv__: reciprocal(total_norm + 1e-6) · max_norm.
    let coefficient = (1 / (norm + 1e-6)) * maxNorm
    if coefficient < 1 {
        for name in gradients.keys {
            gradients[name]!.withUnsafeMutableBufferPointer { g in for i in g.indices { g[i] *= coefficient } }
        }
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
