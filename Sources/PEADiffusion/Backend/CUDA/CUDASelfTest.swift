/// `pea selftest --backend cuda`: every op of the CUDA backend (every row of the op registry, backward and
/// optimizer ops included) against the CPU backend on the same random
/// inputs, at SD1.5-sized shapes (320 channels in 32 groups at 64×64, 4096-token self-attention, 77-token
/// cross-attention, head dims 40/64/80/160), in f32, f16 and bf16, then a UNet evaluation with random weights
/// and a check that repeated evaluations allocate no new device memory.
///
/// f16/bf16 cases give the CUDA backend inputs stored in that dtype and the CPU the same values (the
/// f16-rounded inputs, in f32), so the comparison measures only the CUDA side's rounding: its outputs are
/// stored in f16/bf16, its arithmetic accumulates in f32. Tolerances (relative L2 error): f32 1e-4, f16 2e-3,
/// bf16 1.6e-2 (about 8× the error of rounding the outputs alone).
public enum CUDASelfTest {
    public struct Check {
        public let name: String
        public let relativeL2: Double
        public let maxAbsolute: Double
        public let tolerance: Double
        /// Why the check could not run or failed outright (an error thrown, a shape that differs).
        public let error: String?
        /// What a check that is not a comparison measured (printed instead of the errors).
        public var note: String? = nil
        public var passed: Bool { error == nil && relativeL2 <= tolerance }
    }

    /// `.sd` for a GPU; `.small` runs the same cases at small shapes (the emulated library, tests).
    public enum Scale: Sendable { case sd, small }

    /// The relative L2 tolerance of a comparison in `dtype`.
    public static func tolerance(_ dtype: DType) -> Double {
        switch dtype {
        case .f16: return 2e-3
        case .bf16: return 1.6e-2
        default: return 1e-4
        }
    }

    /// Runs every check, calling `report` after each (for progress), and returns them all.
    public static func run(cuda: CUDABackend, reference cpu: CPUBackend, scale: Scale = .sd,
                           dtypes: [DType] = [.f32, .f16, .bf16], report: (Check) -> Void = { _ in }) -> [Check] {
        var checks: [Check] = []
        var random = SplitMix64(seed: 2025)
        for c in cases(scale, &random) {
            for dtype in c.dtypes ?? dtypes {
                let check = evaluate(c, dtype: dtype, cuda: cuda, cpu: cpu)
                checks.append(check)
                report(check)
            }
        }
        for check in unetChecks(scale, cuda: cuda, cpu: cpu, &random) {
            checks.append(check)
            report(check)
        }
        return checks
    }

    // MARK: the harness (also used by the emulated parity tests)

    /// One op, or a composition, run on both backends from the same host inputs.
    struct Case {
        /// The op under test (its registry row; every op has at least one case).
        var op: Op
        var name: String
        /// f32 inputs are stored in the dtype under test (the CPU gets the rounded values in f32); integer
        /// inputs go to both backends as they are.
        var inputs: [String: HostTensor]
        /// The dtypes this case runs in, whatever is asked (nil: the ones asked for). Cases whose result does
        /// not depend on the float dtype (casts, timestep embeddings) run once.
        var dtypes: [DType]? = nil
        var run: (any ComputeBackend, [String: Tensor]) throws -> [Tensor]
    }

    /// Runs `c` on both backends in `dtype` and compares every output.
    static func evaluate(_ c: Case, dtype: DType, cuda: CUDABackend, cpu: CPUBackend, tolerance: Double? = nil) -> Check {
        let name = "\(c.name) \(dtype)"
        let limit = tolerance ?? Self.tolerance(dtype)
        func failed(_ message: String) -> Check {
            Check(name: name, relativeL2: .infinity, maxAbsolute: .infinity, tolerance: limit, error: message)
        }
        var cudaInputs: [String: Tensor] = [:], cpuInputs: [String: Tensor] = [:]
        let expected: [HostTensor]
        do {
            for (key, host) in c.inputs {
                let stored = host.dtype == .f32 ? host.converted(to: dtype) : host
                cpuInputs[key] = try cpu.upload(stored.dtype.isFloatingPoint ? stored.converted(to: .f32) : stored)
                cudaInputs[key] = try cuda.upload(stored)
            }
            expected = try c.run(cpu, cpuInputs).map(cpu.download)
        } catch {
            return failed("cpu reference: \(error)")
        }
        let actual: [HostTensor]
        do {
            actual = try c.run(cuda, cudaInputs).map(cuda.download)
        } catch {
            return failed("\(error)")
        }
        guard actual.map(\.shape) == expected.map(\.shape) else {
            return failed("shapes \(actual.map(\.shape)), expected \(expected.map(\.shape))")
        }
        var a: [Float] = [], e: [Float] = []
        for (x, y) in zip(actual, expected) {
            a += x.floats()
            e += y.floats()
        }
        let (relative, worst) = compare(a, e)
        return Check(name: name, relativeL2: relative, maxAbsolute: worst, tolerance: limit, error: nil)
    }

    /// Relative L2 error and max |Δ| (equal infinities count as equal; a NaN or a lone infinity is infinite error).
    static func compare(_ actual: [Float], _ expected: [Float]) -> (relativeL2: Double, maxAbsolute: Double) {
        var diff2 = 0.0, ref2 = 0.0, worst = 0.0
        for (x, y) in zip(actual, expected) {
            if x == y { if y.isFinite { ref2 += Double(y) * Double(y) }; continue }
            guard x.isFinite, y.isFinite else { return (.infinity, .infinity) }
            let d = Double(x) - Double(y)
            diff2 += d * d
            ref2 += Double(y) * Double(y)
            worst = max(worst, abs(d))
        }
        return (ref2 > 0 ? (diff2 / ref2).squareRoot() : diff2.squareRoot(), worst)
    }

    // MARK: the cases

    static func cases(_ scale: Scale, _ random: inout SplitMix64) -> [Case] {
        let sd = scale == .sd
        func r(_ shape: [Int]) -> HostTensor {
            HostTensor(random.normals(shape.reduce(1, *)), shape: shape)
        }
        // The sizes: SD1.5 at a 64×64 latent (batch 2), or a few elements of each.
        let (hw, c1, c2, c4, tokens, context) = sd ? (64, 320, 640, 1280, 4096, 77) : (6, 16, 24, 32, 36, 7)
        let groups = sd ? 32 : 8
        var list: [Case] = []

        list.append(Case(op: .gemm, name: "gemm nn \(tokens)x\(c1)x\(c1)", inputs: ["a": r([tokens, c1]), "b": r([c1, c1])]) { b, t in
            [try b.gemm(t["a"]!, t["b"]!, transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil)]
        })
        let (bm, bn, bk) = sd ? (1024, 77, 40) : (37, 7, 8)
        list.append(Case(op: .gemm, name: "gemm batched nt 16x\(bm)x\(bn)x\(bk) beta", inputs: ["a": r([16, bm, bk]), "b": r([16, bn, bk]), "c": r([16, bm, bn])]) { b, t in
            [try b.gemm(t["a"]!, t["b"]!, transposeA: false, transposeB: true, alpha: 0.25, beta: 0.5, c: t["c"]!)]
        })
        let (gm, gn, gk) = sd ? (320, 257, 2880) : (13, 11, 29)
        list.append(Case(op: .gemm, name: "gemm tn shared-b \(gm)x\(gn)x\(gk)", inputs: ["a": r([2, gk, gm]), "b": r([gk, gn])]) { b, t in
            [try b.gemm(t["a"]!, t["b"]!, transposeA: true, transposeB: false, alpha: 1, beta: 0, c: nil)]
        })
        list.append(Case(op: .linear, name: "linear [2,\(tokens / 4),\(c1)]→\(8 * c1) bias", inputs: ["x": r([2, tokens / 4, c1]), "w": r([8 * c1, c1]), "b": r([8 * c1])]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: t["b"]!)]
        })
        list.append(Case(op: .linear, name: "linear [2,\(context),\(c4 / 2 + c1 / 2)]→\(c1) no bias", inputs: ["x": r([2, context, c4 / 2 + c1 / 2]), "w": r([c1, c4 / 2 + c1 / 2])]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: nil)]
        })
        list.append(Case(op: .linear, name: "linear [2,\(tokens / 4),\(4 * c1)]→\(c1) bias + residual", inputs: ["x": r([2, tokens / 4, 4 * c1]), "w": r([c1, 4 * c1]), "b": r([c1]), "r": r([2, tokens / 4, c1])]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: t["b"]!, residual: t["r"]!)]
        })
        list.append(Case(op: .conv2d, name: "conv2d 3x3 [2,\(c1),\(hw),\(hw)]→\(c1)", inputs: ["x": r([2, c1, hw, hw]), "w": r([c1, c1, 3, 3]), "b": r([c1])]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (1, 1), padding: .uniform(1))]
        })
        list.append(Case(op: .conv2d, name: "conv2d conv_in [2,4,\(hw),\(hw)]→\(c1)", inputs: ["x": r([2, 4, hw, hw]), "w": r([c1, 4, 3, 3]), "b": r([c1])]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (1, 1), padding: .uniform(1))]
        })
        list.append(Case(op: .conv2d, name: "conv2d 3x3 stride 2 [2,\(c1),\(hw),\(hw)]", inputs: ["x": r([2, c1, hw, hw]), "w": r([c1, c1, 3, 3]), "b": r([c1])]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (2, 2), padding: .uniform(1))]
        })
        list.append(Case(op: .conv2d, name: "conv2d 3x3 stride 2 pad (0,1,0,1)", inputs: ["x": r([1, c1 / 2, hw, hw]), "w": r([c1 / 2, c1 / 2, 3, 3]), "b": r([c1 / 2])]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (2, 2), padding: Padding2D(top: 0, bottom: 1, left: 0, right: 1))]
        })
        list.append(Case(op: .conv2d, name: "conv2d 1x1 [2,\(c2),\(hw / 2),\(hw / 2)]→\(c1)", inputs: ["x": r([2, c2, hw / 2, hw / 2]), "w": r([c1, c2, 1, 1]), "b": r([c1])]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (1, 1), padding: .uniform(0))]
        })
        list.append(Case(op: .conv2d, name: "conv2d 3x3 + residual [2,\(c1),\(hw),\(hw)]→\(c1)", inputs: ["x": r([2, c1, hw, hw]), "w": r([c1, c1, 3, 3]), "b": r([c1]), "r": r([2, c1, hw, hw])]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (1, 1), padding: .uniform(1), residual: t["r"]!)]
        })
        list.append(Case(op: .conv2d, name: "conv2d 1x1 + residual [2,\(c2),\(hw / 2),\(hw / 2)]→\(c1)", inputs: ["x": r([2, c2, hw / 2, hw / 2]), "w": r([c1, c2, 1, 1]), "b": r([c1]), "r": r([2, c1, hw / 2, hw / 2])]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (1, 1), padding: .uniform(0), residual: t["r"]!)]
        })
        list.append(Case(op: .groupNorm, name: "groupNorm+silu [2,\(c1),\(hw),\(hw)] G\(groups)", inputs: ["x": r([2, c1, hw, hw]), "g": r([c1]), "b": r([c1])]) { b, t in
            [try b.groupNorm(t["x"]!, groups: groups, weight: t["g"]!, bias: t["b"]!, eps: 1e-5, fuseSiLU: true)]
        })
        list.append(Case(op: .groupNorm, name: "groupNorm [2,\(c2),\(hw / 2),\(hw / 2)] G\(groups)", inputs: ["x": r([2, c2, hw / 2, hw / 2]), "g": r([c2]), "b": r([c2])]) { b, t in
            [try b.groupNorm(t["x"]!, groups: groups, weight: t["g"]!, bias: t["b"]!, eps: 1e-6, fuseSiLU: false)]
        })
        list.append(Case(op: .layerNorm, name: "layerNorm [2,\(tokens),\(c1)]", inputs: ["x": r([2, tokens, c1]), "g": r([c1]), "b": r([c1])]) { b, t in
            [try b.layerNorm(t["x"]!, weight: t["g"]!, bias: t["b"]!, eps: 1e-5)]
        })
        list.append(Case(op: .softmax, name: "softmax [16,\(tokens / 4),\(context)]", inputs: ["x": r([16, tokens / 4, context])]) { b, t in
            [try b.softmax(t["x"]!)]
        })
        list.append(Case(op: .softmax, name: "softmax [8,\(sd ? 64 : 5),\(tokens)]", inputs: ["x": r([8, sd ? 64 : 5, tokens])]) { b, t in
            [try b.softmax(t["x"]!)]
        })

        // Attention at the head dims the models use: 40, 80, 160 (SD1.5), 64 (SD2, SDXL, CLIP).
        let attentionShapes: [(String, Int, Int, Int, Int)] = sd
            ? [("self d40", tokens, tokens, 8, 40), ("cross d40", tokens, context, 8, 40), ("self d64", 1024, 1024, 5, 64),
               ("self d80", 1024, 1024, 8, 80), ("cross d160", 256, context, 8, 160)]
            : [("self d40", 19, 19, 2, 40), ("cross d40", 19, context, 2, 40), ("self d64", 9, 9, 2, 64),
               ("self d80", 9, 9, 1, 80), ("cross d160", 5, context, 1, 160)]
        for (label, tq, tk, heads, d) in attentionShapes {
            list.append(Case(op: .attention, name: "attention \(label) [2,\(tq),\(heads)x\(d)]·\(tk)",
                             inputs: ["q": r([2, tq, heads * d]), "k": r([2, tk, heads * d]), "v": r([2, tk, heads * d])]) { b, t in
                [try b.attention(q: t["q"]!, k: t["k"]!, v: t["v"]!, heads: heads, mask: nil, causal: false, scale: nil)]
            })
        }
        // CLIP's text attention: causal, with a padding mask over the keys.
        let (ct, cw, ch) = sd ? (77, 768, 12) : (7, 128, 2)
        var padding = [Float](repeating: 0, count: 2 * ct)
        for j in (ct - ct / 3)..<ct { padding[ct + j] = -.infinity }
        list.append(Case(op: .attention, name: "attention causal+mask [2,\(ct),\(ch)x\(cw / ch)]",
                         inputs: ["q": r([2, ct, cw]), "k": r([2, ct, cw]), "v": r([2, ct, cw]), "m": HostTensor(padding, shape: [2, 1, 1, ct])]) { b, t in
            [try b.attention(q: t["q"]!, k: t["k"]!, v: t["v"]!, heads: ch, mask: t["m"]!, causal: true, scale: nil)]
        })

        for kind in Activation.allCases {
            list.append(Case(op: .activation, name: "activation \(kind.rawValue) [2,\(c4),\(hw / 2),\(hw / 2)]", inputs: ["x": r([2, c4, hw / 2, hw / 2])]) { b, t in
                [try b.activation(t["x"]!, kind)]
            })
        }
        list.append(Case(op: .geglu, name: "geglu [2,\(tokens),\(8 * c1)]", inputs: ["x": r([2, tokens, 8 * c1])]) { b, t in
            [try b.geglu(t["x"]!)]
        })
        list.append(Case(op: .binary, name: "add temb [2,\(c1),\(hw),\(hw)]+[2,\(c1),1,1]", inputs: ["a": r([2, c1, hw, hw]), "b": r([2, c1, 1, 1])]) { b, t in
            [try b.binary(.add, t["a"]!, t["b"]!)]
        })
        list.append(Case(op: .binary, name: "mul rows [2,\(tokens),\(c1)]*[\(c1)]", inputs: ["a": r([2, tokens, c1]), "b": r([c1])]) { b, t in
            [try b.binary(.mul, t["a"]!, t["b"]!)]
        })
        list.append(Case(op: .binary, name: "sub both ways [2,1,\(c1)]-[\(context),1]", inputs: ["a": r([2, 1, c1]), "b": r([context, 1])]) { b, t in
            [try b.binary(.sub, t["a"]!, t["b"]!)]
        })
        list.append(Case(op: .binary, name: "div scalar [2,4,\(hw),\(hw)]/[1]", inputs: ["a": r([2, 4, hw, hw]), "b": HostTensor([1.5], shape: [1])]) { b, t in
            [try b.binary(.div, t["a"]!, t["b"]!)]
        })
        list.append(Case(op: .affine, name: "affine [2,4,\(hw),\(hw)]", inputs: ["x": r([2, 4, hw, hw])]) { b, t in
            [try b.affine(t["x"]!, scale: 0.18215, shift: -0.5)]
        })
        list.append(Case(op: .upsampleNearest2x, name: "upsample [2,\(c4),\(hw / 4),\(hw / 4)]", inputs: ["x": r([2, c4, hw / 4, hw / 4])]) { b, t in
            [try b.upsampleNearest2x(t["x"]!)]
        })
        list.append(Case(op: .concat, name: "concat channels [2,\(c2)|\(c1),\(hw / 2),\(hw / 2)]", inputs: ["a": r([2, c2, hw / 2, hw / 2]), "b": r([2, c1, hw / 2, hw / 2])]) { b, t in
            [try b.concat([t["a"]!, t["b"]!], dim: 1)]
        })
        list.append(Case(op: .split, name: "split last [2,\(tokens),\(8 * c1)]", inputs: ["x": r([2, tokens, 8 * c1])]) { b, t in
            try b.split(t["x"]!, sizes: [4 * c1, 4 * c1], dim: -1)
        })
        list.append(Case(op: .permute, name: "permute NCHW→NHWC [2,\(c1),\(hw),\(hw)]", inputs: ["x": r([2, c1, hw, hw])]) { b, t in
            [try b.permute(t["x"]!, [0, 2, 3, 1])]
        })
        let vocab = sd ? 49408 : 50
        var ids: [Int] = []
        for _ in 0..<(2 * context) { ids.append(Int(random.next() % UInt64(vocab))) }
        for idType in [DType.i32, .i64] {
            list.append(Case(op: .embedding, name: "embedding \(idType) [2,\(context)] of [\(vocab),\(cw)]",
                             inputs: ["ids": HostTensor(ids: ids, shape: [2, context], dtype: idType), "table": r([vocab, cw])]) { b, t in
                [try b.embedding(t["ids"]!, table: t["table"]!)]
            })
        }
        list.append(Case(op: .timestepEmbedding, name: "timestepEmbedding i64 [2]→\(c1)", inputs: ["t": HostTensor(ids: [999, 1], shape: [2])], dtypes: [.f32]) { b, t in
            [try b.timestepEmbedding(t["t"]!, dim: c1, flipSinToCos: true, downscaleFreqShift: 0, scale: 1, maxPeriod: 10000)]
        })
        list.append(Case(op: .timestepEmbedding, name: "timestepEmbedding f32 [2]→\(c1 + 1) shift 1", inputs: ["t": HostTensor([981.5, 3], shape: [2])], dtypes: [.f32]) { b, t in
            [try b.timestepEmbedding(t["t"]!, dim: c1 + 1, flipSinToCos: false, downscaleFreqShift: 1, scale: 1, maxPeriod: 10000)]
        })
        list.append(Case(op: .mean, name: "mean tokens [2,\(context),\(cw)]", inputs: ["x": r([2, context, cw])]) { b, t in
            [try b.mean(t["x"]!, dim: 1, keepDim: false)]
        })
        for target in [DType.f16, .bf16] {
            list.append(Case(op: .cast, name: "cast f32→\(target)→f32 [2,\(c1),\(hw),\(hw)]", inputs: ["x": r([2, c1, hw, hw])], dtypes: [.f32]) { b, t in
                [try b.cast(b.cast(t["x"]!, to: target), to: .f32)]
            })
        }
        // The adapter's optimizer (f32 only): the official adapter's largest tensor, 2048×2048, at SD scale.
        let (ar, ac) = sd ? (2048, 2048) : (37, 29)
        list.append(Case(op: .adamw, name: "adamw [\(ar),\(ac)]", inputs: ["p": r([ar, ac]), "m": r([ar, ac]), "v": r([ar, ac]), "g": r([ar, ac])],
                         dtypes: [.f32]) { b, t in
            let v = try b.binary(.mul, t["v"]!, t["v"]!)   // second moments are not negative
            let out = try b.adamw(parameter: t["p"]!, firstMoment: t["m"]!, secondMoment: v, gradient: t["g"]!,
                                  scalars: AdamWScalars(decay: 0.9999, weight1: 0.1, keep2: 0.999, weight2: 0.001,
                                                        stepSize: -3.3e-4, correction2Root: 0.0706, epsilon: 1e-8))
            return [out.parameter, out.firstMoment, out.secondMoment]
        })
        list.append(Case(op: .sumOfSquares, name: "sumOfSquares [\(ar),\(ac)]", inputs: ["x": r([ar, ac])], dtypes: [.f32]) { b, t in
            [try b.upload(HostTensor([Float(b.sumOfSquares(t["x"]!))], shape: [1]))]
        })

        // The backward ops (training the adapter through the UNet), at the forward cases' shapes.
        list.append(Case(op: .conv2dBackwardData, name: "conv2dBackwardData 3x3 [2,\(c1),\(hw),\(hw)]",
                         inputs: ["dy": r([2, c1, hw, hw]), "w": r([c1, c1, 3, 3])]) { b, t in
            [try b.conv2dBackwardData(t["dy"]!, weight: t["w"]!, inputShape: [2, c1, hw, hw], stride: (1, 1), padding: .uniform(1))]
        })
        list.append(Case(op: .conv2dBackwardData, name: "conv2dBackwardData 3x3 stride 2 pad (0,1,0,1)",
                         inputs: ["dy": r([1, c1 / 2, hw / 2, hw / 2]), "w": r([c1 / 2, c1 / 2, 3, 3])]) { b, t in
            [try b.conv2dBackwardData(t["dy"]!, weight: t["w"]!, inputShape: [1, c1 / 2, hw, hw], stride: (2, 2),
                                      padding: Padding2D(top: 0, bottom: 1, left: 0, right: 1))]
        })
        list.append(Case(op: .groupNormBackward, name: "groupNormBackward+silu [2,\(c1),\(hw),\(hw)] G\(groups)",
                         inputs: ["dy": r([2, c1, hw, hw]), "x": r([2, c1, hw, hw]), "g": r([c1]), "b": r([c1])]) { b, t in
            [try b.groupNormBackward(t["dy"]!, input: t["x"]!, groups: groups, weight: t["g"]!, bias: t["b"]!, eps: 1e-5, fuseSiLU: true)]
        })
        list.append(Case(op: .layerNormBackward, name: "layerNormBackward [2,\(tokens),\(c1)] with dγ, dβ",
                         inputs: ["dy": r([2, tokens, c1]), "x": r([2, tokens, c1]), "g": r([c1])]) { b, t in
            let grads = try b.layerNormBackward(t["dy"]!, input: t["x"]!, weight: t["g"]!, eps: 1e-5, parameterGradients: true)
            return [grads.input, grads.weight!, grads.bias!]
        })
        list.append(Case(op: .softmaxBackward, name: "softmaxBackward [16,\(tokens / 4),\(context)]",
                         inputs: ["dy": r([16, tokens / 4, context]), "x": r([16, tokens / 4, context])]) { b, t in
            [try b.softmaxBackward(t["dy"]!, output: b.softmax(t["x"]!))]
        })
        for kind in Activation.allCases where kind.hasBackward {
            list.append(Case(op: .activationBackward, name: "activationBackward \(kind.rawValue) [2,\(c4),\(hw / 2),\(hw / 2)]",
                             inputs: ["dy": r([2, c4, hw / 2, hw / 2]), "x": r([2, c4, hw / 2, hw / 2])]) { b, t in
                [try b.activationBackward(t["dy"]!, input: t["x"]!, kind)]
            })
        }
        list.append(Case(op: .gegluBackward, name: "gegluBackward [2,\(tokens),\(8 * c1)]",
                         inputs: ["dy": r([2, tokens, 4 * c1]), "x": r([2, tokens, 8 * c1])]) { b, t in
            [try b.gegluBackward(t["dy"]!, input: t["x"]!)]
        })
        list.append(Case(op: .upsampleNearest2xBackward, name: "upsampleNearest2xBackward [2,\(c4),\(hw),\(hw)]",
                         inputs: ["dy": r([2, c4, hw, hw])]) { b, t in
            [try b.upsampleNearest2xBackward(t["dy"]!)]
        })
        return list
    }

    /// A UNet with random weights (two blocks of SD1.5's layout at SD's widths, or tiny) on both backends,
    /// then evaluations repeated on the CUDA backend that must not call cudaMalloc again.
    static func unetChecks(_ scale: Scale, cuda: CUDABackend, cpu: CPUBackend, _ random: inout SplitMix64) -> [Check] {
        let sd = scale == .sd
        let (c1, c2, heads, groups, crossDim, hw, context) = sd ? (320, 640, 8, 32, 768, 32, 77) : (16, 24, 2, 8, 16, 8, 5)
        let name = "unet [\(c1),\(c2)] latent \(hw)x\(hw) batch 2 f32"
        func failed(_ name: String, _ message: String) -> Check {
            Check(name: name, relativeL2: .infinity, maxAbsolute: .infinity, tolerance: 1e-4, error: message)
        }
        let values: [String: JSONValue] = [
            "block_out_channels": .array([.number(Double(c1)), .number(Double(c2))]),
            "down_block_types": .array([.string("CrossAttnDownBlock2D"), .string("DownBlock2D")]),
            "up_block_types": .array([.string("UpBlock2D"), .string("CrossAttnUpBlock2D")]),
            "layers_per_block": .number(1), "attention_head_dim": .number(Double(heads)),
            "cross_attention_dim": .number(Double(crossDim)), "norm_num_groups": .number(Double(groups)),
        ]
        let inputs = [
            "sample": HostTensor(random.normals(2 * 4 * hw * hw), shape: [2, 4, hw, hw]),
            "timestep": HostTensor(ids: [999, 250], shape: [2]),
            "context": HostTensor(random.normals(2 * context * crossDim), shape: [2, context, crossDim]),
        ]
        func model(_ backend: any ComputeBackend) throws -> UNet2DConditionModel {
            let config = try UNetConfig(ConfigFile(path: "selftest-unet/config.json", values: values))
            return try UNet2DConditionModel(config: config, weights: Weights(RandomWeights(backend: backend, seed: 11)))
        }
        func evaluate(_ unet: UNet2DConditionModel, _ backend: any ComputeBackend) throws -> HostTensor {
            let output = try unet(DenoisingInputs(sample: backend.upload(inputs["sample"]!), timestep: backend.upload(inputs["timestep"]!),
                                             encoderHiddenStates: backend.upload(inputs["context"]!)))
            return try backend.download(output)
        }
        var checks: [Check] = []
        let expected: HostTensor, cudaUNet: UNet2DConditionModel, actual: HostTensor
        do { expected = try evaluate(model(cpu), cpu) } catch { return [failed(name, "cpu reference: \(error)")] }
        do {
            cudaUNet = try model(cuda)
            actual = try evaluate(cudaUNet, cuda)
        } catch { return [failed(name, "\(error)")] }
        let (relative, worst) = compare(actual.floats(), expected.floats())
        checks.append(Check(name: name, relativeL2: relative, maxAbsolute: worst, tolerance: 1e-4,
                            error: actual.shape == expected.shape ? nil : "shape \(actual.shape), expected \(expected.shape)"))

        let steady = "unet steady state: no new device allocations over 2 more evaluations"
        do {
            let before = try cuda.memoryStats()
            for _ in 0..<2 { _ = try evaluate(cudaUNet, cuda) }
            let after = try cuda.memoryStats()
            let grown = after.deviceAllocations - before.deviceAllocations
            checks.append(Check(name: steady, relativeL2: Double(grown), maxAbsolute: 0, tolerance: 0,
                                error: grown == 0 ? nil : "\(grown) cudaMalloc calls (\(before.deviceAllocations) → \(after.deviceAllocations))",
                                note: "\(after.deviceAllocations) cudaMalloc calls in all, peak \(after.peakBytes / (1 << 20)) MiB in use"))
        } catch {
            checks.append(failed(steady, "\(error)"))
        }
        return checks
    }
}
