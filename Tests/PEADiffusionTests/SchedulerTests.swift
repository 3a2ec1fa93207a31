import Foundation
import XCTest
@testable import PEADiffusion

/// The schedulers against diffusers, on the fixtures of tools/reference/make_scheduler_fixtures.py: each case
/// is a folder's scheduler_config.json and a picked scheduler name, built there the way diffusers users switch
/// schedulers (`Target.from_config(pipe.scheduler.config)`) and here by `makeScheduler`, so the fixtures test
/// the from_config semantics too.
final class SchedulerTests: XCTestCase {
    let backend = CPUBackend()

    /// One case file: the config it was built from, the name picked, and diffusers' results.
    struct Case {
        let label: String
        let file: SafeTensorsFile
        let config: ConfigFile
        let name: String?
        let className: String
        let tableSteps: [Int]
        let refusedSteps: [Int]
        let loopSteps: [Int]
        let eta: Double

        init(path: String) throws {
            let file = try SafeTensorsFile(path: path)
            let label = String(path.split(separator: "/").last!.dropLast(".safetensors".count))
            let strings = file.metadata
            func metadata(_ key: String) throws -> String {
                guard let value = strings[key] else { throw PEAError.invalidFile(path: path, reason: "no metadata '\(key)'") }
                return value
            }
            func integers(_ key: String) throws -> [Int] { try JSONValue.parse(metadata(key)).arrayValue!.map { $0.intValue! } }
            guard case .object(let values) = try JSONValue.parse(metadata("config")) else {
                throw PEAError.invalidFile(path: path, reason: "config is not an object")
            }
            self.file = file
            self.label = label
            config = ConfigFile(path: "\(label)/scheduler_config.json", values: values)
            let picked = try metadata("name")
            name = picked.isEmpty ? nil : picked
            className = try metadata("class")
            tableSteps = try integers("table_steps")
            refusedSteps = try integers("refused_steps")
            loopSteps = try integers("loop_steps")
            eta = try JSONValue.parse(metadata("eta")).doubleValue!
        }

        func floats(_ name: String) throws -> [Float] { try file.tensor(name).floats() }
    }

    static let directory = fixturesDirectory() + "/schedulers"

    func cases() throws -> [Case] {
        let names = try FileManager.default.contentsOfDirectory(atPath: Self.directory)
            .filter { $0.hasSuffix(".safetensors") && !$0.hasPrefix("ddpm_") }.sorted()
        XCTAssertGreaterThanOrEqual(names.count, 20, "scheduler fixtures missing")
        return try names.map { try Case(path: Self.directory + "/" + $0) }
    }

    /// The σ table of schedulers that have one.
    func sigmas(of scheduler: any Scheduler) -> [Float]? {
        switch scheduler {
        case let euler as EulerDiscreteScheduler: return euler.sigmas
        case let ancestral as EulerAncestralDiscreteScheduler: return ancestral.sigmas
        case let dpm as DPMSolverMultistepScheduler: return dpm.sigmas
        default: return nil
        }
    }

    func assertRelativelyClose(_ actual: [Double], _ expected: [Double], _ tolerance: Double, _ what: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        guard actual.count == expected.count else {
            return XCTFail("\(what): \(actual.count) values, expected \(expected.count): \(actual) vs \(expected)", file: file, line: line)
        }
        for (i, (a, e)) in zip(actual, expected).enumerated() where abs(a - e) > tolerance * max(abs(e), 1e-30) {
            return XCTFail("\(what)[\(i)]: \(a), expected \(e)", file: file, line: line)
        }
    }

    // MARK: - Timesteps, sigmas, initial noise

    /// Relative tolerance on the σ and ᾱ tables. Ours are torch's bit for bit but for torch's float32 sqrt,
    /// which is not correctly rounded (1 ulp off for about a fifth of ᾱ); zero-terminal-SNR rescaling divides
    /// neighbouring near-zero values and amplifies that to a few 1e-6.
    func sigmaTolerance(_ config: ConfigFile) -> Double {
        (try? config.bool("rescale_betas_zero_snr", default: false)) == true ? 1e-5 : 1e-6
    }

    func testTimestepsSigmasAndInitialNoiseMatchDiffusers() throws {
        for c in try cases() {
            var scheduler = try makeScheduler(name: c.name, config: c.config)
            XCTAssertEqual(scheduler.className, c.className, c.label)

            let timesteps = try c.file.tensor("table.timesteps")
            let lengths = try c.file.tensor("table.lengths").integers()!
            let sigmaTable = c.file.contains("table.sigmas") ? try c.floats("table.sigmas") : nil
            let initNoise = try c.floats("table.init_noise_sigma")
            XCTAssertEqual(sigmaTable != nil, sigmas(of: scheduler) != nil, "\(c.label): has sigmas")
            XCTAssertEqual(scheduler.timestepDType, timesteps.dtype, "\(c.label): timestep dtype")

            var offset = 0, sigmaOffset = 0
            for (k, n) in c.tableSteps.enumerated() {
                let what = "\(c.label) N=\(n)"
                try scheduler.setTimesteps(n)
                let count = lengths[k]
                XCTAssertEqual(scheduler.timesteps.count, count, "\(what): number of timesteps")
                if let integers = timesteps.integers() {
                    // Whole numbers: exactly.
                    let expected = Array(integers[offset..<offset + count])
                    XCTAssertEqual(scheduler.timesteps, expected.map(Double.init), "\(what): timesteps")
                    XCTAssert(scheduler.timesteps.allSatisfy { $0 == $0.rounded() })
                } else {
                    let expected = Array(timesteps.floats()[offset..<offset + count]).map(Double.init)
                    assertRelativelyClose(scheduler.timesteps, expected, 1e-6, "\(what): timesteps")
                }
                offset += count
                if let sigmaTable, let actual = sigmas(of: scheduler) {
                    let expected = Array(sigmaTable[sigmaOffset..<sigmaOffset + count + 1]).map(Double.init)
                    assertRelativelyClose(actual.map(Double.init), expected, sigmaTolerance(c.config), "\(what): sigmas")
                    sigmaOffset += count + 1
                }
                assertRelativelyClose([Double(scheduler.initNoiseSigma)], [Double(initNoise[k])], 1e-6, "\(what): init_noise_sigma")
            }
            XCTAssertEqual(offset, timesteps.count, "\(c.label): every recorded timestep compared")
            for n in c.refusedSteps {
                XCTAssertThrowsError(try scheduler.setTimesteps(n), "\(c.label): diffusers refuses N=\(n)")
            }
        }
    }

    // MARK: - Denoising loops

    /// The fixtures' stand-in for the UNet: model(x, t) = 0.3·x + 0.1·cos(t/100)·fixed.
    func model(_ input: Tensor, timestep: Double, fixed: Tensor) throws -> Tensor {
        try linearCombination([(0.3, input), (0.1 * cos(timestep / 100), fixed)])
    }

    func testDenoisingLoopsMatchDiffusersStepByStep() throws {
        var loops = 0
        for c in try cases() {
            let fixed = try backend.upload(c.file.tensor("fixed"))
            for n in c.loopSteps {
                var scheduler = try makeScheduler(name: c.name, config: c.config)
                if var ddim = scheduler as? DDIMScheduler {
                    ddim.eta = c.eta
                    scheduler = ddim
                }
                try scheduler.setTimesteps(n)
                let prefix = "N\(n)."
                var latents = try backend.upload(c.file.tensor(prefix + "initial"))
                for i in scheduler.timesteps.indices {
                    let what = "\(c.label) N=\(n) step \(i) (t=\(scheduler.timesteps[i]))"
                    // What the pipeline does: scale, evaluate the model at the timestep the UNet would get, step.
                    let input = try scheduler.scaleModelInput(latents, stepIndex: i)
                    if c.file.contains(prefix + "model_input.\(i)") {
                        assertClose(try backend.downloadFloats(input), try c.floats(prefix + "model_input.\(i)"), .f32, "\(what) model input")
                    } else {
                        XCTAssertEqual(try backend.downloadFloats(input), try backend.downloadFloats(latents), "\(what): scale_model_input is the identity")
                    }
                    let timestep = try scheduler.modelTimestep(stepIndex: i)
                    XCTAssertEqual(timestep.dtype, scheduler.timestepDType)
                    XCTAssertEqual(Double(timestep.floats()[0]), scheduler.timesteps[i])
                    let output = try model(input, timestep: scheduler.timesteps[i], fixed: fixed)

                    let noiseName = prefix + "noise.\(i)"
                    var drawn = 0
                    latents = try scheduler.step(modelOutput: output, stepIndex: i, sample: latents, noise: {
                        drawn += 1
                        return try self.backend.upload(c.file.tensor(noiseName))
                    })
                    XCTAssertEqual(drawn, c.file.contains(noiseName) ? 1 : 0, "\(what): noise drawn as diffusers draws it")
                    assertClose(try backend.downloadFloats(latents), try c.floats(prefix + "prev_sample.\(i)"), .f32, "\(what) prev_sample")
                }
                XCTAssertFalse(c.file.contains(prefix + "prev_sample.\(scheduler.timesteps.count)"), "\(c.label) N=\(n): diffusers ran more steps")
                loops += 1
            }
        }
        XCTAssertGreaterThanOrEqual(loops, 40)
    }

    // MARK: - Training: add_noise and get_velocity

    func testAddNoiseAndVelocityMatchDDPMScheduler() throws {
        for label in ["ddpm_sd15", "ddpm_zsnr", "ddpm_cosine"] {
            let file = try SafeTensorsFile(path: Self.directory + "/\(label).safetensors")
            guard case .object(let values) = try JSONValue.parse(file.metadata["config"]!) else { return XCTFail(label) }
            let config = ConfigFile(path: "\(label)/scheduler_config.json", values: values)
            let ddpm = try DDPMScheduler(config: config)

            // The float32 ᾱ table every scheduler is built on (betas, zero-SNR rescaling, cumprod).
            let expectedAlphas = try file.tensor("alphas_cumprod").floats().map(Double.init)
            assertRelativelyClose(ddpm.alphasCumprod.map(Double.init), expectedAlphas, sigmaTolerance(config), "\(label): alphas_cumprod")

            let original = try backend.upload(file.tensor("original")), noise = try backend.upload(file.tensor("noise"))
            let timesteps = try file.tensor("timesteps").integers()!
            let noisy = try ddpm.addNoise(original: original, noise: noise, timesteps: timesteps)
            assertClose(try backend.downloadFloats(noisy), try file.tensor("out.noisy").floats(), .f32, "\(label): add_noise")
            let velocity = try ddpm.velocity(sample: original, noise: noise, timesteps: timesteps)
            assertClose(try backend.downloadFloats(velocity), try file.tensor("out.velocity").floats(), .f32, "\(label): get_velocity")

            let target = try ddpm.trainingTarget(sample: original, noise: noise, timesteps: timesteps)
            let expectedTarget = [PredictionType.epsilon: "noise", .vPrediction: "out.velocity", .sample: "original"][ddpm.predictionType]!
            assertClose(try backend.downloadFloats(target), try file.tensor(expectedTarget).floats(), .f32, "\(label): training target")

            XCTAssertThrowsError(try ddpm.addNoise(original: original, noise: noise, timesteps: [0]), "\(label): one timestep per sample")
            XCTAssertThrowsError(try ddpm.addNoise(original: original, noise: noise, timesteps: Array(repeating: ddpm.trainTimesteps, count: timesteps.count)))
        }
    }

    // MARK: - Choosing a scheduler

    func config(_ values: [String: JSONValue], path: String = "folder/scheduler/scheduler_config.json") -> ConfigFile {
        ConfigFile(path: path, values: values)
    }

    let sd15: [String: JSONValue] = [
        "_class_name": .string("PNDMScheduler"), "beta_end": .number(0.012), "beta_schedule": .string("scaled_linear"),
        "beta_start": .number(0.00085), "num_train_timesteps": .number(1000), "set_alpha_to_one": .bool(false),
        "skip_prk_steps": .bool(true), "steps_offset": .number(1), "trained_betas": .null, "clip_sample": .bool(false),
    ]

    func testNamesPickTheDiffusersClasses() throws {
        let expected: [SchedulerName: String] = [
            .ddim: "DDIMScheduler", .euler: "EulerDiscreteScheduler", .eulerAncestral: "EulerAncestralDiscreteScheduler",
            .dpmpp2M: "DPMSolverMultistepScheduler", .dpmpp2MKarras: "DPMSolverMultistepScheduler", .pndm: "PNDMScheduler",
        ]
        XCTAssertEqual(Set(SchedulerName.allCases.map(\.rawValue)), ["ddim", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "pndm"])
        for (name, className) in expected {
            XCTAssertEqual(try makeScheduler(name: name.rawValue, config: config(sd15)).className, className, name.rawValue)
        }
        XCTAssertEqual(try makeScheduler(name: nil, config: config(sd15)).className, "PNDMScheduler")

        XCTAssertThrowsError(try makeScheduler(name: "lms", config: config(sd15))) { error in
            guard case PEAError.usage(let message) = error else { return XCTFail("\(error)") }
            XCTAssert(message.contains("lms") && message.contains("dpmpp-2m-karras"), message)
        }
        // A folder whose own class we cannot sample with: the error names the file and the key, and a name still works.
        var ddpmFolder = sd15
        ddpmFolder["_class_name"] = .string("DDPMScheduler")
        assertInvalidConfig(try makeScheduler(name: nil, config: config(ddpmFolder)), key: "_class_name")
        XCTAssertEqual(try makeScheduler(name: "euler", config: config(ddpmFolder)).className, "EulerDiscreteScheduler")
        assertInvalidConfig(try makeScheduler(name: nil, config: config(["beta_schedule": .string("linear")])), key: "_class_name")
    }

    func testKarrasNamesSetWhatTheySay() throws {
        // dpmpp-2m-karras on a folder without Karras sigmas turns them on; dpmpp-2m on a Karras DPM folder turns them off.
        var plain = try XCTUnwrap(makeScheduler(name: "dpmpp-2m", config: config(sd15)) as? DPMSolverMultistepScheduler)
        var karras = try XCTUnwrap(makeScheduler(name: "dpmpp-2m-karras", config: config(sd15)) as? DPMSolverMultistepScheduler)
        XCTAssertFalse(plain.usesKarrasSigmas)
        XCTAssertTrue(karras.usesKarrasSigmas)
        try plain.setTimesteps(10)
        try karras.setTimesteps(10)
        XCTAssertNotEqual(plain.timesteps, karras.timesteps)

        var dpmFolder = sd15
        dpmFolder["_class_name"] = .string("DPMSolverMultistepScheduler")
        dpmFolder["use_karras_sigmas"] = .bool(true)
        dpmFolder["solver_order"] = .number(3)
        let own = try XCTUnwrap(makeScheduler(name: nil, config: config(dpmFolder)) as? DPMSolverMultistepScheduler)
        XCTAssertTrue(own.usesKarrasSigmas)
        XCTAssertEqual(own.solverOrder, 3)
        let named = try XCTUnwrap(makeScheduler(name: "dpmpp-2m", config: config(dpmFolder)) as? DPMSolverMultistepScheduler)
        XCTAssertFalse(named.usesKarrasSigmas)
        XCTAssertEqual(named.solverOrder, 2)
    }

    func testFromConfigReadsOnlyTheKeysTheTargetKnows() throws {
        // SD1.5's PNDM folder has no timestep_spacing: PNDM's default is "leading", Euler's "linspace"; both
        // know steps_offset. (The values these give are checked against diffusers in the fixture tests.)
        let pndm = try XCTUnwrap(makeScheduler(name: nil, config: config(sd15)) as? PNDMScheduler)
        let euler = try XCTUnwrap(makeScheduler(name: "euler", config: config(sd15)) as? EulerDiscreteScheduler)
        XCTAssertEqual(pndm.spacing, .leading)
        XCTAssertEqual(euler.spacing, .linspace)
        XCTAssertEqual(pndm.stepsOffset, 1)
        XCTAssertEqual(euler.stepsOffset, 1)
        XCTAssertTrue(pndm.skipsRungeKutta)

        // Keys the target does not know are ignored, even with values it would refuse: PNDM has no
        // `thresholding`, `clip_sample` or `rescale_betas_zero_snr`, DDIM has all three.
        var odd = sd15
        odd["thresholding"] = .bool(true)
        odd["rescale_betas_zero_snr"] = .bool(true)
        odd["some_future_key"] = .string("whatever")
        XCTAssertNoThrow(try makeScheduler(name: nil, config: config(odd)))
        assertInvalidConfig(try makeScheduler(name: "ddim", config: config(odd)), key: "thresholding")

        // Missing keys take the target's defaults: DDIM clips x̂₀ and sets ᾱ_final = 1 unless told otherwise.
        let bare = try XCTUnwrap(makeScheduler(name: "ddim", config: config(["_class_name": .string("EulerDiscreteScheduler")])) as? DDIMScheduler)
        XCTAssertEqual(bare.clipRange, 1)
        XCTAssertEqual(bare.finalAlphaCumprod, 1)
        XCTAssertEqual(bare.spacing, .leading)
        let sd15DDIM = try XCTUnwrap(makeScheduler(name: "ddim", config: config(sd15)) as? DDIMScheduler)
        XCTAssertNil(sd15DDIM.clipRange)
        XCTAssertEqual(sd15DDIM.finalAlphaCumprod, sd15DDIM.schedule.alphasCumprod[0])
    }

    // MARK: - Unsupported values

    func assertInvalidConfig(_ expression: @autoclosure () throws -> Any, key: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try expression(), file: file, line: line) { error in
            guard case PEAError.invalidConfig(let path, let reason) = error else {
                return XCTFail("expected invalidConfig naming '\(key)', got \(error)", file: file, line: line)
            }
            XCTAssertEqual(path, "folder/scheduler/scheduler_config.json", file: file, line: line)
            XCTAssert(reason.contains("'\(key)'"), "\(reason) does not name '\(key)'", file: file, line: line)
        }
    }

    func testUnsupportedValuesAreRefusedNamingTheKey() throws {
        let cases: [(scheduler: String, key: String, value: JSONValue)] = [
            ("ddim", "beta_schedule", .string("sigmoid")),
            ("euler", "beta_schedule", .string("laplace")),
            ("ddim", "timestep_spacing", .string("karras")),
            ("pndm", "timestep_spacing", .string("uniform")),
            ("ddim", "prediction_type", .string("flow_prediction")),
            ("euler-a", "prediction_type", .string("sample")),
            ("pndm", "prediction_type", .string("sample")),
            ("ddim", "thresholding", .bool(true)),
            ("dpmpp-2m", "thresholding", .bool(true)),
            ("euler", "interpolation_type", .string("log_linear")),
            ("euler", "use_exponential_sigmas", .bool(true)),
            ("euler", "use_beta_sigmas", .bool(true)),
            ("euler", "timestep_type", .string("continuous")),
            ("euler", "final_sigmas_type", .string("denoise_to_zero")),
            ("dpmpp-2m", "final_sigmas_type", .string("sigma_max")),
            ("dpmpp-2m", "solver_type", .string("bogacki")),
            ("dpmpp-2m", "use_lu_lambdas", .bool(true)),
            ("dpmpp-2m", "use_flow_sigmas", .bool(true)),
            ("dpmpp-2m", "variance_type", .string("learned_range")),
            ("ddim", "num_train_timesteps", .number(1)),
            ("ddim", "trained_betas", .array([.number(0.1), .number(0.2)])),
            ("ddim", "clip_sample", .string("yes")),
            ("euler", "steps_offset", .number(0.5)),
        ]
        for c in cases {
            var values = sd15
            values[c.key] = c.value
            assertInvalidConfig(try makeScheduler(name: c.scheduler, config: config(values)), key: c.key)
        }
        // The DPM-Solver variants other than dpmsolver++, in a DPM folder's own config.
        for algorithm in ["dpmsolver", "sde-dpmsolver++"] {
            var values = sd15
            values["_class_name"] = .string("DPMSolverMultistepScheduler")
            values["algorithm_type"] = .string(algorithm)
            assertInvalidConfig(try makeScheduler(name: nil, config: config(values)), key: "algorithm_type")
            values["algorithm_type"] = .string("dpmsolver++")
            values["solver_order"] = .number(4)
            assertInvalidConfig(try makeScheduler(name: nil, config: config(values)), key: "solver_order")
        }
        // diffusers maps DEIS's and UniPC's values to DPM-Solver++ midpoint.
        var deis = sd15
        deis["_class_name"] = .string("DPMSolverMultistepScheduler")
        deis["algorithm_type"] = .string("deis")
        deis["solver_type"] = .string("logrho")
        XCTAssertNoThrow(try makeScheduler(name: nil, config: config(deis)))
    }

    func testStepArgumentsAreChecked() throws {
        var scheduler = try makeScheduler(name: nil, config: config(sd15))
        let sample = try backend.upload([Float](repeating: 0.5, count: 8), shape: [1, 2, 2, 2])
        XCTAssertThrowsError(try scheduler.step(modelOutput: sample, stepIndex: 0, sample: sample), "before setTimesteps")
        XCTAssertThrowsError(try scheduler.setTimesteps(0))
        XCTAssertThrowsError(try scheduler.setTimesteps(1001))
        try scheduler.setTimesteps(5)
        XCTAssertThrowsError(try scheduler.step(modelOutput: sample, stepIndex: 6, sample: sample))
        XCTAssertThrowsError(try scheduler.modelTimestep(stepIndex: -1))

        // Euler ancestral needs its noise; without a source the step says so.
        var ancestral = try makeScheduler(name: "euler-a", config: config(sd15))
        try ancestral.setTimesteps(5)
        XCTAssertThrowsError(try ancestral.step(modelOutput: sample, stepIndex: 0, sample: sample)) { error in
            XCTAssert("\(error)".contains("noise"), "\(error)")
        }
    }
}
