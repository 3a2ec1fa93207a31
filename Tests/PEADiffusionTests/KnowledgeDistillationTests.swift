import XCTest
@testable import PEADiffusion

/// One distillation step (losses and every adapter gradient) against torch autograd on the tiny UNets:
/// tools/reference/make_kd_fixtures.py computes the official training_step in float64 and saves it under
/// Tests/Fixtures/kd. docs/testing.md's tolerance for gradients: relative L2 ≤ 1e-3.
final class KnowledgeDistillationTests: XCTestCase {
    static let gradientTolerance = ParityTolerance(relativeL2: 1e-3, maxAbsolute: 1e-3)

    /// Runs the fixture's step on `backend` and compares it with torch.
    @discardableResult
    static func checkStep(_ name: String, on backend: any ComputeBackend, tolerance: ParityTolerance = gradientTolerance,
                          gradientCheckpointing: Bool = false, file: StaticString = #filePath, line: UInt = #line) throws -> [String: [Float]] {
        let fixture = fixturesDirectory() + "/kd/\(name).safetensors"
        let expected = try SafeTensorsFile(path: fixture)
        let sdxl = name.hasPrefix("sdxl")
        let unet = try UNet2DConditionModel.load(folder: fixturesDirectory() + "/pipelines/\(sdxl ? "sdxl" : "sd1")/unet", backend: backend).model
        let adapter = try PEAAdapter.load(path: fixturesDirectory() + "/kd/adapter_\(sdxl ? "sdxl" : "sd1").safetensors", backend: backend)
        let batch = try DistillationBatch.load(path: fixture, backend: backend)
        let (losses, gradients) = try KnowledgeDistillation(unet: unet, gradientCheckpointing: gradientCheckpointing)
            .step(adapter: adapter, batch: batch)

        let measured = [("loss_task", losses.task), ("loss_logits", losses.logits), ("loss_features", losses.features), ("loss", losses.total)]
        for (key, value) in measured {
            assertClose([value], try expected.tensor(key).floats(), tolerance, "\(name) \(key)", file: file, line: line)
        }
        XCTAssertEqual(Set(gradients.keys), Set(adapter.namedParameters.map(\.name)), file: file, line: line)
        for (parameter, _) in adapter.namedParameters {
            assertClose(try backend.downloadFloats(XCTUnwrap(gradients[parameter])), try expected.tensor("grad.\(parameter)").floats(),
                        tolerance, "\(name) grad.\(parameter)", file: file, line: line)
        }
        return try gradients.mapValues { try backend.downloadFloats($0) }
    }

    /// Gradient checkpointing (`pea train --gradient-checkpointing`): every resnet and transformer block of the
    /// student runs again in the backward pass; the gradients are torch's, and the plain tape's up to the order
    /// of summation (f32 rounding: relative L2 ≤ 1e-5), on the CPU and the emulated CUDA backend.
    func testGradientCheckpointingGivesTheSameGradients() throws {
        let cpu = CPUBackend(threads: 2)
        for name in ["sd1_hybrid", "sdxl_plain"] {
            let plain = try Self.checkStep(name, on: cpu)
            let checkpointed = try Self.checkStep(name, on: cpu, gradientCheckpointing: true)
            for (parameter, values) in plain {
                assertClose(checkpointed[parameter]!, values, ParityTolerance(relativeL2: 1e-5, maxAbsolute: 1e-6), "\(name) checkpointed grad.\(parameter)")
            }
        }
        try Self.checkStep("sdxl_plain", on: CUDABackendParityTests.sharedCUDA(), gradientCheckpointing: true)
    }

    func testPlainStepMatchesTorchAutograd() throws {
        try Self.checkStep("sd1_plain", on: CPUBackend(threads: 2))
    }

    func testHybridStepMatchesTorchAutograd() throws {
        try Self.checkStep("sd1_hybrid", on: CPUBackend(threads: 2))
    }

    func testSDXLStepMatchesTorchAutograd() throws {
        try Self.checkStep("sdxl_plain", on: CPUBackend(threads: 1))
    }

    /// The same step on the CUDA backend, through the emulator (libpea_cuda_emu.so): every backward kernel on the
    /// path from the losses to the adapter, against torch.
    func testStepOnEmulatedCUDAMatchesTorchAutograd() throws {
        let cuda = try CUDABackendParityTests.sharedCUDA()
        try Self.checkStep("sd1_hybrid", on: cuda)
        try Self.checkStep("sdxl_plain", on: cuda)
    }

    /// Other term weights (`pea train --task-weight/--feature-weight`): the gradient is torch's per-term
    /// gradients (the fixture's ref.grad_<term>.*) in the same combination.
    func testTermWeightsCombineTorchsPerTermGradients() throws {
        let backend = CPUBackend(threads: 2)
        let expected = try SafeTensorsFile(path: fixturesDirectory() + "/kd/sd1_plain.safetensors")
        let unet = try UNet2DConditionModel.load(folder: fixturesDirectory() + "/pipelines/sd1/unet", backend: backend).model
        let adapter = try PEAAdapter.load(path: fixturesDirectory() + "/kd/adapter_sd1.safetensors", backend: backend)
        let batch = try DistillationBatch.load(path: fixturesDirectory() + "/kd/sd1_plain.safetensors", backend: backend)
        for (taskWeight, featureWeight) in [(Float(0), Float(0.1)), (0.5, 1)] {
            let (losses, gradients) = try KnowledgeDistillation(unet: unet, featureWeight: featureWeight, taskWeight: taskWeight)
                .step(adapter: adapter, batch: batch)
            let terms = try ["task", "logits", "features"].map { try expected.tensor("loss_\($0)").floats()[0] }
            assertClose([losses.total], [taskWeight * terms[0] + terms[1] + featureWeight * terms[2]], Self.gradientTolerance,
                        "loss with weights \(taskWeight), \(featureWeight)")
            for (parameter, _) in adapter.namedParameters {
                let task = try expected.tensor("ref.grad_task.\(parameter)").floats()
                let logits = try expected.tensor("ref.grad_logits.\(parameter)").floats()
                let features = try expected.tensor("ref.grad_features.\(parameter)").floats()
                let combined = (0..<task.count).map { taskWeight * task[$0] + logits[$0] + featureWeight * features[$0] }
                assertClose(try backend.downloadFloats(XCTUnwrap(gradients[parameter])), combined, Self.gradientTolerance,
                            "grad.\(parameter) with weights \(taskWeight), \(featureWeight)")
            }
        }
    }

    /// The losses do not depend on the loss scale, and the gradients come back unscaled.
    func testLossScaleIsUndone() throws {
        let backend = CPUBackend(threads: 2)
        let unet = try UNet2DConditionModel.load(folder: fixturesDirectory() + "/pipelines/sd1/unet", backend: backend).model
        let adapter = try PEAAdapter.load(path: fixturesDirectory() + "/kd/adapter_sd1.safetensors", backend: backend)
        let batch = try DistillationBatch.load(path: fixturesDirectory() + "/kd/sd1_plain.safetensors", backend: backend)
        let step = KnowledgeDistillation(unet: unet)
        let plain = try step.step(adapter: adapter, batch: batch)
        let scaled = try step.step(adapter: adapter, batch: batch, lossScale: 1024)
        XCTAssertEqual(plain.losses, scaled.losses)
        for (name, gradient) in plain.gradients {
            assertClose(try backend.downloadFloats(scaled.gradients[name]!), try backend.downloadFloats(gradient), .f32, name)
        }
    }

    func testMismatchedBatchIsAClearError() throws {
        let backend = CPUBackend(threads: 1)
        let unet = try UNet2DConditionModel.load(folder: fixturesDirectory() + "/pipelines/sd1/unet", backend: backend).model
        let adapter = try PEAAdapter.load(path: fixturesDirectory() + "/kd/adapter_sd1.safetensors", backend: backend)
        var batch = try DistillationBatch.load(path: fixturesDirectory() + "/kd/sd1_plain.safetensors", backend: backend)
        batch.uncondMask = [0, 1]
        assertThrowsError(containing: ["kd-step", "uncond_mask", "3 values"]) {
            _ = try KnowledgeDistillation(unet: unet).step(adapter: adapter, batch: batch)
        }
    }

    /// `pea eval kd-step` as a user runs it: the hybrid case from the command line, then a broken input file.
    func testEvalKDStepCommand() throws {
        let scratch = ScratchDirectory("pea-kd")
        let output = scratch.file("kd.safetensors")
        let fixture = fixturesDirectory() + "/kd/sd1_hybrid.safetensors"
        let arguments = ["eval", "kd-step", "--unet", fixturesDirectory() + "/pipelines/sd1", "--adapter",
                         fixturesDirectory() + "/kd/adapter_sd1.safetensors", "--output", output, "--backend", "cpu"]
        let result = try runPea(arguments + ["--inputs", fixture])
        XCTAssertEqual(result.status, 0, result.stderr)
        let written = try SafeTensorsFile(path: output), expected = try SafeTensorsFile(path: fixture)
        XCTAssertEqual(Set(written.names), Set(expected.names.filter { $0.hasPrefix("loss") || $0.hasPrefix("grad.") }))
        for name in written.names {
            assertClose(try written.tensor(name).floats(), try expected.tensor(name).floats(), Self.gradientTolerance, "eval kd-step \(name)")
        }

        // Inputs missing a tensor: a clear error naming the file and the tensor, exit 1, no output.
        let broken = scratch.file("broken.safetensors")
        let host = try expected.names.filter { $0 != "teacher_states" && !$0.hasPrefix("ref.") }.map { (name: $0, tensor: try expected.tensor($0)) }
        try SafeTensorsWriter.write(host, metadata: [:], to: broken)
        let missing = scratch.file("missing.safetensors")
        let failed = try runPea(["eval", "kd-step", "--unet", fixturesDirectory() + "/pipelines/sd1", "--adapter",
                                 fixturesDirectory() + "/kd/adapter_sd1.safetensors", "--output", missing, "--inputs", broken])
        XCTAssertEqual(failed.status, 1)
        XCTAssertTrue(failed.stderr.contains("broken.safetensors") && failed.stderr.contains("teacher_states"), failed.stderr)
        XCTAssertFalse(fileExists(missing))
    }
}
