import XCTest
@testable import PEADiffusion

/// What the backend promises beyond numbers: clear errors naming the op for arguments that do not fit,
/// tensors tied to their backend, views that share storage, and the fused attention agreeing with the
/// explicit composition of separately tested ops at sizes that cross its tiles.
final class CPUBackendContractTests: XCTestCase {
    let backend = CPUBackend()

    private func tensor(_ shape: [Int], seed: UInt64 = 1) throws -> Tensor {
        var random = SplitMix64(seed: seed)
        return try backend.upload(random.normals(shape.reduce(1, *)), shape: shape)
    }

    private func assertThrows(_ fragment: String, _ body: () throws -> Any, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("expected an error mentioning '\(fragment)'", file: file, line: line)
        } catch {
            XCTAssertTrue("\(error)".contains(fragment), "'\(error)' does not mention '\(fragment)'", file: file, line: line)
        }
    }

    /// Backend failures keep their kind, so that a caller can react to running out of memory.
    func testBackendFailuresCarryTheirKind() throws {
        func kind(_ body: () throws -> Any) -> BackendFailure? {
            do { _ = try body(); return nil } catch { return (error as? PEAError)?.backendFailure }
        }
        XCTAssertEqual(kind { try self.backend.zeros([1 << 30, 1 << 30], dtype: .f32) }, .outOfMemory)
        let ids = try backend.upload(HostTensor(ids: [0, 11], shape: [2]))
        XCTAssertEqual(kind { try self.backend.embedding(ids, table: self.tensor([11, 4])) }, .invalidArgument)
        XCTAssertNil(kind { try self.backend.linear(self.tensor([2, 5]), weight: self.tensor([4, 6]), bias: nil) },
                     "a shape mismatch is not a backend failure")
    }

    func testShapeErrorsNameTheOp() throws {
        let x = try tensor([1, 3, 8, 8])
        assertThrows("conv2d: input has 3 channels") { try self.backend.conv2d(x, weight: self.tensor([4, 2, 3, 3]), bias: nil, stride: (1, 1), padding: .uniform(1)) }
        assertThrows("conv2d: kernel 9×9 larger") { try self.backend.conv2d(x, weight: self.tensor([4, 3, 9, 9]), bias: nil, stride: (1, 1), padding: .uniform(0)) }
        assertThrows("conv2d: bias must have shape [4]") { try self.backend.conv2d(x, weight: self.tensor([4, 3, 3, 3]), bias: self.tensor([5]), stride: (1, 1), padding: .uniform(1)) }
        assertThrows("linear: input [2, 5] does not end in the weight's input width 6") { try self.backend.linear(self.tensor([2, 5]), weight: self.tensor([4, 6]), bias: nil) }
        assertThrows("gemm: inner dimensions differ") { try self.backend.gemm(self.tensor([2, 3]), self.tensor([4, 5]), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil) }
        assertThrows("gemm: batch sizes differ") { try self.backend.gemm(self.tensor([2, 2, 3]), self.tensor([3, 3, 5]), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil) }
        assertThrows("groupNorm: 6 channels cannot be split into 4 groups") { try self.backend.groupNorm(self.tensor([1, 6, 2, 2]), groups: 4, weight: nil, bias: nil, eps: 1e-5, fuseSiLU: false) }
        assertThrows("attention: widths 10 and 10 are not divisible by 3 heads") { try self.backend.attention(q: self.tensor([1, 4, 10]), k: self.tensor([1, 4, 10]), v: self.tensor([1, 4, 10]), heads: 3, mask: nil, causal: false, scale: nil) }
        assertThrows("attention: mask [1, 1, 3, 5] does not broadcast") { try self.backend.attention(q: self.tensor([1, 4, 8]), k: self.tensor([1, 5, 8]), v: self.tensor([1, 5, 8]), heads: 2, mask: self.tensor([1, 1, 3, 5]), causal: false, scale: nil) }
        assertThrows("add: shapes [2, 3] and [4] do not broadcast") { try self.backend.add(self.tensor([2, 3]), self.tensor([4])) }
        assertThrows("concat: shapes") { try self.backend.concat([self.tensor([2, 3]), self.tensor([3, 3])], dim: 1) }
        assertThrows("split: sizes [1, 1] do not add up to 3") { try self.backend.split(self.tensor([2, 3]), sizes: [1, 1], dim: 1) }
        assertThrows("permute: [0, 0] is not a permutation") { try self.backend.permute(self.tensor([2, 3]), [0, 0]) }
        assertThrows("mean: dimension 2 out of range") { try self.backend.mean(self.tensor([2, 3]), dim: 2, keepDim: false) }
        assertThrows("geglu: the last dimension of [2, 3] must be even") { try self.backend.geglu(self.tensor([2, 3])) }
        assertThrows("reshape [2, 3] (6 elements) to [4, 2]") { try self.tensor([2, 3]).reshaped([4, 2]) }
    }

    func testEmbeddingRejectsIdsOutsideTheVocabulary() throws {
        let table = try tensor([5, 3])
        let ids = try backend.upload(HostTensor(ids: [0, 4, 5], shape: [3], dtype: .i64))
        assertThrows("outside the vocabulary of 5 entries") { try self.backend.embedding(ids, table: table) }
        let negative = try backend.upload(HostTensor(ids: [-1], shape: [1], dtype: .i32))
        assertThrows("outside the vocabulary") { try self.backend.embedding(negative, table: table) }
    }

    func testComputeNeedsF32AndOwnTensors() throws {
        let half = try backend.cast(tensor([2, 4]), to: .f16)
        XCTAssertEqual(half.dtype, .f16)
        assertThrows("the cpu backend computes in f32, got a f16 tensor") { try self.backend.activation(half, .silu) }
        XCTAssertFalse(backend.supports(.conv2d, dtype: .f16))
        XCTAssertTrue(backend.supports(.conv2d, dtype: .f32))
        XCTAssertTrue(backend.supports(.cast, dtype: .bf16))

        final class DeviceMemory: TensorStorage { let byteCount = 8 }
        let foreign = Tensor(shape: [2], dtype: .f32, storage: DeviceMemory(), backend: backend)
        assertThrows("is not in host memory") { try self.backend.activation(foreign, .silu) }
    }

    func testUploadDownloadAndViews() throws {
        let values: [Float] = [1, -2, 3.5, 0, 7, 8]
        let x = try backend.upload(values, shape: [2, 3])
        XCTAssertEqual(try backend.downloadFloats(x), values)
        let view = try x.reshaped([3, -1])
        XCTAssertEqual(view.shape, [3, 2])
        XCTAssertTrue(view.storage === x.storage, "reshape must not copy")
        XCTAssertEqual(try backend.downloadFloats(backend.zeros([2, 2], dtype: .f32)), [0, 0, 0, 0])
        let ids = HostTensor(ids: [3, -7, 1 << 40], shape: [3], dtype: .i64)
        XCTAssertEqual(try backend.download(backend.upload(ids)), ids)
        XCTAssertEqual(ids.floats(), [3, -7, Float(1 << 40)])
        // f16 storage round trip of values exactly representable in f16
        let halves = HostTensor([0.5, -1.25, 1024, 6.1035156e-05], shape: [4], dtype: .f16)
        XCTAssertEqual(halves.floats(), [0.5, -1.25, 1024, 6.1035156e-05])
        XCTAssertEqual(try backend.downloadFloats(backend.cast(backend.upload(halves), to: .f32)), [0.5, -1.25, 1024, 6.1035156e-05])
    }

    /// The fused kernel against softmax(q·kᵀ·scale + mask)·v built from gemm, softmax and broadcast add, at
    /// sizes that cross its 128-query and 256-key tiles, with causal masking and a padding mask; with six
    /// heads (a unit per head) and with one (its query tiles split over the threads).
    func testFusedAttentionMatchesExplicitCompositionAcrossTiles() throws {
        for (batch, heads) in [(2, 3), (1, 1)] {
            let (queries, keys, headDim) = (300, 600, 16)
            let width = heads * headDim
            let q = try tensor([batch, queries, width], seed: 11)
            let k = try tensor([batch, keys, width], seed: 12)
            let v = try tensor([batch, keys, width], seed: 13)

            // causal (top-left aligned) plus padding of the last 70 keys of the last sample, as one additive mask
            var maskValues = [Float](repeating: 0, count: batch * queries * keys)
            for b in 0..<batch {
                for i in 0..<queries {
                    for j in 0..<keys where j > i || (b == batch - 1 && j >= keys - 70) {
                        maskValues[(b * queries + i) * keys + j] = -.infinity
                    }
                }
            }
            let padding = try backend.upload(maskValues, shape: [batch, 1, queries, keys])
            var paddingOnly = [Float](repeating: 0, count: batch * keys)
            for j in (keys - 70)..<keys { paddingOnly[(batch - 1) * keys + j] = -.infinity }

            let fused = try backend.attention(q: q, k: k, v: v, heads: heads,
                                              mask: backend.upload(paddingOnly, shape: [batch, 1, 1, keys]),
                                              causal: true, scale: 0.3)
            let explicit = try explicitAttention(q, k, v, heads: heads, mask: padding, scale: 0.3)
            assertClose(try backend.downloadFloats(fused), try backend.downloadFloats(explicit), .f32,
                        "attention, batch \(batch), \(heads) heads")
            // without a causal mask every key tile is whole: the packed path throughout
            let unmasked = try backend.attention(q: q, k: k, v: v, heads: heads, mask: nil, causal: false, scale: 0.3)
            let unmaskedExplicit = try explicitAttention(q, k, v, heads: heads, mask: nil, scale: 0.3)
            assertClose(try backend.downloadFloats(unmasked), try backend.downloadFloats(unmaskedExplicit), .f32,
                        "attention without masks, batch \(batch), \(heads) heads")
        }
    }

    /// The residual written into y before the GEMM accumulates (linear, conv2d) agrees with the op followed by
    /// a separate add, with and without a bias, for the convolution's banded, pointwise and strided paths and
    /// half-size weights; a residual of another shape is refused.
    func testResidualInTheGEMMMatchesTheOpThenAdd() throws {
        func compare(_ fused: Tensor, _ plain: Tensor, _ residual: Tensor, _ what: String) throws {
            assertClose(try backend.downloadFloats(fused), try backend.downloadFloats(backend.add(plain, residual)), .f32, what)
        }
        let x = try tensor([2, 5, 9, 7], seed: 21)
        for (kernel, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
            for withBias in [true, false] {
                for weightType in [DType.f32, .bf16] {
                    let weight = try backend.cast(tensor([6, 5, kernel, kernel], seed: 22), to: weightType)
                    let bias = withBias ? try tensor([6], seed: 23) : nil
                    let pad = Padding2D.uniform(padding)
                    let plain = try backend.conv2d(x, weight: weight, bias: bias, stride: (stride, stride), padding: pad)
                    let residual = try tensor(plain.shape, seed: 24)
                    let fused = try backend.conv2d(x, weight: weight, bias: bias, stride: (stride, stride), padding: pad,
                                                   residual: residual)
                    try compare(fused, plain, residual, "conv2d \(kernel)×\(kernel) stride \(stride) bias \(withBias) \(weightType)")
                }
            }
        }
        let rows = try tensor([3, 11, 24], seed: 25)
        for withBias in [true, false] {
            let weight = try tensor([17, 24], seed: 26), bias = withBias ? try tensor([17], seed: 27) : nil
            let plain = try backend.linear(rows, weight: weight, bias: bias)
            let residual = try tensor(plain.shape, seed: 28)
            try compare(try backend.linear(rows, weight: weight, bias: bias, residual: residual), plain, residual, "linear bias \(withBias)")
        }
        XCTAssertThrowsError(try backend.linear(rows, weight: tensor([17, 24]), bias: nil, residual: tensor([3, 11, 1]))) { error in
            XCTAssert("\(error)".contains("residual"), "\(error)")
        }
        XCTAssertThrowsError(try backend.conv2d(x, weight: tensor([6, 5, 1, 1]), bias: nil, stride: (1, 1), padding: .uniform(0),
                                                residual: tensor([2, 6, 9, 1])))
    }

    private func explicitAttention(_ q: Tensor, _ k: Tensor, _ v: Tensor, heads: Int, mask: Tensor?, scale: Float) throws -> Tensor {
        let (b, tq, tk, width) = (q.shape[0], q.shape[1], k.shape[1], q.shape[2])
        let d = width / heads
        func split(_ x: Tensor, _ t: Int) throws -> Tensor {
            try backend.permute(x.reshaped([b, t, heads, d]), [0, 2, 1, 3]).reshaped([b * heads, t, d])
        }
        let scores = try backend.gemm(split(q, tq), split(k, tk), transposeA: false, transposeB: true, alpha: scale, beta: 0, c: nil)
        let masked = try mask.map { try backend.add(scores.reshaped([b, heads, tq, tk]), $0) } ?? scores.reshaped([b, heads, tq, tk])
        let probabilities = try backend.softmax(masked).reshaped([b * heads, tq, tk])
        let out = try backend.gemm(probabilities, split(v, tk), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil)
        return try backend.permute(out.reshaped([b, heads, tq, d]), [0, 2, 1, 3]).reshaped([b, tq, width])
    }
}
