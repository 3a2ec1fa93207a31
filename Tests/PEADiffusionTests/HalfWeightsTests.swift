import CKernels
import Foundation
import XCTest
@testable import PEADiffusion

/// Half-size weights on the CPU (`CPUBackend(halfWeights:)`, `pea --weights bf16|f16`): weight matrices stored in
/// bf16/f16, widened to f32 as the GEMM packs them, everything computed in f32.
///
/// - The ops taking a half-size weight give, bit for bit, what they give with an f32 weight holding the same
///   (widened) values: widening is exact and the GEMM computes on the very same floats.
/// - Whole pipelines match diffusers running the fp32 pipeline with every nn.Linear and nn.Conv2d weight rounded
///   to that dtype (tools/reference/make_half_weight_fixtures.py), within the plain pipeline tolerance
///   (docs/testing.md: max |Δ| ≤ 1/255, mean |Δ| ≤ 0.02/255).
final class HalfWeightsTests: XCTestCase {
    private func values(_ count: Int, seed: UInt64) -> [Float] {
        var random = SplitMix64(seed: seed)
        return random.normals(count)
    }

    /// `weight` stored as `dtype` on `backend`, and the f32 tensor of its widened values.
    private func stored(_ weight: [Float], _ shape: [Int], as dtype: DType, on backend: CPUBackend) throws -> (half: Tensor, widened: Tensor) {
        let half = try backend.upload(HostTensor(weight, shape: shape).converted(to: dtype))
        return (half, try backend.cast(half, to: .f32))
    }

    private func assertBitIdentical(_ a: Tensor, _ b: Tensor, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let x = try a.backend.downloadFloats(a), y = try b.backend.downloadFloats(b)
        XCTAssertEqual(x.count, y.count, what, file: file, line: line)
        let differing = zip(x, y).filter { $0.bitPattern != $1.bitPattern }.count
        XCTAssertEqual(differing, 0, "\(what): \(differing) of \(x.count) values differ", file: file, line: line)
    }

    func testOpsWithHalfWeightsComputeOnTheWidenedValues() throws {
        let backend = CPUBackend()
        for dtype in [DType.bf16, .f16] {
            // linear: many rows (the blocked GEMM), one row (the direct path)
            for rows in [37, 1] {
                let x = try backend.upload(values(rows * 96, seed: 1), shape: [rows, 96])
                let w = try stored(values(80 * 96, seed: 2), [80, 96], as: dtype, on: backend)
                let bias = try backend.upload(values(80, seed: 3), shape: [80])
                try assertBitIdentical(backend.linear(x, weight: w.half, bias: bias), backend.linear(x, weight: w.widened, bias: bias),
                                       "linear \(rows) rows, \(dtype) weight")
            }
            // conv2d: 3×3 padded, 3×3 stride 2 with asymmetric padding, 1×1 (no im2col), and its data gradient
            let x = try backend.upload(values(2 * 12 * 9 * 11, seed: 4), shape: [2, 12, 9, 11])
            for (kernel, stride, padding) in [(3, 1, Padding2D.uniform(1)), (3, 2, Padding2D(top: 0, bottom: 1, left: 0, right: 1)),
                                              (1, 1, Padding2D.uniform(0))] {
                let w = try stored(values(20 * 12 * kernel * kernel, seed: 5), [20, 12, kernel, kernel], as: dtype, on: backend)
                let bias = try backend.upload(values(20, seed: 6), shape: [20])
                let half = try backend.conv2d(x, weight: w.half, bias: bias, stride: (stride, stride), padding: padding)
                try assertBitIdentical(half, backend.conv2d(x, weight: w.widened, bias: bias, stride: (stride, stride), padding: padding),
                                       "conv2d \(kernel)×\(kernel) stride \(stride), \(dtype) weight")
                let dy = try backend.upload(values(half.count, seed: 7), shape: half.shape)
                try assertBitIdentical(
                    backend.conv2dBackwardData(dy, weight: w.half, inputShape: x.shape, stride: (stride, stride), padding: padding),
                    backend.conv2dBackwardData(dy, weight: w.widened, inputShape: x.shape, stride: (stride, stride), padding: padding),
                    "conv2d data gradient \(kernel)×\(kernel) stride \(stride), \(dtype) weight")
            }
            // gemm with a half-size operand on either side (a linear layer's data gradient is dY·W)
            let a = try stored(values(33 * 50, seed: 8), [33, 50], as: dtype, on: backend)
            let b = try backend.upload(values(50 * 70, seed: 9), shape: [50, 70])
            try assertBitIdentical(backend.gemm(a.half, b, transposeA: false, transposeB: false, alpha: 0.5, beta: 0, c: nil),
                                   backend.gemm(a.widened, b, transposeA: false, transposeB: false, alpha: 0.5, beta: 0, c: nil),
                                   "gemm, \(dtype) A")
            let bt = try stored(values(70 * 50, seed: 10), [70, 50], as: dtype, on: backend)
            let at = try backend.upload(values(33 * 50, seed: 11), shape: [33, 50])
            try assertBitIdentical(backend.gemm(at, bt.half, transposeA: false, transposeB: true, alpha: 1, beta: 0, c: nil),
                                   backend.gemm(at, bt.widened, transposeA: false, transposeB: true, alpha: 1, beta: 0, c: nil),
                                   "gemm, \(dtype) Bᵀ")
        }
        // What stays f32: activations, biases, batched products; and integer weights are refused.
        let x16 = try backend.cast(backend.upload(values(8, seed: 1), shape: [2, 4]), to: .bf16)
        let w = try backend.upload(values(12, seed: 2), shape: [3, 4])
        XCTAssertThrowsError(try backend.linear(x16, weight: w, bias: nil)) { XCTAssertTrue("\($0)".contains("computes in f32"), "\($0)") }
        let batched = try backend.cast(backend.upload(values(24, seed: 3), shape: [2, 3, 4]), to: .bf16)
        XCTAssertThrowsError(try backend.gemm(batched, backend.upload(values(8, seed: 4), shape: [4, 2]), transposeA: false,
                                              transposeB: false, alpha: 1, beta: 0, c: nil)) {
            XCTAssertTrue("\($0)".contains("batched product computes in f32"), "\($0)")
        }
        let ids = try backend.upload(HostTensor(ids: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], shape: [3, 4]))
        XCTAssertThrowsError(try backend.linear(backend.upload(values(8, seed: 1), shape: [2, 4]), weight: ids, bias: nil)) {
            XCTAssertTrue("\($0)".contains("takes f32, f16 or bf16 weights"), "\($0)")
        }
    }

    /// A model loaded on a half-weights backend holds its linear and convolution weights in that dtype and
    /// everything else (norms, biases, embeddings) in f32, and still computes and answers in f32.
    func testModelsHoldOnlyTheirWeightMatricesAtHalfSize() throws {
        let backend = CPUBackend(halfWeights: .bf16)
        let folder = PipelineParityTests.directory + "/sd1"
        let unet = try UNet2DConditionModel.load(folder: folder, backend: backend).model
        XCTAssertEqual(unet.dtype, .f32)
        XCTAssertEqual(unet.encoder.convIn.weight.dtype, .bf16)
        XCTAssertEqual(unet.encoder.convIn.bias?.dtype, .f32)
        XCTAssertEqual(unet.normOut.weight.dtype, .f32)
        let vae = try AutoencoderKL.load(folder: folder, backend: backend).model
        XCTAssertEqual(vae.dtype, .f32)
        XCTAssertEqual(vae.decoder.convIn.weight.dtype, .bf16)
        let plain = try UNet2DConditionModel.load(folder: folder, backend: CPUBackend()).model
        XCTAssertEqual(plain.encoder.convIn.weight.dtype, .f32, "no half-size weights unless asked for")
    }

    func testPipelinesMatchDiffusersWithRoundedWeightMatrices() throws {
        for dtype in [DType.bf16, .f16] {
            let backend = CPUBackend(halfWeights: dtype)
            for c in try PipelineParityTests.cases() {
                let pipeline = try StableDiffusionPipeline.load(folder: PipelineParityTests.directory + "/" + c.pipeline, backend: backend,
                                                                scheduler: c.scheduler)
                let request = c.request
                let images = try pipeline.generate(request, warn: { _ in })
                let expected = try SafeTensorsFile(path: fixturesDirectory() + "/half_weights/" + c.images).tensor("\(dtype)")
                assertSameImages(images, expected, "\(c.name) with \(dtype) weights")
            }
        }
    }

    func testWeightsOptionIsTheCPUBackendsAndSaysSo() throws {
        let sd1 = PipelineParityTests.directory + "/sd1"
        let scratch = ScratchDirectory()
        let output = scratch.file("x.png")
        let base = ["generate", "--model", sd1, "--prompt", "x", "--steps", "1", "--output", output]
        try assertPeaFails([(base + ["--weights", "q4"], 2, ["--weights must be one of f32, bf16, f16"]),
                            (base + ["--weights", "bf16", "--backend", "cuda"], 2, ["--weights bf16 is for the cpu backend", "--precision"])],
                           leavesNo: output)
        let result = try runPea(base + ["--weights", "bf16", "--backend", "cpu", "--seed", "3"])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(try runPea(["generate", "--help"]).stdout.contains("--weights f32|bf16|f16"))
        XCTAssertTrue(try runPea(["serve", "--help"]).stdout.contains("--weights"))
        XCTAssertFalse(try runPea(["train", "--help"]).stdout.contains("--weights"), "training keeps its weights in f32")
    }
}
