import CKernels
import XCTest
@testable import PEADiffusion

/// The CPU backend's blockwise attention backward (ck_attention_backward_f32) against the composed backward
/// (ComputeBackend+Backward.swift, itself checked by finite differences in BackwardOpTests), on the shapes
/// that exercise its blocks: query counts past one 128-row block with a tail, cross-attention's 77 keys,
/// keys past 4096 (fewer rows per block, a count that does not divide the queries), D ≠ Dv, one head and
/// several. Also: the bits do not depend on the thread count (the forward's neither), and every GEMM kernel the
/// CPU runs agrees.
final class CPUAttentionBackwardTests: XCTestCase {
    private struct Case {
        var batch, queries, keys, heads, headDim, valueHeadDim: Int
        var scale: Float?
        var label: String { "B\(batch) Tq\(queries) Tk\(keys) H\(heads) D\(headDim) Dv\(valueHeadDim)" }
    }

    private let cases = [
        Case(batch: 2, queries: 150, keys: 150, heads: 3, headDim: 40, valueHeadDim: 40, scale: nil),   // 128 + 22 rows
        Case(batch: 1, queries: 260, keys: 77, heads: 2, headDim: 40, valueHeadDim: 40, scale: nil),    // cross-attention
        Case(batch: 2, queries: 37, keys: 19, heads: 3, headDim: 5, valueHeadDim: 7, scale: 0.7),       // D ≠ Dv
        Case(batch: 1, queries: 230, keys: 5000, heads: 1, headDim: 8, valueHeadDim: 8, scale: nil),    // 104 + 104 + 22 rows
        // one 512-wide head (the VAE's): its packed keys and values exceed the scratch a thread keeps (forward and
        // backward take a buffer of their own)
        Case(batch: 1, queries: 130, keys: 4200, heads: 1, headDim: 512, valueHeadDim: 512, scale: nil),
    ]

    /// The composed backward's tolerance: both compute in f32, with different exps (libm's and attention.c's)
    /// and summation orders; the largest difference measured is about 1e-6 of the gradients' largest element.
    private let tolerance = ParityTolerance(relativeL2: 1e-5, maxAbsolute: 1e-5)

    override func tearDown() {
        ck_gemm_set_kernel(nil)
        ck_set_num_threads(0)
        super.tearDown()
    }

    private func inputs(_ c: Case, on backend: CPUBackend) throws -> (dO: Tensor, q: Tensor, k: Tensor, v: Tensor) {
        var random = SplitMix64(seed: UInt64(c.queries * 1000 + c.keys))
        func tensor(_ shape: [Int]) throws -> Tensor { try backend.upload(random.normals(shape.reduce(1, *)), shape: shape) }
        return (try tensor([c.batch, c.queries, c.heads * c.valueHeadDim]), try tensor([c.batch, c.queries, c.heads * c.headDim]),
                try tensor([c.batch, c.keys, c.heads * c.headDim]), try tensor([c.batch, c.keys, c.heads * c.valueHeadDim]))
    }

    /// dq, dk, dv of the backend's own attentionBackward, concatenated.
    private func gradients(_ c: Case, threads: Int) throws -> [Float] {
        let backend = CPUBackend(threads: threads)
        let x = try inputs(c, on: backend)
        let g = try backend.attentionBackward(x.dO, q: x.q, k: x.k, v: x.v, heads: c.heads, scale: c.scale)
        XCTAssertEqual([g.q.shape, g.k.shape, g.v.shape], [x.q.shape, x.k.shape, x.v.shape], c.label)
        return try backend.downloadFloats(g.q) + backend.downloadFloats(g.k) + backend.downloadFloats(g.v)
    }

    private func composedGradients(_ c: Case) throws -> [Float] {
        let backend = CPUBackend(threads: 2)
        let x = try inputs(c, on: backend)
        let g = try backend.composedAttentionBackward(x.dO, q: x.q, k: x.k, v: x.v, heads: c.heads, scale: c.scale)
        return try backend.downloadFloats(g.q) + backend.downloadFloats(g.k) + backend.downloadFloats(g.v)
    }

    func testMatchesTheComposedBackward() throws {
        for c in cases {
            assertClose(try gradients(c, threads: 2), try composedGradients(c), tolerance, c.label)
        }
    }

    /// Each (b, h) is one unit of work whatever the thread count; with a single head the dV and dK products
    /// inside are spread over threads, and they split only output tiles.
    func testThreadCountDoesNotChangeTheBits() throws {
        for c in cases {
            XCTAssertEqual(try gradients(c, threads: 1), try gradients(c, threads: 2), c.label)
        }
    }

    /// The forward (ck_attention_f32) splits a head's query tiles into more runs when there are fewer heads than
    /// threads, each packing the head's keys and values itself: the same bits on one thread and two.
    func testForwardThreadCountDoesNotChangeTheBits() throws {
        func output(_ c: Case, threads: Int) throws -> [Float] {
            let backend = CPUBackend(threads: threads)
            let x = try inputs(c, on: backend)
            return try backend.downloadFloats(backend.attention(q: x.q, k: x.k, v: x.v, heads: c.heads, mask: nil,
                                                                causal: false, scale: c.scale))
        }
        for c in cases {
            XCTAssertEqual(try output(c, threads: 1), try output(c, threads: 2), c.label)
        }
    }

    /// The GEMMs inside the blocks on every kernel the CPU runs (AVX-512, AVX2+FMA, portable), each against
    /// the composed backward on the same kernel.
    func testEveryGEMMKernel() throws {
        let kernels: [String] = ["avx512", "avx2", "portable"].filter { ck_gemm_set_kernel($0) == CK_OK }
        XCTAssertTrue(kernels.contains("portable"))
        for kernel in kernels {
            XCTAssertEqual(ck_gemm_set_kernel(kernel), Int32(CK_OK))
            for c in cases.prefix(3) {
                assertClose(try gradients(c, threads: 2), try composedGradients(c), tolerance, "\(kernel) \(c.label)")
            }
        }
    }

    /// No keys: the output is constant (zeros), dQ = 0; no queries: dK = dV = 0. (No keys first: its blocks
    /// need no scratch, which must still not read as an allocation failure on a thread that has none yet.)
    func testEmptyTokenAxesGiveZeroGradients() throws {
        for c in [Case(batch: 1, queries: 5, keys: 0, heads: 2, headDim: 3, valueHeadDim: 4, scale: nil),
                  Case(batch: 1, queries: 0, keys: 5, heads: 2, headDim: 3, valueHeadDim: 4, scale: nil)] {
            let values = try gradients(c, threads: 2)
            XCTAssertEqual(values, [Float](repeating: 0, count: values.count), c.label)
            XCTAssertEqual(values, try composedGradients(c), c.label)
        }
    }
}
