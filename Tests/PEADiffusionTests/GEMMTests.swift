import CKernels
import XCTest
@testable import PEADiffusion

/// The blocked SIMD GEMM (ck_sgemm, ck_sgemm_batched) against the plain triple loop (ck_sgemm_reference),
/// for every kernel this CPU can run, every transpose combination, shapes that hit every edge of the
/// blocking, padded leading dimensions, alpha/beta, and one and two threads.
///
/// Tolerance: both results are sums of the same K products in different orders (blocking over K, FMA or
/// not), then scaled by alpha and added to beta·C. Each is within γ·(|alpha|·Σ_k|a_ik·b_kj| + |beta·c_ij|)
/// of the exact value, with γ ≈ (K + a few)·u, u = 2⁻²⁴ (the classic bound for recursive summation, plus
/// the roundings of the alpha scaling, the per-KC-slice accumulation into C, and the beta term). Their
/// difference is therefore within twice that, which is what `assertMatchesReference` allows: a bound that
/// scales with K and with the magnitudes involved, never a fixed epsilon. A wrong index or a lost slice
/// produces errors of the order of the terms themselves, far outside it.
final class GEMMTests: XCTestCase {
    private var savedThreads: Int32 = 0

    override func setUp() {
        super.setUp()
        savedThreads = ck_get_num_threads()
    }

    override func tearDown() {
        ck_gemm_set_kernel(nil)
        ck_set_num_threads(savedThreads)
        super.tearDown()
    }

    /// The kernels this CPU can run, in the order the header lists them. "portable" runs everywhere.
    private func supportedKernels() -> [String] {
        let kernels: [String] = ["avx512", "avx2", "portable"].filter { ck_gemm_set_kernel($0) == CK_OK }
        ck_gemm_set_kernel(nil)
        return kernels
    }

    // MARK: - Data

    /// SplitMix64: a seeded generator, so every run tests the same numbers.
    private struct SeededRandom {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        mutating func float() -> Float { Float(next() >> 40) / Float(1 << 24) * 2 - 1 }
        mutating func floats(_ count: Int) -> [Float] { (0..<count).map { _ in float() } }
    }

    /// One GEMM problem as stored in memory: A is rowsA×lda, B is rowsB×ldb, C is M×ldc (the padding
    /// columns of each are filled too, so reading or writing them is caught).
    private struct Problem {
        var transA = false, transB = false
        var m = 1, n = 1, k = 1
        var alpha: Float = 1, beta: Float = 0
        var pad = 0
        var lda: Int { (transA ? m : k) + pad }
        var ldb: Int { (transB ? k : n) + pad }
        var ldc: Int { n + pad }
        var rowsA: Int { transA ? k : m }
        var rowsB: Int { transB ? n : k }
        var label: String {
            "\(m)x\(n)x\(k) tA=\(transA) tB=\(transB) alpha=\(alpha) beta=\(beta) pad=\(pad)"
        }
    }

    // MARK: - Checking

    /// Σ_k |a_ik|·|b_kj| for every (i, j): the scale of the rounding error of c_ij, computed by the
    /// reference GEMM on absolute values (its own rounding changes the bound by a factor 1 + O(K·u)).
    private func magnitudes(_ p: Problem, _ a: [Float], _ b: [Float]) -> [Float] {
        let absA = a.map { abs($0) }, absB = b.map { abs($0) }
        var s = [Float](repeating: 0, count: p.m * p.ldc)
        ck_sgemm_reference(p.transA ? 1 : 0, p.transB ? 1 : 0, Int64(p.m), Int64(p.n), Int64(p.k), 1, absA,
                           Int64(p.lda), absB, Int64(p.ldb), 0, &s, Int64(p.ldc))
        return s
    }

    /// Asserts that `actual` equals `expected` within the bound of the class comment, and that the padding
    /// columns of C are bit-for-bit what they were (`original`).
    private func assertMatchesReference(_ actual: [Float], _ expected: [Float], original: [Float],
                                        magnitudes s: [Float], _ p: Problem, _ what: String,
                                        file: StaticString = #filePath, line: UInt = #line) {
        let u = Double(Float.ulpOfOne) / 2
        let gamma = Double(2 * p.k + 16) * u
        var failures = 0
        for i in 0..<p.m {
            for j in 0..<p.ldc {
                let index = i * p.ldc + j
                if j >= p.n {
                    if actual[index].bitPattern != original[index].bitPattern {
                        failures += 1
                        if failures <= 3 { XCTFail("\(what): padding C[\(i), \(j)] was written", file: file, line: line) }
                    }
                    continue
                }
                let x = Double(actual[index]), r = Double(expected[index])
                let betaTerm = p.beta == 0 ? 0 : abs(Double(p.beta) * Double(original[index]))
                let bound = gamma * (abs(Double(p.alpha)) * Double(s[index]) + betaTerm) + 1e-30
                if !(abs(x - r) <= bound) {  // also catches NaN
                    failures += 1
                    if failures <= 3 {
                        XCTFail("\(what): C[\(i), \(j)] = \(x), reference \(r), |diff| \(abs(x - r)) > bound \(bound)",
                                file: file, line: line)
                    }
                }
            }
        }
        if failures > 3 { XCTFail("\(what): \(failures) elements out of bound in all", file: file, line: line) }
    }

    /// Runs ck_sgemm on problem `p` with random data, with every supported kernel on one and two threads,
    /// and checks each result against ck_sgemm_reference (computed once). With beta = 0, C starts as NaN
    /// everywhere: none of it may reach the result.
    private func check(_ p: Problem, seed: UInt64, file: StaticString = #filePath, line: UInt = #line) {
        var random = SeededRandom(state: seed)
        let a = random.floats(p.rowsA * p.lda)
        let b = random.floats(p.rowsB * p.ldb)
        let original = p.beta == 0 ? [Float](repeating: .nan, count: p.m * p.ldc) : random.floats(p.m * p.ldc)
        let tA: Int32 = p.transA ? 1 : 0, tB: Int32 = p.transB ? 1 : 0
        var reference = original
        ck_sgemm_reference(tA, tB, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha, a, Int64(p.lda), b, Int64(p.ldb),
                           p.beta, &reference, Int64(p.ldc))
        let s = magnitudes(p, a, b)
        for kernel in supportedKernels() {
            XCTAssertEqual(ck_gemm_set_kernel(kernel), Int32(CK_OK))
            for threads: Int32 in [1, 2] {
                ck_set_num_threads(threads)
                var fast = original
                ck_sgemm(tA, tB, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha, a, Int64(p.lda), b, Int64(p.ldb),
                         p.beta, &fast, Int64(p.ldc))
                assertMatchesReference(fast, reference, original: original, magnitudes: s, p,
                                       "\(kernel) \(threads) threads \(p.label)", file: file, line: line)
            }
        }
        ck_gemm_set_kernel(nil)
    }

    // MARK: - Tests

    func testKernelSelection() {
        let kernels = supportedKernels()
        XCTAssertTrue(kernels.contains("portable"), "the portable kernel must run everywhere")
        XCTAssertTrue(kernels.contains(String(cString: ck_gemm_kernel())), "the automatic choice is a supported kernel")
        XCTAssertEqual(String(cString: ck_gemm_kernel()), kernels.first, "the automatic choice is the best one")
        for name in kernels {
            XCTAssertEqual(ck_gemm_set_kernel(name), Int32(CK_OK))
            XCTAssertEqual(String(cString: ck_gemm_kernel()), name)
        }
        XCTAssertEqual(ck_gemm_set_kernel("sse9"), Int32(CK_EINVAL))
        XCTAssertEqual(ck_gemm_set_kernel(""), Int32(CK_EINVAL))
        XCTAssertEqual(String(cString: ck_gemm_kernel()), kernels.last, "a refused name leaves the kernel as it was")
        XCTAssertEqual(ck_gemm_set_kernel(nil), Int32(CK_OK))
        XCTAssertEqual(String(cString: ck_gemm_kernel()), kernels.first)
    }

    /// Degenerate and awkward shapes: single rows and columns, K = 1, sizes that are multiples of none of
    /// MR (4, 6, 12), NR (8, 16, 32), KC or MC, and both sides of the direct small-product path.
    func testAwkwardShapesAllTransposes() {
        let shapes: [(m: Int, n: Int, k: Int)] = [
            (1, 1, 1), (1, 300, 70), (300, 1, 70), (1, 1, 600), (37, 53, 1), (37, 53, 301), (129, 67, 513),
            (13, 40, 17), (31, 31, 35), (64, 64, 64), (7, 100, 1000),
            // last slivers of 4 or 8 rows and 8 or 16 columns (the AVX-512 edge variants): attention's P·V,
            // dQ, its backward's D = 80
            (64, 40, 256), (56, 48, 40), (128, 80, 37), (40, 8, 9),
        ]
        let scalings: [(alpha: Float, beta: Float)] = [(1, 0), (-0.75, 0), (1.5, 1), (0.5, -0.5)]
        for (index, shape) in shapes.enumerated() {
            for transA in [false, true] {
                for transB in [false, true] {
                    let scaling = scalings[(index + (transA ? 1 : 0) + (transB ? 2 : 0)) % scalings.count]
                    let p = Problem(transA: transA, transB: transB, m: shape.m, n: shape.n, k: shape.k,
                                    alpha: scaling.alpha, beta: scaling.beta, pad: index % 3 == 1 ? 5 : 0)
                    check(p, seed: UInt64(index * 16 + 1))
                }
            }
        }
    }

    /// ck_sgemm_pack_b + ck_sgemm_packed (B packed once, as attention packs a head's keys and values) against
    /// the reference, with every kernel; and bit for bit against ck_sgemm on one thread where ck_sgemm takes
    /// its blocked path (products of at least 32³ multiply-adds and more than one row). Shapes: attention's
    /// S = Q·Kᵀ and dQ = dS·K (K cut into many KC slices), a single row, awkward sizes with padded leading
    /// dimensions, K = 0 (C = beta·C).
    func testPackedBMatchesTheReferenceAndTheBlockedPath() {
        let problems = [
            Problem(transA: false, transB: true, m: 128, n: 256, k: 40, alpha: 0.158, beta: 0),
            Problem(transA: false, transB: false, m: 128, n: 40, k: 4096, alpha: 0.5, beta: 0, pad: 3),
            Problem(transA: false, transB: false, m: 77, n: 80, k: 300, alpha: 1, beta: 1),
            Problem(transA: true, transB: true, m: 37, n: 53, k: 301, alpha: -0.75, beta: 0.5, pad: 5),
            Problem(transA: false, transB: true, m: 1, n: 77, k: 40, alpha: 1, beta: 0),
            Problem(transA: false, transB: false, m: 13, n: 40, k: 0, alpha: 1, beta: 0.5),
        ]
        for (index, p) in problems.enumerated() {
            var random = SeededRandom(state: UInt64(300 + index))
            let a = random.floats(p.rowsA * p.lda), b = random.floats(max(p.rowsB * p.ldb, 1))
            let original = p.beta == 0 ? [Float](repeating: .nan, count: p.m * p.ldc) : random.floats(p.m * p.ldc)
            let tA: Int32 = p.transA ? 1 : 0, tB: Int32 = p.transB ? 1 : 0
            var reference = original
            ck_sgemm_reference(tA, tB, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha, a, Int64(p.lda), b,
                               Int64(p.ldb), p.beta, &reference, Int64(p.ldc))
            let s = magnitudes(p, a, b)
            for kernel in supportedKernels() {
                XCTAssertEqual(ck_gemm_set_kernel(kernel), Int32(CK_OK))
                let floats = ck_sgemm_packed_b_floats(Int64(p.k), Int64(p.n))
                XCTAssertEqual(floats % 16, 0, "\(kernel) \(p.label): packed size keeps the next packing aligned")
                let packed = UnsafeMutableRawPointer.allocate(byteCount: floats * 4, alignment: 64)
                    .bindMemory(to: Float.self, capacity: floats)
                defer { packed.deallocate() }
                ck_sgemm_pack_b(tB, Int64(p.k), Int64(p.n), b, Int64(p.ldb), packed)
                var fast = original
                ck_sgemm_packed(tA, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha, a, Int64(p.lda), packed, p.beta,
                                &fast, Int64(p.ldc))
                let what = "\(kernel) packed B \(p.label)"
                assertMatchesReference(fast, reference, original: original, magnitudes: s, p, what)
                if p.m > 1 && p.m * p.n * p.k >= 32 * 32 * 32 {
                    ck_set_num_threads(1)
                    var blocked = original
                    ck_sgemm(tA, tB, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha, a, Int64(p.lda), b, Int64(p.ldb),
                             p.beta, &blocked, Int64(p.ldc))
                    XCTAssertEqual(fast.map(\.bitPattern), blocked.map(\.bitPattern), "\(what): ck_sgemm's bits")
                }
            }
        }
        ck_gemm_set_kernel(nil)
    }

    /// A product larger than one MC×KC×NC block in every dimension (MC ≤ 192, KC ≤ 320, NC ≤ 4096 for
    /// every kernel), so every loop of the blocking runs more than once and ends on a partial block, with
    /// padded leading dimensions, beta = 0 over NaN and beta ≠ 0.
    func testLargerThanOneBlockInEveryDimension() {
        for transA in [false, true] {
            for transB in [false, true] {
                let beta: Float = transA == transB ? 0 : 0.25
                let p = Problem(transA: transA, transB: transB, m: 203, n: 4133, k: 341, alpha: 0.5, beta: beta,
                                pad: 3)
                check(p, seed: 7)
            }
        }
    }

    /// Tall-skinny and wide-short products, like the UNet's deepest convolutions and its linear layers:
    /// the threads must split them along the long side and still agree with the reference.
    func testSkinnyShapesSplitAcrossThreads() {
        let shapes: [(m: Int, n: Int, k: Int, transB: Bool)] = [
            (250, 20, 1500, false), (20, 700, 300, false), (700, 24, 90, true), (9, 9, 4000, false),
        ]
        for (index, s) in shapes.enumerated() {
            check(Problem(transA: false, transB: s.transB, m: s.m, n: s.n, k: s.k, alpha: 1, beta: 0),
                  seed: UInt64(100 + index))
        }
    }

    /// ck_sgemm_batched against the reference applied item by item, for both of its strategies (many small
    /// products spread over threads, and few large ones each using every thread) and stride 0 broadcasts
    /// of A, of B, and of C (every item then accumulates into the same C, in order).
    func testBatchedWithBroadcast() {
        struct Case { var m, n, k, batch: Int; var strideAZero, strideBZero, strideCZero: Bool; var beta: Float }
        let cases = [
            Case(m: 16, n: 24, k: 40, batch: 9, strideAZero: false, strideBZero: true, strideCZero: false, beta: 0),
            Case(m: 33, n: 17, k: 65, batch: 8, strideAZero: true, strideBZero: false, strideCZero: false, beta: 0.5),
            Case(m: 270, n: 260, k: 250, batch: 3, strideAZero: false, strideBZero: true, strideCZero: false, beta: 0),
            Case(m: 60, n: 70, k: 150, batch: 6, strideAZero: false, strideBZero: false, strideCZero: true, beta: 1),
            Case(m: 60, n: 70, k: 150, batch: 6, strideAZero: false, strideBZero: false, strideCZero: true, beta: 0),
        ]
        for kernel in supportedKernels() {
            XCTAssertEqual(ck_gemm_set_kernel(kernel), Int32(CK_OK))
            for threads: Int32 in [1, 2] {
                ck_set_num_threads(threads)
                for (index, c) in cases.enumerated() {
                    for transB in [false, true] {
                        let p = Problem(transA: false, transB: transB, m: c.m, n: c.n, k: c.k, alpha: 1.25,
                                        beta: c.beta, pad: 2)
                        let sizeA = p.rowsA * p.lda, sizeB = p.rowsB * p.ldb, sizeC = p.m * p.ldc
                        let strideA = c.strideAZero ? 0 : sizeA, strideB = c.strideBZero ? 0 : sizeB
                        let strideC = c.strideCZero ? 0 : sizeC
                        var random = SeededRandom(state: UInt64(200 + index))
                        let a = random.floats(c.strideAZero ? sizeA : sizeA * c.batch)
                        let b = random.floats(c.strideBZero ? sizeB : sizeB * c.batch)
                        let countC = c.strideCZero ? sizeC : sizeC * c.batch
                        let original = c.beta == 0 ? [Float](repeating: .nan, count: countC) : random.floats(countC)
                        var fast = original, reference = original
                        ck_sgemm_batched(0, transB ? 1 : 0, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha,
                                         a, Int64(p.lda), Int64(strideA), b, Int64(p.ldb), Int64(strideB),
                                         p.beta, &fast, Int64(p.ldc), Int64(strideC), Int64(c.batch))
                        let what = "\(kernel) \(threads) threads batched case \(index) tB=\(transB)"
                        if c.strideCZero {
                            // Every item writes the one C, in order. With beta = 1 the final C is the sum of
                            // the original and of batch·K scaled products, whose bound is that of one sum of
                            // batch·K + 1 terms (any summation order stays within it); with beta = 0 it is the
                            // last item's product (items run concurrently would leave another's).
                            var total = p
                            total.k = p.k * c.batch
                            var scale = [Float](repeating: 0, count: sizeC)
                            for item in 0..<c.batch {
                                let itemA = Array(a[(item * strideA)..<(item * strideA + sizeA)])
                                let itemB = Array(b[(item * strideB)..<(item * strideB + sizeB)])
                                ck_sgemm_reference(0, transB ? 1 : 0, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha,
                                                   itemA, Int64(p.lda), itemB, Int64(p.ldb), p.beta, &reference,
                                                   Int64(p.ldc))
                                let s = magnitudes(p, itemA, itemB)
                                for x in 0..<sizeC { scale[x] += s[x] }
                            }
                            assertMatchesReference(fast, reference, original: original, magnitudes: scale, total, what)
                            continue
                        }
                        for item in 0..<c.batch {
                            let itemA = Array(a[(item * strideA)..<(item * strideA + sizeA)])
                            let itemB = Array(b[(item * strideB)..<(item * strideB + sizeB)])
                            let itemOriginal = Array(original[(item * sizeC)..<((item + 1) * sizeC)])
                            var itemReference = itemOriginal
                            ck_sgemm_reference(0, transB ? 1 : 0, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha, itemA,
                                               Int64(p.lda), itemB, Int64(p.ldb), p.beta, &itemReference, Int64(p.ldc))
                            assertMatchesReference(Array(fast[(item * sizeC)..<((item + 1) * sizeC)]), itemReference,
                                                   original: itemOriginal, magnitudes: magnitudes(p, itemA, itemB), p,
                                                   "\(what) item \(item)")
                        }
                    }
                }
            }
        }
    }

    /// K = 0 is a valid BLAS call: C = beta·C, and with beta = 0 C becomes zero without being read.
    func testEmptyInnerDimension() {
        var c = [Float](repeating: .nan, count: 6)
        let none = [Float](repeating: 0, count: 1)
        ck_sgemm(0, 0, 2, 3, 0, 1, none, 1, none, 3, 0, &c, 3)
        XCTAssertEqual(c, [0, 0, 0, 0, 0, 0])
        c = [1, 2, 3, 4, 5, 6]
        ck_sgemm(0, 0, 2, 3, 0, 1, none, 1, none, 3, 2, &c, 3)
        XCTAssertEqual(c, [2, 4, 6, 8, 10, 12])
    }

    // MARK: - Half-size operands

    /// ck_gemm_mixed with an operand stored in bf16 or f16 gives, bit for bit, ck_sgemm's result on f32 copies
    /// of the stored values (widening is exact, and the widened floats go through the same packing layout and
    /// micro-kernel): for every kernel, one and two threads, either operand or both, every transpose, and
    /// shapes that take the direct path (a single row, a tiny product), one block, and several blocks.
    func testMixedOperandsGiveTheF32ResultOfTheWidenedValues() {
        let shapes: [(m: Int, n: Int, k: Int, pad: Int)] = [(1, 77, 300, 0), (5, 7, 9, 1), (37, 53, 71, 3), (203, 300, 341, 0)]
        let types: [(a: Int32, b: Int32)] = [(Int32(CK_F32), Int32(CK_BF16)), (Int32(CK_BF16), Int32(CK_F32)),
                                             (Int32(CK_F32), Int32(CK_F16)), (Int32(CK_F16), Int32(CK_BF16))]
        var random = SeededRandom(state: 77)
        for shape in shapes {
            for (transA, transB) in [(false, false), (false, true), (true, false), (true, true)] {
                let p = Problem(transA: transA, transB: transB, m: shape.m, n: shape.n, k: shape.k, alpha: 0.75, beta: 0.5, pad: shape.pad)
                let a = random.floats(p.rowsA * p.lda), b = random.floats(p.rowsB * p.ldb), c = random.floats(p.m * p.ldc)
                for (typeA, typeB) in types {
                    let (storedA, widenedA) = Self.stored(a, as: typeA), (storedB, widenedB) = Self.stored(b, as: typeB)
                    for kernel in supportedKernels() {
                        XCTAssertEqual(ck_gemm_set_kernel(kernel), Int32(CK_OK))
                        for threads: Int32 in [1, 2] {
                            ck_set_num_threads(threads)
                            var expected = c, actual = c
                            ck_sgemm(transA ? 1 : 0, transB ? 1 : 0, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha, widenedA, Int64(p.lda),
                                     widenedB, Int64(p.ldb), p.beta, &expected, Int64(p.ldc))
                            let status = storedA.withUnsafeBytes { a in
                                storedB.withUnsafeBytes { b in
                                    ck_gemm_mixed(transA ? 1 : 0, transB ? 1 : 0, Int64(p.m), Int64(p.n), Int64(p.k), p.alpha,
                                                  a.baseAddress, typeA, Int64(p.lda), b.baseAddress, typeB, Int64(p.ldb),
                                                  p.beta, &actual, Int64(p.ldc))
                                }
                            }
                            XCTAssertEqual(status, Int32(CK_OK))
                            let differing = zip(actual, expected).filter { $0.bitPattern != $1.bitPattern }.count
                            XCTAssertEqual(differing, 0, "\(kernel) \(threads) threads types \(typeA)×\(typeB) \(p.label)")
                        }
                    }
                }
            }
        }
        ck_gemm_set_kernel(nil)
        let one: [Float] = [1]
        var c: Float = 0
        XCTAssertEqual(ck_gemm_mixed(0, 0, 1, 1, 1, 1, one, Int32(CK_I32), 1, one, Int32(CK_F32), 1, 0, &c, 1), Int32(CK_EINVAL))
    }

    /// `values` stored as `type` (the raw bytes) and those stored values widened back to f32.
    private static func stored(_ values: [Float], as type: Int32) -> (bytes: [UInt8], widened: [Float]) {
        if type == CK_F32 { return (values.withUnsafeBytes { Array($0) }, values) }
        var bytes = [UInt8](repeating: 0, count: values.count * 2)
        var widened = [Float](repeating: 0, count: values.count)
        _ = ck_convert(values, Int32(CK_F32), &bytes, type, Int64(values.count))
        _ = ck_convert(bytes, type, &widened, Int32(CK_F32), Int64(values.count))
        return (bytes, widened)
    }
}
