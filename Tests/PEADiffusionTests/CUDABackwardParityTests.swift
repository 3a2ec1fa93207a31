import Foundation
import XCTest
@testable import PEADiffusion

/// The CUDA backend's backward ops without a GPU: the emulated library (libpea_cuda_emu.so, loaded as
/// CUDABackendParityTests loads it) against the CPU backend on the same inputs at awkward shapes — f32 to
/// docs/testing.md's tolerances, f16 and bf16 to the rounding of their storage, as the forward parity tests — then
/// the finite-difference checks of BackwardOpTests.swift run on the CUDA backend itself, and invalid
/// arguments fail with the CPU backend's messages.
///
/// Without the library these tests fail, saying to run `make cuda-emu`; PEA_SKIP_CUDA_EMU=1 skips them.
final class CUDABackwardParityTests: XCTestCase {
    let cpu = CPUBackend()

    // The harness CUDABackendParityTests uses: its shared emulated backend, random inputs and tolerances.
    func cuda() throws -> CUDABackend { try CUDABackendParityTests.sharedCUDA() }

    func random(_ shape: [Int], seed: UInt64, scale: Float = 1, offset: Float = 0) -> HostTensor {
        CUDABackendParityTests.random(shape, seed: seed, scale: scale, offset: offset)
    }

    func tolerance(_ dtype: DType) -> ParityTolerance { CUDABackendParityTests.tolerance(dtype) }

    typealias Run = (any ComputeBackend, [String: Tensor]) throws -> [Tensor]

    /// Runs `run` on both backends in each dtype (f32 inputs stored in that dtype; the CPU gets the rounded
    /// values in f32) and compares every output: shape, dtype and values.
    func check(_ name: String, _ inputs: [String: HostTensor], _ dtypes: [DType] = [.f32, .f16, .bf16],
               file: StaticString = #filePath, line: UInt = #line, _ run: Run) throws {
        let cuda = try cuda()
        for dtype in dtypes {
            let what = "\(name) \(dtype)"
            var cudaInputs: [String: Tensor] = [:], cpuInputs: [String: Tensor] = [:]
            for (key, host) in inputs {
                let stored = host.converted(to: dtype)
                cpuInputs[key] = try cpu.upload(stored.converted(to: .f32))
                cudaInputs[key] = try cuda.upload(stored)
            }
            let expected = try run(cpu, cpuInputs).map(cpu.download)
            let outputs: [Tensor]
            do { outputs = try run(cuda, cudaInputs) } catch {
                XCTFail("\(what): \(error)", file: file, line: line)
                continue
            }
            let actual = try outputs.map(cuda.download)
            XCTAssertEqual(actual.map(\.shape), expected.map(\.shape), "\(what): shapes", file: file, line: line)
            for (i, (a, e)) in zip(actual, expected).enumerated() {
                XCTAssertEqual(a.dtype, dtype, "\(what) output \(i): dtype", file: file, line: line)
                assertClose(a.floats(), e.floats(), tolerance(dtype), "\(what) output \(i)", file: file, line: line)
            }
        }
    }

    // MARK: every backward op against the CPU backend

    func testConv2dBackwardData() throws {
        let cases: [(String, [Int], [Int], (Int, Int), Padding2D)] = [
            ("3x3 same", [2, 3, 7, 5], [4, 3, 3, 3], (1, 1), .uniform(1)),
            ("3x3 stride 2 asymmetric (VAE downsampler)", [1, 5, 9, 8], [3, 5, 3, 3], (2, 2), Padding2D(top: 0, bottom: 1, left: 0, right: 1)),
            ("1x1 (GEMM)", [3, 4, 6, 6], [5, 4, 1, 1], (1, 1), .uniform(0)),
            ("1x1 stride 2 (gaps)", [1, 4, 7, 7], [6, 4, 1, 1], (2, 2), .uniform(0)),
            ("5x3 stride (2,1)", [2, 2, 9, 7], [3, 2, 5, 3], (2, 1), Padding2D(top: 2, bottom: 1, left: 1, right: 0)),
            ("one element", [1, 1, 1, 1], [1, 1, 1, 1], (1, 1), .uniform(0)),
            ("wide 33 channels", [1, 33, 4, 5], [17, 33, 3, 3], (1, 1), .uniform(1)),
            ("batch 9", [9, 2, 4, 3], [3, 2, 3, 3], (1, 1), .uniform(1)),
        ]
        for (i, (label, x, w, stride, padding)) in cases.enumerated() {
            let y = try ShapeRules.conv2dOutput(x, weight: w, stride: stride, padding: padding)
            try check("conv2dBackwardData \(label)", ["dy": random(y, seed: UInt64(20 * i)), "w": random(w, seed: UInt64(20 * i + 1), scale: 0.3)]) { b, t in
                [try b.conv2dBackwardData(t["dy"]!, weight: t["w"]!, inputShape: x, stride: stride, padding: padding)]
            }
        }
    }

    func testGroupNormBackward() throws {
        let cases: [(String, [Int], Int, Bool, Bool, Float)] = [
            ("+silu [2,6,5,3] G3", [2, 6, 5, 3], 3, true, true, 3),
            ("[3,4,7] G1 no affine", [3, 4, 7], 1, false, false, 0),
            ("+silu no affine [2,4,3,3] G2", [2, 4, 3, 3], 2, false, true, 0),
            ("[1,32,9,9] G32 (one channel per group)", [1, 32, 9, 9], 32, true, false, 0),
            ("[1,4,1] G4 (one element per group)", [1, 4, 1], 4, true, true, 0),
            ("+silu [2,64,33] G32 batch of long groups", [2, 64, 33], 32, true, true, -1),
            ("+silu [2,64,32,32] G4 (fewer groups than SMs: split over blocks)", [2, 64, 32, 32], 4, true, true, 0.5),
        ]
        for (i, (label, shape, groups, affine, silu, offset)) in cases.enumerated() {
            let seed = UInt64(10 * i)
            var inputs = ["x": random(shape, seed: seed, offset: offset), "dy": random(shape, seed: seed + 1)]
            if affine {
                inputs["g"] = random([shape[1]], seed: seed + 2, scale: 0.5, offset: 1)
                inputs["b"] = random([shape[1]], seed: seed + 3)
            }
            try check("groupNormBackward \(label)", inputs) { b, t in
                [try b.groupNormBackward(t["dy"]!, input: t["x"]!, groups: groups, weight: t["g"], bias: t["b"], eps: 1e-5, fuseSiLU: silu)]
            }
        }
    }

    func testLayerNormBackward() throws {
        let cases: [(String, [Int], Bool, Bool)] = [
            ("[3,5,33] affine, parameter gradients", [3, 5, 33], true, true),
            ("[3,5,33] affine, dx only", [3, 5, 33], true, false),
            ("[1,1] no affine, parameter gradients", [1, 1], false, true),
            ("[2,1030] parameter gradients", [2, 1030], true, true),
            ("[300,9] many rows, parameter gradients", [300, 9], false, true),
            ("[2,77,64] adapter-like", [2, 77, 64], true, true),
        ]
        for (i, (label, shape, affine, parameters)) in cases.enumerated() {
            let seed = UInt64(10 * i)
            var inputs = ["x": random(shape, seed: seed, scale: 2, offset: 1), "dy": random(shape, seed: seed + 1)]
            if affine { inputs["g"] = random([shape.last!], seed: seed + 2, scale: 0.5, offset: 1) }
            try check("layerNormBackward \(label)", inputs) { b, t in
                let g = try b.layerNormBackward(t["dy"]!, input: t["x"]!, weight: t["g"], eps: 1e-5, parameterGradients: parameters)
                XCTAssertEqual(g.weight == nil, !parameters, "\(label): weight gradient on \(b.name)")
                XCTAssertEqual(g.bias == nil, !parameters, "\(label): bias gradient on \(b.name)")
                return [g.input] + [g.weight, g.bias].compactMap { $0 }
            }
        }
    }

    func testSoftmaxBackward() throws {
        // y from the CPU's softmax (a real forward output: rows summing to 1, an all −∞ row giving zeros).
        func softmaxOutput(_ shape: [Int], seed: UInt64, blankRow: Int? = nil) throws -> HostTensor {
            var x = random(shape, seed: seed, scale: 3).floats()
            if let blankRow { for j in 0..<shape.last! { x[blankRow * shape.last! + j] = -.infinity } }
            return try cpu.download(cpu.softmax(cpu.upload(HostTensor(x, shape: shape))))
        }
        let cases: [(String, [Int], Int?)] = [("[3,7,31]", [3, 7, 31], nil), ("one", [1], nil), ("[2,1500]", [2, 1500], nil),
                                              ("[4,6] with a −∞ row", [4, 6], 2), ("[40,77] attention-like", [40, 77], nil)]
        for (i, (label, shape, blank)) in cases.enumerated() {
            try check("softmaxBackward \(label)", ["y": softmaxOutput(shape, seed: UInt64(10 * i), blankRow: blank),
                                                     "dy": random(shape, seed: UInt64(10 * i + 1))]) { b, t in
                [try b.softmaxBackward(t["dy"]!, output: t["y"]!)]
            }
        }
    }

    /// The fused attention_backward.cu against the CPU's (attention.c's blockwise backward, itself checked
    /// against the composed one by CPUAttentionBackwardTests): query and key counts off the 16-row
    /// tiles, cross-attention with fewer keys than a tile, head dims 40/64/160 and D ≠ Dv; a head dim above the
    /// kernel's limit takes the composed path on the CUDA backend too.
    func testAttentionBackward() throws {
        let cases: [(String, batch: Int, queries: Int, keys: Int, heads: Int, d: Int, dv: Int, [DType])] = [
            ("self Tq37 Tk29 H2 D40", 1, 37, 29, 2, 40, 40, [.f32, .f16, .bf16]),
            ("cross Tk13 D64", 2, 20, 13, 1, 64, 64, [.f32, .f16, .bf16]),
            ("D160 tiny", 1, 5, 3, 1, 160, 160, [.f32, .f16, .bf16]),
            ("D24 Dv16", 1, 9, 11, 2, 24, 16, [.f32]),
            ("D168 (composed)", 1, 3, 2, 1, 168, 168, [.f32]),
        ]
        for (i, (label, batch, queries, keys, heads, d, dv, dtypes)) in cases.enumerated() {
            let seed = UInt64(10 * i)
            let inputs = ["q": random([batch, queries, heads * d], seed: seed), "k": random([batch, keys, heads * d], seed: seed + 1),
                          "v": random([batch, keys, heads * dv], seed: seed + 2), "dO": random([batch, queries, heads * dv], seed: seed + 3)]
            try check("attentionBackward \(label)", inputs, dtypes) { b, t in
                let g = try b.attentionBackward(t["dO"]!, q: t["q"]!, k: t["k"]!, v: t["v"]!, heads: heads, scale: nil)
                return [g.q, g.k, g.v]
            }
        }
    }

    /// The taped backend holds its inner backend as `any ComputeBackend`: its attention gradient must reach the
    /// CUDA backend's fused kernel (a protocol requirement), not the composed default.
    func testTapedAttentionUsesTheFusedBackward() throws {
        let cuda = try cuda()
        let taped = TapedBackend(wrapping: cuda)
        let (q, k, v) = (try taped.upload(random([1, 20, 80], seed: 1)), try taped.upload(random([1, 7, 80], seed: 2)),
                         try taped.upload(random([1, 7, 80], seed: 3)))
        for t in [q, k, v] { taped.requireGradient(t) }
        let y = try taped.attention(q: q, k: k, v: v, heads: 2, mask: nil, causal: false, scale: nil)
        let ((), profile) = try cuda.profiled { try taped.backward(from: y) }
        let ops = profile.ops.map(\.name)
        XCTAssertTrue(ops.contains("attention_backward"), "\(ops)")
        XCTAssertFalse(ops.contains("softmax_backward"), "\(ops)")
        XCTAssertEqual(try taped.gradient(of: q)?.shape, [1, 20, 80])
    }

    func testActivationGEGLUAndUpsampleBackward() throws {
        for kind in [Activation.gelu, .geluTanh, .silu] {
            try check("activationBackward \(kind.rawValue) [3,5,7]", ["x": random([3, 5, 7], seed: 1, scale: 3), "dy": random([3, 5, 7], seed: 2)]) { b, t in
                [try b.activationBackward(t["dy"]!, input: t["x"]!, kind)]
            }
            try check("activationBackward \(kind.rawValue) one", ["x": random([1], seed: 3), "dy": random([1], seed: 4)]) { b, t in
                [try b.activationBackward(t["dy"]!, input: t["x"]!, kind)]
            }
            try check("activationBackward \(kind.rawValue) [1001] (odd count)", ["x": random([1001], seed: 5, scale: 4), "dy": random([1001], seed: 6)]) { b, t in
                [try b.activationBackward(t["dy"]!, input: t["x"]!, kind)]
            }
        }
        try check("gegluBackward [3,5,18]", ["x": random([3, 5, 18], seed: 7, scale: 2), "dy": random([3, 5, 9], seed: 8)]) { b, t in
            [try b.gegluBackward(t["dy"]!, input: t["x"]!)]
        }
        try check("gegluBackward [1,2]", ["x": random([1, 2], seed: 9), "dy": random([1, 1], seed: 10)]) { b, t in
            [try b.gegluBackward(t["dy"]!, input: t["x"]!)]
        }
        try check("upsampleNearest2xBackward [2,3,10,14]", ["dy": random([2, 3, 10, 14], seed: 11)]) { b, t in
            [try b.upsampleNearest2xBackward(t["dy"]!)]
        }
        try check("upsampleNearest2xBackward one", ["dy": random([1, 1, 2, 2], seed: 12)]) { b, t in
            [try b.upsampleNearest2xBackward(t["dy"]!)]
        }
    }

    /// Empty tensors give empty (or, for layer norm's parameter gradients over no rows, zero) results.
    func testEmptyTensors() throws {
        let cuda = try cuda()
        let dx = try cuda.conv2dBackwardData(cuda.zeros([0, 4, 3, 3], dtype: .f32), weight: cuda.zeros([4, 2, 3, 3], dtype: .f32),
                                             inputShape: [0, 2, 3, 3], stride: (1, 1), padding: .uniform(1))
        XCTAssertEqual(dx.shape, [0, 2, 3, 3])
        // No output channels: nothing flows back, dx is zeros.
        let none = try cuda.conv2dBackwardData(cuda.zeros([1, 0, 3, 3], dtype: .f32), weight: cuda.zeros([0, 2, 3, 3], dtype: .f32),
                                               inputShape: [1, 2, 3, 3], stride: (1, 1), padding: .uniform(1))
        XCTAssertEqual(try cuda.downloadFloats(none), [Float](repeating: 0, count: 18))
        let g = try cuda.layerNormBackward(cuda.zeros([0, 5], dtype: .f16), input: cuda.zeros([0, 5], dtype: .f16), weight: nil,
                                           eps: 1e-5, parameterGradients: true)
        XCTAssertEqual(g.input.shape, [0, 5])
        XCTAssertEqual(try cuda.downloadFloats(XCTUnwrap(g.weight)), [Float](repeating: 0, count: 5))
        XCTAssertEqual(try cuda.downloadFloats(XCTUnwrap(g.bias)), [Float](repeating: 0, count: 5))
        XCTAssertEqual(try cuda.softmaxBackward(cuda.zeros([3, 0], dtype: .f32), output: cuda.zeros([3, 0], dtype: .f32)).shape, [3, 0])
    }

    func testBackwardOpsAreSupportedByTheEmulatedLibrary() throws {
        let cuda = try cuda()
        let backward: [Op] = [.conv2dBackwardData, .groupNormBackward, .layerNormBackward, .softmaxBackward, .activationBackward,
                              .gegluBackward, .upsampleNearest2xBackward]
        for op in backward {
            for dtype in [DType.f32, .f16, .bf16] { XCTAssertTrue(cuda.supports(op, dtype: dtype), "\(op) \(dtype)") }
            XCTAssertFalse(cuda.supports(op, dtype: .i32), "\(op) i32")
        }
        XCTAssertEqual(cuda.library.missingSymbols, [])
        XCTAssertNotNil(cuda.attentionBackwardFunction, "pea_cuda_attention_backward")
    }

    // MARK: finite differences on the CUDA backend

    /// BackwardOpTests' finite-difference checks, every backward op of the CUDA backend against numerical
    /// derivatives of its own forward ops (f32).
    func testBackwardOpsPassFiniteDifferenceChecks() throws {
        try checkBackwardOps(on: cuda())
    }

    /// The composed backward ops (attention, sumToShape) on the CUDA backend's ops.
    func testComposedBackwardPassesFiniteDifferenceChecks() throws {
        try checkComposedBackward(on: cuda())
    }

    // MARK: errors

    /// Invalid arguments fail on the CUDA backend exactly as on the CPU backend (same error, same message).
    func testInvalidArgumentsFailAsOnTheCPU() throws {
        let cuda = try cuda()
        let cases: [(String, (any ComputeBackend) throws -> Any)] = [
            ("conv2dBackwardData gradOutput", { b in
                try b.conv2dBackwardData(b.zeros([1, 4, 7, 8], dtype: .f32), weight: b.zeros([4, 3, 3, 3], dtype: .f32), inputShape: [1, 3, 8, 8],
                                         stride: (1, 1), padding: .uniform(1)) }),
            ("conv2dBackwardData channels", { b in
                try b.conv2dBackwardData(b.zeros([1, 4, 8, 8], dtype: .f32), weight: b.zeros([4, 3, 3, 3], dtype: .f32), inputShape: [1, 2, 8, 8],
                                         stride: (1, 1), padding: .uniform(1)) }),
            ("conv2dBackwardData input rank", { b in
                try b.conv2dBackwardData(b.zeros([1, 4, 8, 8], dtype: .f32), weight: b.zeros([4, 3, 3, 3], dtype: .f32), inputShape: [3, 8, 8],
                                         stride: (1, 1), padding: .uniform(1)) }),
            ("groupNormBackward groups", { b in
                let x = try b.zeros([1, 3, 8, 8], dtype: .f32)
                return try b.groupNormBackward(x, input: x, groups: 2, weight: nil, bias: nil, eps: 1e-5, fuseSiLU: false) }),
            ("groupNormBackward gradOutput", { b in
                try b.groupNormBackward(b.zeros([1, 4, 8], dtype: .f32), input: b.zeros([1, 4, 9], dtype: .f32), groups: 2, weight: nil,
                                        bias: nil, eps: 1e-5, fuseSiLU: true) }),
            ("layerNormBackward weight", { b in
                let x = try b.zeros([2, 8], dtype: .f32)
                return try b.layerNormBackward(x, input: x, weight: b.zeros([7], dtype: .f32), eps: 1e-5, parameterGradients: true) }),
            ("softmaxBackward gradOutput", { b in try b.softmaxBackward(b.zeros([2, 3], dtype: .f32), output: b.zeros([3, 2], dtype: .f32)) }),
            ("activationBackward gradOutput", { b in try b.activationBackward(b.zeros([3], dtype: .f32), input: b.zeros([4], dtype: .f32), .silu) }),
            ("activationBackward quickGELU", { b in let x = try b.zeros([4], dtype: .f32); return try b.activationBackward(x, input: x, .quickGELU) }),
            ("gegluBackward gradOutput", { b in let x = try b.zeros([2, 8], dtype: .f32); return try b.gegluBackward(x, input: x) }),
            ("gegluBackward odd", { b in try b.gegluBackward(b.zeros([2, 2], dtype: .f32), input: b.zeros([2, 5], dtype: .f32)) }),
            ("upsampleNearest2xBackward odd", { b in try b.upsampleNearest2xBackward(b.zeros([1, 3, 8, 7], dtype: .f32)) }),
            ("upsampleNearest2xBackward rank", { b in try b.upsampleNearest2xBackward(b.zeros([3, 8, 8], dtype: .f32)) }),
            ("attentionBackward gradOutput", { b in
                let q = try b.zeros([1, 4, 8], dtype: .f32)
                return try b.attentionBackward(b.zeros([1, 4, 6], dtype: .f32), q: q, k: q, v: q, heads: 2, scale: nil) }),
            ("attentionBackward heads", { b in
                let q = try b.zeros([1, 4, 8], dtype: .f32)
                return try b.attentionBackward(q, q: q, k: q, v: q, heads: 3, scale: nil) }),
        ]
        for (label, body) in cases {
            var cpuError = "", cudaError = ""
            do { _ = try body(cpu); XCTFail("\(label): the cpu accepted it") } catch { cpuError = "\(error)" }
            do { _ = try body(cuda); XCTFail("\(label): cuda accepted it") } catch { cudaError = "\(error)" }
            XCTAssertEqual(cudaError, cpuError, label)
        }
        // What only the CUDA backend can get wrong: mixed float dtypes, integer data, tensors from elsewhere.
        assertThrowsError(containing: ["softmaxBackward", "different dtypes"]) {
            try cuda.softmaxBackward(cuda.zeros([2, 3], dtype: .f16), output: cuda.zeros([2, 3], dtype: .f32))
        }
        assertThrowsError(containing: ["attentionBackward", "different dtypes"]) {
            let q = try cuda.zeros([1, 2, 8], dtype: .f16)
            return try cuda.attentionBackward(cuda.zeros([1, 2, 8], dtype: .f32), q: q, k: q, v: q, heads: 1, scale: nil)
        }
        assertThrowsError(containing: ["activationBackward", "i32"]) {
            try cuda.activationBackward(cuda.zeros([2], dtype: .i32), input: cuda.zeros([2], dtype: .i32), .silu)
        }
        assertThrowsError(containing: ["upsampleNearest2xBackward", "'cpu'", "upload it first"]) {
            try cuda.upsampleNearest2xBackward(cpu.zeros([1, 1, 2, 2], dtype: .f32))
        }
    }
}
