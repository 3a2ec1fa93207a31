import XCTest
@testable import PEADiffusion

/// CUDA graphs for the denoising loop (`--cuda-graphs`, CUDAGraphedDenoiser) on the emulated CUDA backend, which
/// captures and replays as a GPU does and refuses what a GPU refuses during a capture: a graph-replayed evaluation
/// equals the eager one bit for bit, is captured once per input shape and replayed after, holds its memory steady,
/// and a denoiser that cannot be captured runs eagerly with a warning. PEA_SKIP_CUDA_EMU=1 skips these tests.
final class CUDAGraphTests: XCTestCase {
    func cuda() throws -> CUDABackend { try CUDABackendParityTests.sharedCUDA() }

    func tinyUNet(_ cuda: CUDABackend) throws -> UNet2DConditionModel {
        try UNet2DConditionModel.load(folder: fixturesDirectory() + "/models/unet_sd1", backend: cuda).model
    }

    /// The fixture's UNet inputs with the sample scaled and the timestep replaced: each step's values differ.
    func inputs(_ cuda: CUDABackend, step: Int, batch: Int = 1) throws -> DenoisingInputs {
        let file = try SafeTensorsFile(path: fixturesDirectory() + "/models/unet_sd1/io.safetensors")
        func repeated(_ name: String) throws -> Tensor {
            let t = try cuda.upload(file.tensor(name))
            return batch == 1 ? t : try cuda.concat(Array(repeating: t, count: batch), dim: 0)
        }
        return DenoisingInputs(sample: try cuda.scale(repeated("sample"), by: 1 + 0.25 * Float(step)),
                               timestep: try cuda.upload([Float(900 - 97 * step)], shape: [1]),
                               encoderHiddenStates: try repeated("encoder_hidden_states"))
    }

    func bytes(_ t: Tensor, _ cuda: CUDABackend) throws -> [UInt8] { try cuda.download(t).bytes }

    /// Every evaluation through the graph equals the eager UNet's bit for bit, with new sample and timestep values
    /// each step; one capture per shape, replays after; replays hold device memory steady.
    func testReplayedEvaluationsEqualEagerOnesAndMemoryHoldsSteady() throws {
        let cuda = try cuda()
        let unet = try tinyUNet(cuda)
        let graphed = CUDAGraphedDenoiser(unet, backend: cuda, warn: { XCTFail("unexpected warning: \($0)") })
        var inUse: [Int] = []
        for step in 0..<5 {
            let x = try inputs(cuda, step: step)
            let eager = try bytes(unet(x), cuda)
            XCTAssertEqual(try bytes(graphed(x), cuda), eager, "step \(step): the graph's answer differs from the eager UNet's")
            inUse.append(try cuda.memoryStats().bytesInUse)
        }
        XCTAssertEqual(graphed.statistics, .init(captures: 1, replays: 4, fallbacks: 0))
        XCTAssertEqual(inUse[2], inUse[4], "device memory in use grew over replays: \(inUse)")
        // Another batch is another shape: a second graph, the first one still replayed.
        let two = try inputs(cuda, step: 1, batch: 2)
        XCTAssertEqual(try bytes(graphed(two), cuda), try bytes(unet(two), cuda))
        XCTAssertEqual(try bytes(graphed(two), cuda), try bytes(unet(two), cuda))
        let one = try inputs(cuda, step: 3)
        XCTAssertEqual(try bytes(graphed(one), cuda), try bytes(unet(one), cuda))
        XCTAssertEqual(graphed.statistics, .init(captures: 2, replays: 6, fallbacks: 0))
        XCTAssertEqual(graphed.graphCount, 2)
    }

    /// At most `capacity` graphs are kept: a new shape drops the least recently used graph, whose shape is captured
    /// again when it comes back; the answers stay the eager ones.
    func testTheLeastRecentlyUsedGraphIsDroppedBeyondCapacity() throws {
        let cuda = try cuda()
        let unet = try tinyUNet(cuda)
        let graphed = CUDAGraphedDenoiser(unet, backend: cuda, capacity: 1, warn: { XCTFail("unexpected warning: \($0)") })
        for (step, batch) in [(0, 1), (1, 1), (2, 2), (3, 1)].enumerated().map({ ($0.offset, $0.element.1) }) {
            let x = try inputs(cuda, step: step, batch: batch)
            XCTAssertEqual(try bytes(graphed(x), cuda), try bytes(unet(x), cuda), "step \(step), batch \(batch)")
            XCTAssertEqual(graphed.graphCount, 1)
        }
        XCTAssertEqual(graphed.statistics, .init(captures: 3, replays: 1, fallbacks: 0))
    }

    /// A tensor handed out by a replay is the caller's: the next replay does not overwrite it.
    func testAnswersOutliveLaterReplays() throws {
        let cuda = try cuda()
        let unet = try tinyUNet(cuda)
        let graphed = CUDAGraphedDenoiser(unet, backend: cuda)
        let answers = try (0..<3).map { try graphed(inputs(cuda, step: $0)) }
        for (step, answer) in answers.enumerated() {
            XCTAssertEqual(try bytes(answer, cuda), try bytes(unet(inputs(cuda, step: step)), cuda), "step \(step)")
        }
    }

    /// A denoiser that reads a value back to the host cannot be captured (a capture cannot wait for the device):
    /// that shape falls back to eager evaluations, once, with a warning naming the problem; the answers are right.
    func testACaptureThatFailsFallsBackToEagerWithAWarning() throws {
        struct HostReading: DenoisingModel {
            let unet: UNet2DConditionModel
            let cuda: CUDABackend
            var latentChannels: Int { unet.latentChannels }
            var sampleSize: Int? { unet.sampleSize }
            var contextDim: Int { unet.contextDim }
            var takesTextTime: Bool { unet.takesTextTime }
            var timestepConditionDim: Int? { unet.timestepConditionDim }
            var dtype: DType { unet.dtype }
            func callAsFunction(_ inputs: DenoisingInputs) throws -> Tensor {
                _ = try cuda.download(inputs.timestep)  // e.g. a timestep-dependent branch taken on the host
                return try unet(inputs)
            }
        }
        let cuda = try cuda()
        let unet = try tinyUNet(cuda)
        var warnings: [String] = []
        let graphed = CUDAGraphedDenoiser(HostReading(unet: unet, cuda: cuda), backend: cuda, warn: { warnings.append($0) })
        for step in 0..<3 {
            let x = try inputs(cuda, step: step)
            XCTAssertEqual(try bytes(graphed(x), cuda), try bytes(unet(x), cuda), "step \(step)")
        }
        XCTAssertEqual(graphed.statistics, .init(captures: 0, replays: 0, fallbacks: 1))
        XCTAssertEqual(warnings.count, 1, "\(warnings)")
        XCTAssertTrue(warnings.first?.contains("could not be captured") == true && warnings.first?.contains("download") == true,
                      "\(warnings)")
        // The backend is fine after the failed capture.
        XCTAssertEqual(try cuda.downloadFloats(cuda.scale(cuda.upload([2], shape: [1]), by: 3)), [6])
    }

    /// Whole pipelines with graphs on give the images they give with graphs off, bit for bit, and diffusers' images:
    /// SD1 with guidance and PNDM, SD1 with Euler ancestral (noise every step) and a batch, SDXL (added
    /// conditioning) with Euler; one capture, a replay per later step.
    func testPipelinesWithGraphsEqualPipelinesWithout() throws {
        let cuda = try cuda()
        let cases = try PipelineParityTests.cases().filter { ["sd1_pndm", "sd1_euler_a_negative_batch", "sdxl_euler_zero_negative"].contains($0.name) }
        XCTAssertEqual(cases.count, 3)
        for c in cases {
            let pipeline = try StableDiffusionPipeline.load(folder: PipelineParityTests.directory + "/" + c.pipeline, backend: cuda,
                                                            scheduler: c.scheduler)
            let request = c.request
            let eager = try pipeline.generate(request)
            pipeline.cudaGraphs = true
            let graphed = try pipeline.generate(request)
            XCTAssertEqual(graphed, eager, "\(c.name): images with CUDA graphs differ from those without")
            assertSameImages(graphed, try SafeTensorsFile(path: PipelineParityTests.directory + "/" + c.images).tensor("images"),
                             c.name + " (emulated CUDA, graphs)")
            var sampler = pipeline.scheduler
            try sampler.setTimesteps(c.steps)
            let stats = try XCTUnwrap(pipeline.graphedDenoiser).statistics
            XCTAssertEqual(stats, .init(captures: 1, replays: sampler.timesteps.count - 1, fallbacks: 0), c.name)
        }
    }

    /// ControlNet's residuals are inputs of the graph too: the ControlNet pipeline's image with graphs is diffusers'.
    func testControlNetPipelineWithGraphsMatchesDiffusers() throws {
        let cuda = try cuda()
        let c = try XCTUnwrap(try ControlNetTests.cases().first { $0.name == "sd1_dpmpp_scale13" })
        let pipeline = try StableDiffusionPipeline.load(folder: fixturesDirectory() + "/pipelines/sd1", backend: cuda, scheduler: c.scheduler)
        pipeline.cudaGraphs = true
        var models: [String: ControlNetModel] = [:]
        let request = try ControlNetTests.request(c, backend: cuda, models: &models)
        let images = try pipeline.generate(request)
        assertSameImages(images, try SafeTensorsFile(path: ControlNetTests.directory + "/" + c.images).tensor("images"),
                         c.name + " (emulated CUDA, graphs)")
        XCTAssertEqual(try XCTUnwrap(pipeline.graphedDenoiser).statistics.fallbacks, 0)
        XCTAssertGreaterThan(try XCTUnwrap(pipeline.graphedDenoiser).statistics.replays, 0)
        pipeline.cudaGraphs = false
        XCTAssertEqual(try pipeline.generate(request), images, "ControlNet images with CUDA graphs differ from those without")
    }

    /// The CPU backend is untouched: the flag does nothing there.
    func testGraphsAreCUDAOnly() throws {
        let pipeline = try StableDiffusionPipeline.load(folder: PipelineParityTests.directory + "/sd1", backend: CPUBackend())
        pipeline.cudaGraphs = true
        var request = GenerationRequest(prompt: "a fox", width: 16, height: 16)
        request.steps = 1
        _ = try pipeline.generate(request)
        XCTAssertNil(pipeline.graphedDenoiser)
    }

    /// `--cuda-graphs on|off` on pea generate and pea serve: listed in --help, checked, and the same PNG either way
    /// on the (emulated) CUDA backend; on pea bench unet, replays are what is timed and profiled.
    func testCommandLineFlag() throws {
        _ = try CUDABackendParityTests.emulatedLibrary()
        for command in ["generate", "serve"] {
            let help = try runPea([command, "--help"])
            XCTAssertTrue(help.stdout.contains("--cuda-graphs on|off"), "\(command) --help:\n\(help.stdout)")
        }
        let scratch = ScratchDirectory("pea-cuda-graphs")
        let generate = ["generate", "--model", PipelineParityTests.directory + "/sd1", "--prompt", "a red fox", "--steps", "3",
                        "--width", "16", "--height", "16", "--seed", "5", "--backend", "cuda"]
        let environment = ["PEA_CUDA_LIB": CUDABackendParityTests.emulatedLibraryPath]
        let bad = try runPea(generate + ["--cuda-graphs", "maybe", "--output", scratch.file("bad.png")], environment: environment)
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("--cuda-graphs must be one of on, off"), bad.stderr)
        var images: [String: [UInt8]] = [:]
        for choice in ["on", "off"] {
            let out = scratch.file("\(choice).png")
            let run = try runPea(generate + ["--cuda-graphs", choice, "--output", out], environment: environment)
            XCTAssertEqual(run.status, 0, run.stderr)
            XCTAssertFalse(run.stderr.contains("warning"), run.stderr)
            images[choice] = try XCTUnwrap(FileManager.default.contents(atPath: out)).map { $0 }
        }
        XCTAssertEqual(images["on"], images["off"], "pea generate --cuda-graphs on and off wrote different images")

        // pea bench unet times replays with --cuda-graphs on (CUDA only); its profile is then one graph_replay call.
        let bench = ["bench", "unet", "--config", fixturesDirectory() + "/models/unet_sd1/config.json", "--latent", "8x8",
                     "--repeats", "1", "--cuda-graphs", "on", "--json"]
        let timed = try runPea(bench + ["--backend", "cuda", "--profile"], environment: environment)
        XCTAssertEqual(timed.status, 0, timed.stderr)
        XCTAssertTrue(timed.stdout.contains("\"graph_replay\"") && !timed.stdout.contains("\"conv2d\""), timed.stdout)
        let onCPU = try runPea(bench + ["--backend", "cpu"])
        XCTAssertNotEqual(onCPU.status, 0)
        XCTAssertTrue(onCPU.stderr.contains("--cuda-graphs on needs the CUDA backend"), onCPU.stderr)
    }
}
