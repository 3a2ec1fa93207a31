#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea bench kernels`'s options, declared once for its parser and its help.
enum BenchKernelsOptions {
    static let repeats = CommandOption.value(
        "--repeats", "R", .range(1...100_000), help: "timed samples per op (default 20 on CUDA, 3 on the CPU)")
    static let launches = CommandOption.value(
        "--launches", "N", .range(1...100_000), help: "runs per sample (default 10 on CUDA, 1 on the CPU)")
    static let gate = CommandOption.value(
        "--gate-us", "G", .range(0...10_000_000), help: "(CUDA) the spin gate before each sample, in µs (default 20·N + 200)")
    static let scale = CommandOption.value("--scale", "full|small", default: "full", .choices(["full", "small"]),
                                           help: "the shapes: SD1.5's, or 8-16× smaller")
    static let only = CommandOption.value("--only", "NAME[,NAME…]", help: "only the ops whose names contain one of these")
    static let json = CommandOption.flag("--json", help: "print a JSON list instead of the table")

    static let spec = CommandSpec(
        name: "bench kernels",
        usage: ["pea bench kernels [--backend auto|cpu|cuda] [--precision fp32|fp16|bf16] [--repeats R] [--launches N]",
                "                  [--gate-us G] [--scale full|small] [--only NAME[,NAME…]] [--json] [--threads T]"],
        description: """
            Times single backend ops on random data: at SD1.5 UNet shapes (64×64 latents, batch 2) group norm + SiLU,
            layer norm, attention (self and cross) and its backward (self at each level, cross; the backend's own and the
            composed one, *_bwd_composed), 3×3 conv2d (also with a residual, conv3x3_320_residual) and the bare batched
            GEMM of its im2col form (conv3x3_320_gemm:
            M = Cout, N = H·W, K = Cin·9, the weight shared by the batch), linear and a square GEMM, add, SiLU, GEGLU; and
            at SD1.5 VAE-decoder shapes (512×512 images, batch 1: group norm + SiLU on [1,128,512,512] and [1,512,128,128],
            add and SiLU on [1,128,512,512]) whose tensors exceed a 50 MB L2 cache, so GB/s there is DRAM bandwidth. Each
            op runs once as a warm-up, then R timed samples (default 20 on CUDA, 3 on the CPU) of N runs each (--launches,
            default 10 on CUDA, 1 on the CPU); a sample's time is divided by N.
              On CUDA a sample is timed on the device: a spin kernel holds the stream for G µs (--gate-us, default
              20·N + 200), while it spins the host queues a CUDA event, the N runs and a second event, and the sample is
              the GPU time between the two events. The runs thus execute back to back on the GPU, not paced by the host's
              launch rate (which would dominate a 5 µs kernel); inputs stay resident across runs, so tensors smaller than
              the L2 cache are read from it.
              On the CPU a sample is the host clock around the N runs, between two synchronize() calls.
            Reports the best and median time and, from the best, the achieved TFLOP/s (GEMM, conv, attention:
            4·B·H·Tq·Tk·D, its backward: 10·B·H·Tq·Tk·D for the five products S, dP, dV, dQ, dK) or GB/s (the others: the minimal bytes read + written, each input once, the output once).
            --scale small shrinks every shape 8-16× (a smoke test that finishes in seconds on the emulated CUDA library).
            --only keeps the ops whose names contain one of the comma-separated strings. --json prints a JSON list of
            objects {name, op, shape, dtype, backend, timing, best_ms, median_ms, gbps | tflops, repeats, params}; timing
            is "device" or "host"; params holds the dimensions (benchmarks/kernels_vs_torch.py builds the torch side from
            them).
            """,
        groups: [.init("Options", [repeats, launches, gate, scale, only, json] + BackendOptions.all)])
}

/// One op to time: how to build its inputs and run it once, and its work (FLOPs or minimal bytes).
private struct KernelCase {
    let name: String
    let op: String
    let shape: String
    /// Dimensions for the JSON (the torch script builds the same problem from them).
    let params: [(String, Int)]
    /// Floating-point operations of one run (compute-bound ops), or nil.
    let flops: Double?
    /// Minimal bytes moved by one run at element size `elementBytes` (memory-bound ops), or nil.
    let bytes: ((Int) -> Double)?
    /// Uploads the inputs and returns the closure that runs the op once (its result is dropped).
    let prepare: (any ComputeBackend, DType, inout SplitMix64) throws -> () throws -> Tensor
}

private struct KernelResult {
    let kernel: KernelCase
    let bestMs: Double
    let medianMs: Double
    let repeats: Int
    let gbps: Double?
    let tflops: Double?
}

/// The benchmark's problems. `small` shrinks spatial sizes 8× (token counts 64×), channels 8×.
private func kernelCases(small: Bool) -> [KernelCase] {
    let s = small ? 8 : 1
    let batch = 2
    var cases: [KernelCase] = []

    func upload(_ backend: any ComputeBackend, _ dtype: DType, _ random: inout SplitMix64, _ shape: [Int]) throws -> Tensor {
        try backend.upload(HostTensor(random.normals(shape.reduce(1, *)), shape: shape, dtype: dtype))
    }

    // Group norm + SiLU over [B, C, H, W] in G groups: a UNet ResNet block's norm1/norm2 at each level of the
    // 64×64 latent (batch 2: 64 groups, fewer than an H100's SMs; 0.3-5 MB per fp16 tensor, L2-resident), and the
    // VAE decoder's at 512×512 (batch 1; 67 and 17 MB per fp16 tensor, beyond the L2 cache).
    for (name, nb, c, hw, g) in [("group_norm_silu_\(320 / s)", batch, 320 / s, 64 / s, small ? 8 : 32),
                                 ("group_norm_silu_\(640 / s)x\(32 / s)", batch, 640 / s, 32 / s, small ? 8 : 32),
                                 ("group_norm_silu_\(1280 / s)x\(16 / s)", batch, 1280 / s, 16 / s, small ? 8 : 32),
                                 ("group_norm_silu_\(1280 / s)", batch, 1280 / s, small ? 4 : 8, small ? 8 : 32),
                                 ("group_norm_silu_vae_\(128 / s)x\(512 / s)", 1, 128 / s, 512 / s, small ? 8 : 32),
                                 ("group_norm_silu_vae_\(512 / s)x\(128 / s)", 1, 512 / s, 128 / s, small ? 8 : 32)] {
        let batch = nb
        let n = batch * c * hw * hw
        cases.append(KernelCase(
            name: name, op: "group_norm", shape: "[\(batch),\(c),\(hw),\(hw)] G=\(g)",
            params: [("B", batch), ("C", c), ("H", hw), ("W", hw), ("G", g), ("silu", 1)],
            flops: nil, bytes: { e in Double((2 * n + 2 * c) * e) },
            prepare: { backend, dtype, random in
                let x = try upload(backend, dtype, &random, [batch, c, hw, hw])
                let w = try upload(backend, dtype, &random, [c]), b = try upload(backend, dtype, &random, [c])
                return { try backend.groupNorm(x, groups: g, weight: w, bias: b, eps: 1e-5, fuseSiLU: true) }
            }))
    }

    // Layer norm over [B·T, C] (a transformer block's norm1/2/3 at 64×64).
    do {
        let rows = batch * 4096 / (s * s), c = 320 / s
        cases.append(KernelCase(
            name: "layer_norm", op: "layer_norm", shape: "[\(rows),\(c)]",
            params: [("R", rows), ("C", c)],
            flops: nil, bytes: { e in Double((2 * rows * c + 2 * c) * e) },
            prepare: { backend, dtype, random in
                let x = try upload(backend, dtype, &random, [rows, c])
                let w = try upload(backend, dtype, &random, [c]), b = try upload(backend, dtype, &random, [c])
                return { try backend.layerNorm(x, weight: w, bias: b, eps: 1e-5) }
            }))
    }

    // Attention in the projections' layout q [B, Tq, H·D], k/v [B, Tk, H·D]; FLOPs 4·B·H·Tq·Tk·D.
    let tokens = 4096 / (s * s)
    for (name, tq, tk, h, d) in [("attn_self_h5d64", tokens, tokens, 5, 64), ("attn_self_h8d40", tokens, tokens, 8, 40),
                                 ("attn_cross_h8d40", tokens, 77, 8, 40)] {
        cases.append(KernelCase(
            name: name, op: "attention", shape: "B=\(batch) H=\(h) Tq=\(tq) Tk=\(tk) D=\(d)",
            params: [("B", batch), ("H", h), ("Tq", tq), ("Tk", tk), ("D", d)],
            flops: 4 * Double(batch * h) * Double(tq) * Double(tk) * Double(d), bytes: nil,
            prepare: { backend, dtype, random in
                let q = try upload(backend, dtype, &random, [batch, tq, h * d])
                let k = try upload(backend, dtype, &random, [batch, tk, h * d])
                let v = try upload(backend, dtype, &random, [batch, tk, h * d])
                return { try backend.attention(q: q, k: k, v: v, heads: h, mask: nil, causal: false, scale: nil) }
            }))
    }

    // Attention's backward (the training step's) at head dim 40: dq, dk, dv from dO, self-attention at each
    // UNet level and cross-attention, each by the backend's own backward and by the composed one
    // (ComputeBackend+Backward.swift: Tq×Tk matrices through memory), so one run shows what the fused one gains.
    // FLOPs 10·B·H·Tq·Tk·D: S, dP = dO·Vᵀ, dV, dQ, dK, 2·B·H·Tq·Tk·D each (recomputations not counted).
    for (name, tq, tk) in [("attn_self_h8d40", tokens, tokens), ("attn_self_h8d40_t\(tokens / 4)", tokens / 4, tokens / 4),
                           ("attn_self_h8d40_t\(tokens / 16)", tokens / 16, tokens / 16), ("attn_cross_h8d40", tokens, 77)] {
        for composed in [false, true] {
            let (h, d) = (8, 40)
            cases.append(KernelCase(
                name: name + (composed ? "_bwd_composed" : "_bwd"), op: "attention_backward",
                shape: "B=\(batch) H=\(h) Tq=\(tq) Tk=\(tk) D=\(d)",
                params: [("B", batch), ("H", h), ("Tq", tq), ("Tk", tk), ("D", d)],
                flops: 10 * Double(batch * h) * Double(tq) * Double(tk) * Double(d), bytes: nil,
                prepare: { backend, dtype, random in
                    let q = try upload(backend, dtype, &random, [batch, tq, h * d])
                    let k = try upload(backend, dtype, &random, [batch, tk, h * d])
                    let v = try upload(backend, dtype, &random, [batch, tk, h * d])
                    let dO = try upload(backend, dtype, &random, [batch, tq, h * d])
                    if composed {
                        return { try backend.composedAttentionBackward(dO, q: q, k: k, v: v, heads: h, scale: nil).q }
                    }
                    return { try backend.attentionBackward(dO, q: q, k: k, v: v, heads: h, scale: nil).q }  // all three are computed
                }))
        }
    }

    // 3×3 convolutions, padding 1, with bias: FLOPs 2·B·Cout·H·W·Cin·9.
    for (c, hw) in [(320 / s, 64 / s), (1280 / s, 16 / (small ? 4 : 1))] {
        cases.append(KernelCase(
            name: "conv3x3_\(c)", op: "conv2d", shape: "[\(batch),\(c),\(hw),\(hw)] → \(c), 3×3 pad 1",
            params: [("B", batch), ("Cin", c), ("Cout", c), ("H", hw), ("W", hw), ("k", 3), ("pad", 1)],
            flops: 2 * Double(batch * c * hw * hw) * Double(c * 9), bytes: nil,
            prepare: { backend, dtype, random in
                let x = try upload(backend, dtype, &random, [batch, c, hw, hw])
                let w = try upload(backend, dtype, &random, [c, c, 3, 3]), b = try upload(backend, dtype, &random, [c])
                return { try backend.conv2d(x, weight: w, bias: b, stride: (1, 1), padding: .uniform(1)) }
            }))
    }
    // conv3x3_320 with a residual added (ResnetBlock2D's conv2 + skip): fused into the epilogue where the backend can.
    do {
        let c = 320 / s, hw = 64 / s
        cases.append(KernelCase(
            name: "conv3x3_\(c)_residual", op: "conv2d", shape: "[\(batch),\(c),\(hw),\(hw)] → \(c), 3×3 pad 1, + residual",
            params: [("B", batch), ("Cin", c), ("Cout", c), ("H", hw), ("W", hw), ("k", 3), ("pad", 1), ("residual", 1)],
            flops: 2 * Double(batch * c * hw * hw) * Double(c * 9), bytes: nil,
            prepare: { backend, dtype, random in
                let x = try upload(backend, dtype, &random, [batch, c, hw, hw]), r = try upload(backend, dtype, &random, [batch, c, hw, hw])
                let w = try upload(backend, dtype, &random, [c, c, 3, 3]), b = try upload(backend, dtype, &random, [c])
                return { try backend.conv2d(x, weight: w, bias: b, stride: (1, 1), padding: .uniform(1), residual: r) }
            }))
    }

    // The bare GEMM of conv3x3_320 in its im2col form: w [Cout, Cin·9] times cols [B, Cin·9, H·W], w shared by
    // the batch (the issue's yardstick: conv2d within 1.3× of it).
    do {
        let c = 320 / s, hw = 64 / s
        let m = c, k = c * 9, n = hw * hw
        cases.append(KernelCase(
            name: "conv3x3_\(c)_gemm", op: "gemm", shape: "[\(m),\(k)]·[\(batch),\(k),\(n)]",
            params: [("batch", batch), ("M", m), ("N", n), ("K", k)],
            flops: 2 * Double(batch) * Double(m) * Double(n) * Double(k), bytes: nil,
            prepare: { backend, dtype, random in
                let a = try upload(backend, dtype, &random, [m, k]), b = try upload(backend, dtype, &random, [batch, k, n])
                return { try backend.gemm(a, b, transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil) }
            }))
    }

    // Linear x [M, K] · Wᵀ (W [N, K]) + bias (the feed-forward's first projection at 320 channels, 4×).
    do {
        let m = batch * tokens, k = 320 / s, n = 1280 / s
        cases.append(KernelCase(
            name: "linear_\(k)x\(n)", op: "linear", shape: "[\(m),\(k)]·[\(n),\(k)]ᵀ",
            params: [("M", m), ("N", n), ("K", k)],
            flops: 2 * Double(m) * Double(n) * Double(k), bytes: nil,
            prepare: { backend, dtype, random in
                let x = try upload(backend, dtype, &random, [m, k])
                let w = try upload(backend, dtype, &random, [n, k]), b = try upload(backend, dtype, &random, [n])
                return { try backend.linear(x, weight: w, bias: b) }
            }))
    }

    // A square GEMM, the peak a GEMM-bound op can hope for.
    do {
        let n = small ? 256 : 4096
        cases.append(KernelCase(
            name: "gemm_\(n)", op: "gemm", shape: "\(n)×\(n)×\(n)",
            params: [("M", n), ("N", n), ("K", n)],
            flops: 2 * Double(n) * Double(n) * Double(n), bytes: nil,
            prepare: { backend, dtype, random in
                let a = try upload(backend, dtype, &random, [n, n]), b = try upload(backend, dtype, &random, [n, n])
                return { try backend.gemm(a, b, transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil) }
            }))
    }

    // Elementwise: add (residual), SiLU at the UNet's [2,320,64,64] and the VAE decoder's [1,128,512,512]
    // (beyond the L2 cache); GEGLU [R, 2D] → [R, D].
    for (suffix, nb, c, hw) in [("", batch, 320 / s, 64 / s), ("_vae", 1, 128 / s, 512 / s)] {
        let n = nb * c * hw * hw
        let shape = [nb, c, hw, hw]
        let text = "[\(nb),\(c),\(hw),\(hw)]"
        cases.append(KernelCase(
            name: "add" + suffix, op: "add", shape: text, params: [("B", nb), ("C", c), ("H", hw), ("W", hw)],
            flops: nil, bytes: { e in Double(3 * n * e) },
            prepare: { backend, dtype, random in
                let a = try upload(backend, dtype, &random, shape), b = try upload(backend, dtype, &random, shape)
                return { try backend.add(a, b) }
            }))
        cases.append(KernelCase(
            name: "silu" + suffix, op: "silu", shape: text, params: [("B", nb), ("C", c), ("H", hw), ("W", hw)],
            flops: nil, bytes: { e in Double(2 * n * e) },
            prepare: { backend, dtype, random in
                let x = try upload(backend, dtype, &random, shape)
                return { try backend.activation(x, .silu) }
            }))
    }
    do {
        let rows = batch * tokens, d = 1280 / s
        cases.append(KernelCase(
            name: "geglu", op: "geglu", shape: "[\(rows),\(2 * d)] → [\(rows),\(d)]", params: [("R", rows), ("D", d)],
            flops: nil, bytes: { e in Double(3 * rows * d * e) },
            prepare: { backend, dtype, random in
                let x = try upload(backend, dtype, &random, [rows, 2 * d])
                return { try backend.geglu(x) }
            }))
    }
    return cases
}

func runBenchKernels(_ arguments: [String]) throws {
    typealias O = BenchKernelsOptions
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    let options = try O.spec.parse(arguments)
    let scale = try options.string(O.scale)
    let selection = try BackendOptions.select(options)
    let backend = selection.backend, dtype = selection.dtype
    let repeats = try options.optionalInt(O.repeats) ?? (backend.name == "cpu" ? 3 : 20)
    let launches = try options.optionalInt(O.launches) ?? (backend.name == "cpu" ? 1 : 10)
    let gateMicroseconds = try options.optionalInt(O.gate) ?? 20 * launches + 200
    let deviceTimer = backend as? CUDABackend
    var cases = kernelCases(small: scale == "small")
    if let only = try options.optionalString(O.only) {
        let wanted = only.split(separator: ",").map(String.init)
        cases = cases.filter { c in wanted.contains { c.name.contains($0) } }
        guard !cases.isEmpty else {
            throw PEAError.usage("bench kernels: --only '\(only)' matches no kernel (names: "
                + kernelCases(small: false).map(\.name).joined(separator: ", ") + ")")
        }
    }
    let json = options.has(O.json)
    var device = backend.name
    if let cuda = backend as? CUDABackend { device = "cuda \(cuda.deviceName)" }
    if !json {
        print("kernels on \(device), \(dtype), \(scale) shapes, 1 warm-up + \(repeats) timed samples of \(launches) run(s) each, "
            + (deviceTimer != nil ? "device-timed (CUDA events after a \(gateMicroseconds) µs spin gate)" : "host-timed"))
    }

    var results: [KernelResult] = []
    var random = SplitMix64(seed: 11)
    for kernel in cases {
        let run = try kernel.prepare(backend, dtype, &random)
        try backend.synchronize()
        _ = try run()   // warm-up: kernel selection, workspace and allocator cache, page faults
        try backend.synchronize()
        var times: [Double] = []
        for _ in 0..<repeats {
            try backend.synchronize()
            if let cuda = deviceTimer {
                times.append(try cuda.deviceTimedMilliseconds(launches: launches, gateMicroseconds: Double(gateMicroseconds)) {
                    _ = try run()
                })
            } else {
                let start = monotonicSeconds()
                for _ in 0..<launches { _ = try run() }
                try backend.synchronize()
                times.append((monotonicSeconds() - start) * 1000 / Double(launches))
            }
        }
        times.sort()
        let best = times[0]
        let median = times.count % 2 == 1 ? times[times.count / 2] : (times[times.count / 2 - 1] + times[times.count / 2]) / 2
        let result = KernelResult(
            kernel: kernel, bestMs: best, medianMs: median, repeats: times.count,
            gbps: kernel.bytes.map { $0(dtype.byteSize) / (best * 1e-3) / 1e9 },
            tflops: kernel.flops.map { $0 / (best * 1e-3) / 1e12 })
        results.append(result)
        if !json { printKernelRow(result) }
    }
    if json {
        // One object a line inside the list, as benchmarks/kernels_vs_torch.py reads it.
        print("[")
        for (i, r) in results.enumerated() {
            var object: [String: JSONValue] = [
                "name": .string(r.kernel.name), "op": .string(r.kernel.op), "shape": .string(r.kernel.shape),
                "dtype": .string("\(dtype)"), "backend": .string(device), "timing": .string(deviceTimer != nil ? "device" : "host"),
                "best_ms": .number(rounded(r.bestMs, 4)), "median_ms": .number(rounded(r.medianMs, 4)),
                "repeats": .number(Double(r.repeats)),
                "params": .object(Dictionary(uniqueKeysWithValues: r.kernel.params.map { ($0.0, JSONValue.number(Double($0.1))) }))]
            if let gbps = r.gbps { object["gbps"] = .number(rounded(gbps, 3)) } else { object["tflops"] = .number(rounded(r.tflops ?? 0, 4)) }
            print("  " + JSONValue.object(object).serialized() + (i + 1 < results.count ? "," : ""))
        }
        print("]")
    }
}

private func printKernelRow(_ r: KernelResult) {
    let rate = r.gbps.map { "\(decimal($0, $0 < 10 ? 3 : 1)) GB/s" }
        ?? "\(decimal(r.tflops ?? 0, (r.tflops ?? 0) < 0.01 ? 5 : 3)) TFLOP/s"
    // at least one space after each column, however long the name
    func pad(_ s: String, _ width: Int) -> String { s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count) }
    func left(_ s: String, _ width: Int) -> String { s.count >= width ? s : String(repeating: " ", count: width - s.count) + s }
    print(pad(r.kernel.name, 35) + pad(r.kernel.shape, 36) + "best " + left(decimal(r.bestMs, 3), 10) + " ms  median "
        + left(decimal(r.medianMs, 3), 10) + " ms  " + left(rate, 16))
}

/// `x` with `digits` decimals (printf %.Nf; Swift's description would print exponents).
private func decimal(_ x: Double, _ digits: Int) -> String { printfFormatted("%.\(digits)f", x) }
