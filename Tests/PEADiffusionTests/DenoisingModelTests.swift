import XCTest
@testable import PEADiffusion

/// The seams of #15 item 3: DenoisingInputs' optional parts as the UNet accepts and refuses them, ControlNet's
/// residuals, the per-family decisions of ModelFamily, and a pipeline that runs any DenoisingModel.
final class DenoisingModelTests: XCTestCase {
    let backend = CPUBackend()

    func folder(_ name: String) -> String { fixturesDirectory() + "/models/" + name }

    /// A tiny UNet of tools/reference/make_model_fixtures.py and its recorded inputs.
    func unet(_ name: String) throws -> (UNet2DConditionModel, [String: Tensor]) {
        let unet = try UNet2DConditionModel.load(folder: folder(name), backend: backend).model
        let file = try SafeTensorsFile(path: folder(name) + "/io.safetensors")
        var inputs: [String: Tensor] = [:]
        for tensorName in file.names where !tensorName.hasPrefix("out.") {
            inputs[tensorName] = try backend.upload(file.tensor(tensorName))
        }
        return (unet, inputs)
    }

    func baseInputs(_ inputs: [String: Tensor]) -> DenoisingInputs {
        DenoisingInputs(sample: inputs["sample"]!, timestep: inputs["timestep"]!, encoderHiddenStates: inputs["encoder_hidden_states"]!)
    }

    func testTheUNetDescribesItselfToThePipeline() throws {
        let (sd1, _) = try unet("unet_sd1"), (sdxl, _) = try unet("unet_sdxl")
        XCTAssertEqual(sd1.latentChannels, 4)
        XCTAssertEqual(sd1.contextDim, 32)
        XCTAssertEqual(sd1.sampleSize, 8)
        XCTAssertFalse(sd1.takesTextTime)
        XCTAssertNil(sd1.timestepConditionDim)
        XCTAssertTrue(sdxl.takesTextTime)
        XCTAssertEqual(sdxl.contextDim, 40)
    }

    func testTextTimeIsRequiredBySDXLAndRefusedBySD1() throws {
        let (sdxl, xl) = try unet("unet_sdxl")
        assertThrowsError(containing: ["needs text_embeds and time_ids"]) { try sdxl(baseInputs(xl)) }
        var half = baseInputs(xl)
        half.textEmbeds = xl["text_embeds"]   // one half of the pair is not the pair
        assertThrowsError(containing: ["needs text_embeds and time_ids"]) { try sdxl(half) }
        var whole = baseInputs(xl)
        whole.textTime = (xl["text_embeds"]!, xl["time_ids"]!)
        XCTAssertEqual(try sdxl(whole).shape, xl["sample"]!.shape)

        let (sd1, one) = try unet("unet_sd1")
        let batch = one["sample"]!.shape[0]
        var sdxlInputs = baseInputs(one)
        sdxlInputs.textTime = (try backend.zeros([batch, 24], dtype: .f32), try backend.zeros([batch, 6], dtype: .f32))
        assertThrowsError(containing: ["takes no text_embeds or time_ids"]) { try sd1(sdxlInputs) }
        var lcm = baseInputs(one)
        lcm.timestepCondition = try backend.zeros([batch, 256], dtype: .f32)
        assertThrowsError(containing: ["takes no timestep_cond"]) { try sd1(lcm) }
    }

    /// The SD1 fixture (blocks [16, 24], two resnets each) on a [2, 4, 8, 8] latent: conv_in, two resnets and the
    /// downsampler of block 0, two resnets of block 1; the mid block at the halved size.
    func zeroResiduals(batch: Int) throws -> ControlResiduals {
        let shapes = [[batch, 16, 8, 8], [batch, 16, 8, 8], [batch, 16, 8, 8], [batch, 16, 4, 4], [batch, 24, 4, 4], [batch, 24, 4, 4]]
        return ControlResiduals(down: try shapes.map { try backend.zeros($0, dtype: .f32) },
                                mid: try backend.zeros([batch, 24, 4, 4], dtype: .f32))
    }

    func testZeroControlResidualsLeaveThePredictionUnchanged() throws {
        let (sd1, inputs) = try unet("unet_sd1")
        let plain = try backend.downloadFloats(sd1(baseInputs(inputs)))
        var controlled = baseInputs(inputs)
        controlled.controlResiduals = try zeroResiduals(batch: 2)
        XCTAssertEqual(try backend.downloadFloats(sd1(controlled)), plain)

        // and a residual is not ignored: on the mid block's output, or on conv_in's skip
        var mid = controlled
        mid.controlResiduals!.mid = try backend.upload([Float](repeating: 1, count: 2 * 24 * 16), shape: [2, 24, 4, 4])
        XCTAssertNotEqual(try backend.downloadFloats(sd1(mid)), plain)
        var skip = controlled
        skip.controlResiduals!.down[0] = try backend.upload([Float](repeating: 1, count: 2 * 16 * 64), shape: [2, 16, 8, 8])
        XCTAssertNotEqual(try backend.downloadFloats(sd1(skip)), plain)
    }

    func testControlResidualsOfTheWrongShapeAreRefused() throws {
        let (sd1, inputs) = try unet("unet_sd1")
        var tooFew = baseInputs(inputs)
        tooFew.controlResiduals = try zeroResiduals(batch: 2)
        tooFew.controlResiduals!.down.removeLast()
        assertThrowsError(containing: ["5 down residuals", "6 skip connections"]) { try sd1(tooFew) }

        var wrongDown = baseInputs(inputs)
        wrongDown.controlResiduals = try zeroResiduals(batch: 2)
        wrongDown.controlResiduals!.down[3] = try backend.zeros([2, 16, 8, 8], dtype: .f32)
        assertThrowsError(containing: ["down residual 3 must be [2, 16, 4, 4]"]) { try sd1(wrongDown) }

        var wrongMid = baseInputs(inputs)
        wrongMid.controlResiduals = try zeroResiduals(batch: 2)
        wrongMid.controlResiduals!.mid = try backend.zeros([1, 24, 4, 4], dtype: .f32)
        assertThrowsError(containing: ["mid residual must be [2, 24, 4, 4]"]) { try sd1(wrongMid) }

        var wrongBatch = baseInputs(inputs)
        wrongBatch.controlResiduals = try zeroResiduals(batch: 1)
        assertThrowsError(containing: ["down residual 0 must be [2, 16, 8, 8]"]) { try sd1(wrongBatch) }
    }

    func testFamiliesAreConfigurations() throws {
        let outdated = ConfigFile(path: "scheduler_config.json", values: ["steps_offset": .number(0), "clip_sample": .bool(true)])
        for family in [ModelFamily.sd1, .sd2] {
            XCTAssertEqual(family.schedulerConfig(outdated).values["steps_offset"], .number(1))
            XCTAssertEqual(family.schedulerConfig(outdated).values["clip_sample"], .bool(false))
            XCTAssertFalse(family.upcastsForceUpcastVAE)
        }
        XCTAssertEqual(ModelFamily.sdxl.schedulerConfig(outdated).values, outdated.values)
        XCTAssertTrue(ModelFamily.sdxl.upcastsForceUpcastVAE)
        for family in [ModelFamily.sd1, .sd2, .sdxl] {
            XCTAssertEqual(family.sizeMultiple(vaeScaleFactor: 8), 8)
            XCTAssertEqual(family.sizeMultiple(vaeScaleFactor: 2), 8, "diffusers' check_inputs asks for 8 whatever the VAE")
            XCTAssertEqual(family.sizeMultiple(vaeScaleFactor: 16), 16, "the latent grid needs the VAE's factor")
        }
    }

    /// kd-step on an SD1 UNet: a batch carrying SDXL's time_ids is refused before the UNet sees it.
    func testDistillationRefusesSDXLInputsForAnSD1UNet() throws {
        let kd = fixturesDirectory() + "/kd/"
        let unet = try UNet2DConditionModel.load(folder: fixturesDirectory() + "/pipelines/sd1/unet", backend: backend).model
        let adapter = try PEAAdapter.load(path: kd + "adapter_sd1.safetensors", backend: backend)
        var batch = try DistillationBatch.load(path: kd + "sd1_plain.safetensors", backend: backend)
        batch.timeIds = try backend.zeros([batch.noisyLatents.shape[0], 6], dtype: .f32)
        assertThrowsError(containing: ["time_ids and teacher_text_embeds are SDXL's"]) {
            try KnowledgeDistillation(unet: unet).step(adapter: adapter, batch: batch)
        }
    }

    /// A denoiser that predicts zeros and keeps what it was given.
    final class RecordingDenoiser: DenoisingModel {
        let latentChannels = 4, sampleSize: Int? = 8, contextDim = 32
        let takesTextTime: Bool
        let timestepConditionDim: Int? = nil
        let dtype = DType.f32
        var calls: [DenoisingInputs] = []

        init(takesTextTime: Bool) { self.takesTextTime = takesTextTime }

        func callAsFunction(_ inputs: DenoisingInputs) throws -> Tensor {
            calls.append(inputs)
            return try inputs.sample.backend.zeros(inputs.sample.shape, dtype: .f32)
        }
    }

    /// Fixed states [B, 3, 32] and, with `pooled`, a pooled embedding [B, 5].
    struct FixedConditioner: TextConditioner {
        let pooled: Bool
        func conditioning(_ count: Int) throws -> Conditioning {
            let b = CPUBackend()
            return Conditioning(states: try b.zeros([count, 3, 32], dtype: .f32), pooled: pooled ? try b.zeros([count, 5], dtype: .f32) : nil)
        }
        func encode(_ prompts: [String], warn: (String) -> Void) throws -> Conditioning { try conditioning(prompts.count) }
        func encodeNegative(_ negatives: [String]?, count: Int, warn: (String) -> Void) throws -> Conditioning { try conditioning(count) }
    }

    /// The pipeline builds SDXL's time ids because the denoiser takes them, not because of the family, and
    /// derives the latent from the denoiser's channels and the VAE's factor.
    func testThePipelineRunsAnyDenoisingModel() throws {
        let root = fixturesDirectory() + "/pipelines/sd1"
        let vae = try AutoencoderKL.load(folder: root + "/vae", backend: backend).model
        let config = try ConfigFile(path: root + "/scheduler/scheduler_config.json")
        for takesTextTime in [false, true] {
            let denoiser = RecordingDenoiser(takesTextTime: takesTextTime)
            let pipeline = StableDiffusionPipeline(family: .sd1, denoiser: denoiser, vae: vae, conditioner: FixedConditioner(pooled: true),
                                                   scheduler: try makeScheduler(name: nil, config: config), schedulerConfig: config,
                                                   backend: backend)
            var request = GenerationRequest(prompt: "x", width: 24, height: 16)
            request.steps = 2
            let images = try pipeline.generate(request)
            XCTAssertEqual(images.map { [$0.width, $0.height] }, [[24, 16]])
            var sampler = pipeline.scheduler   // generate works on a copy: the pipeline's own is left as it was
            try sampler.setTimesteps(request.steps)
            XCTAssertEqual(denoiser.calls.count, sampler.timesteps.count)   // one evaluation a step
            let inputs = try XCTUnwrap(denoiser.calls.first)
            XCTAssertEqual(inputs.sample.shape, [2, 4, 16 / vae.downsamplingFactor, 24 / vae.downsamplingFactor])
            if takesTextTime {
                let textTime = try XCTUnwrap(inputs.textTime)
                XCTAssertEqual(textTime.textEmbeds.shape, [2, 5])
                XCTAssertEqual(try backend.downloadFloats(textTime.timeIds), [16, 24, 0, 0, 16, 24, 16, 24, 0, 0, 16, 24])
            } else {
                XCTAssertNil(inputs.textEmbeds)
                XCTAssertNil(inputs.timeIds)
            }
        }
    }
}
