import CKernels

/// `pea selftest`: quick checks that a backend's fast paths agree with plain references, at SD-sized shapes.
/// On the CPU: the blocked SIMD GEMM (every kernel the CPU can run) against the triple loop, and the tiled
/// online-softmax attention against the explicit QKᵀ → softmax → ·V composition.
public enum SelfTest {
    public struct Check {
        public let name: String
        public let relativeL2: Double
        public let maxAbsolute: Double
        public var passed: Bool { relativeL2 <= 1e-4 }
    }

    public static func run(on backend: CPUBackend) throws -> [Check] {
        var checks: [Check] = []
        var random = SplitMix64(seed: 2024)
        let kernels: [String] = ["avx512", "avx2", "portable"].filter { ck_gemm_set_kernel($0) == CK_OK }
        defer { ck_gemm_set_kernel(nil) }
        for kernel in kernels {
            ck_gemm_set_kernel(kernel)
            for (m, n, k, ta, tb) in [(320, 257, 2880, 0, 0), (77, 768, 768, 0, 1), (131, 40, 333, 1, 0)] {
                let a = random.normals(m * k), b = random.normals(k * n)
                var fast = [Float](repeating: 0, count: m * n), reference = fast
                let lda = ta == 1 ? m : k, ldb = tb == 1 ? k : n
                ck_sgemm(Int32(ta), Int32(tb), Int64(m), Int64(n), Int64(k), 1, a, Int64(lda), b, Int64(ldb), 0, &fast, Int64(n))
                ck_sgemm_reference(Int32(ta), Int32(tb), Int64(m), Int64(n), Int64(k), 1, a, Int64(lda), b, Int64(ldb), 0, &reference, Int64(n))
                checks.append(compare("gemm \(kernel) \(m)x\(n)x\(k) trans \(ta)\(tb)", fast, reference))
            }
        }
        for (heads, queries, keys, headDim) in [(8, 1024, 77, 40), (2, 1024, 1024, 64)] {
            let width = heads * headDim
            let q = try backend.upload(random.normals(queries * width), shape: [1, queries, width])
            let k = try backend.upload(random.normals(keys * width), shape: [1, keys, width])
            let v = try backend.upload(random.normals(keys * width), shape: [1, keys, width])
            let fused = try backend.attention(q: q, k: k, v: v, heads: heads, mask: nil, causal: false, scale: nil)
            let explicit = try explicitAttention(backend, q, k, v, heads: heads)
            checks.append(compare("attention heads \(heads) \(queries)x\(keys) d\(headDim)",
                                  try backend.downloadFloats(fused), try backend.downloadFloats(explicit)))
        }
        return checks
    }

    /// softmax(q·kᵀ/√d)·v per head, materialising the score matrix: the composition the fused kernel replaces.
    static func explicitAttention(_ backend: CPUBackend, _ q: Tensor, _ k: Tensor, _ v: Tensor, heads: Int) throws -> Tensor {
        let (b, tq, tk, width) = (q.shape[0], q.shape[1], k.shape[1], q.shape[2])
        let d = width / heads
        func split(_ x: Tensor, _ t: Int) throws -> Tensor {
            try backend.permute(x.reshaped([b, t, heads, d]), [0, 2, 1, 3]).reshaped([b * heads, t, d])
        }
        let scores = try backend.gemm(split(q, tq), split(k, tk), transposeA: false, transposeB: true,
                                      alpha: 1 / Float(d).squareRoot(), beta: 0, c: nil)
        let out = try backend.gemm(backend.softmax(scores), split(v, tk), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil)
        return try backend.permute(out.reshaped([b, heads, tq, d]), [0, 2, 1, 3]).reshaped([b, tq, width])
    }

    static func compare(_ name: String, _ actual: [Float], _ expected: [Float]) -> Check {
        var diff2 = 0.0, ref2 = 0.0, worst = 0.0
        for (a, e) in zip(actual, expected) {
            let d = Double(a) - Double(e)
            diff2 += d * d
            ref2 += Double(e) * Double(e)
            worst = max(worst, abs(d))
        }
        return Check(name: name, relativeL2: ref2 > 0 ? (diff2 / ref2).squareRoot() : diff2.squareRoot(), maxAbsolute: worst)
    }
}
