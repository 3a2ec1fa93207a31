import PEADiffusion

/// `pea selftest`'s options, declared once for its parser and its help.
enum SelftestOptions {
    static let backend = CommandOption.value(
        "--backend", "cpu|cuda", default: "cpu", .choices(["cpu", "cuda", "auto"]),   // auto: the CPU, as before
        help: "cpu: the CPU GEMM kernels against the triple loop, fused attention against its composition; cuda: every op "
            + "of the CUDA backend against the CPU backend on the same random inputs, in f32, f16 and bf16 (or only the "
            + "--precision given), then a UNet evaluation with random weights and a check that repeated evaluations make "
            + "no new device allocations")
    static let precision = CommandOption.value(
        "--precision", BackendOptions.precisionNames.joined(separator: "|"), .choices(BackendOptions.precisionNames),
        help: "(cuda) only this precision (default: all three)")
    static let quick = CommandOption.flag(
        "--quick", help: "(cuda) the same checks at small shapes: for the emulated library (PEA_CUDA_LIB=libpea_cuda_emu.so)")
    static let threads = CommandOption.value(
        "--threads", "T", .range(0...1024), help: "CPU threads of the reference backend (default: every online CPU)")

    static let spec = CommandSpec(
        name: "selftest",
        usage: ["pea selftest [--backend cpu|cuda] [--threads T] [--quick] [--precision fp32|fp16|bf16]"],
        description: """
            Checks a backend's fast paths against plain references at SD-sized shapes and prints one line per check.
            Exits non-zero if any check fails.
            """,
        groups: [.init("Options", [backend, precision, quick, threads])])
}

func runSelftest(_ arguments: [String]) throws {
    typealias O = SelftestOptions
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    let options = try O.spec.parse(arguments)
    let backendName = try options.string(O.backend)
    let backend = CPUBackend(threads: try options.optionalInt(O.threads) ?? 0)
    let precision = try options.optionalString(O.precision).flatMap(BackendSelection.Precision.init(rawValue:))
    switch backendName {
    case "cpu", "auto":
        if let precision, precision != .fp32 {
            throw PEAError.usage("selftest: the cpu backend computes in fp32 only; --precision \(precision.rawValue) needs --backend cuda")
        }
        let checks = try SelfTest.run(on: backend)
        var failed = 0
        for check in checks {
            if !check.passed { failed += 1 }
            print("\(check.passed ? "ok  " : "FAIL") \(check.name)  rel_l2=\(check.relativeL2)  max_abs=\(check.maxAbsolute)")
        }
        print("\(checks.count - failed) passed, \(failed) failed")
        if failed > 0 { throw PEAError.backend("selftest: \(failed) check(s) failed") }
    case "cuda":
        let dtypes = precision.map { [$0.dtype] } ?? BackendSelection.Precision.allCases.map(\.dtype)
        let cuda: CUDABackend
        do { cuda = try CUDABackend() } catch {
            throw PEAError.backend("selftest: --backend cuda: \(BackendSelection.withoutCUDAPrefix("\(error)"))")
        }
        print("cuda: \(cuda)")
        if !cuda.library.isComplete {
            print("cuda: the library lacks \(cuda.library.missingSymbols.joined(separator: ", ")): those ops fail below")
        }
        var failed = 0
        let checks = CUDASelfTest.run(cuda: cuda, reference: backend, scale: options.has(O.quick) ? .small : .sd,
                                      dtypes: dtypes) { check in
            if !check.passed { failed += 1 }
            if let error = check.error {
                print("FAIL \(check.name)  error: \(error)")
            } else if let note = check.note {
                print("\(check.passed ? "ok  " : "FAIL") \(check.name)  (\(note))")
            } else {
                print("\(check.passed ? "ok  " : "FAIL") \(check.name)  rel_l2=\(check.relativeL2)  max_abs=\(check.maxAbsolute)  (tolerance \(check.tolerance))")
            }
        }
        print("\(checks.count - failed) passed, \(failed) failed")
        if failed > 0 { throw PEAError.backend("selftest: \(failed) check(s) failed") }
    default:
        preconditionFailure("--backend's choices are cpu, cuda and auto")
    }
}
