import PEADiffusion

let selftestUsage = """
Usage: pea selftest [--backend cpu|cuda] [--threads T] [--quick] [--precision fp32|fp16|bf16]

Checks a backend's fast paths against plain references at SD-sized shapes and prints one line per check.
Exits non-zero if any check fails.
  --backend cpu    (default) the CPU GEMM kernels against the triple loop, fused attention against its composition
  --backend cuda   every op of the CUDA backend against the CPU backend on the same random inputs, in f32, f16
                   and bf16 (or only the --precision given), then a UNet evaluation with random weights and a
                   check that repeated evaluations make no new device allocations
  --quick          (cuda) the same checks at small shapes: for the emulated library (PEA_CUDA_LIB=libpea_cuda_emu.so)
  --threads T      CPU threads of the reference backend (default: every online CPU)
"""

func runSelftest(_ arguments: [String]) throws {
    if arguments.contains("--help") || arguments.contains("-h") {
        print(selftestUsage)
        return
    }
    let options = try Arguments(arguments, command: "selftest",
                                spec: ["--backend": .value, "--threads": .value, "--quick": .flag, "--precision": .value])
    let backendName = options.string("--backend") ?? "cpu"
    let backend = CPUBackend(threads: try options.int("--threads", default: 0, range: 0...1024))
    switch backendName {
    case "cpu", "auto":
        if let precision = options.string("--precision"), precision != "fp32" {
            throw PEAError.usage("selftest: the cpu backend computes in fp32 only; --precision \(precision) needs --backend cuda")
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
        let dtypes: [DType]
        switch options.string("--precision") {
        case nil: dtypes = [.f32, .f16, .bf16]
        case "fp32": dtypes = [.f32]
        case "fp16": dtypes = [.f16]
        case "bf16": dtypes = [.bf16]
        case let other?: throw PEAError.usage("selftest: --precision must be fp32, fp16 or bf16, got '\(other)'")
        }
        let cuda: CUDABackend
        do { cuda = try CUDABackend() } catch {
            throw PEAError.backend("selftest: --backend cuda: \(BackendOptions.withoutPrefix("\(error)"))")
        }
        print("cuda: \(cuda)")
        if !cuda.library.isComplete {
            print("cuda: the library lacks \(cuda.library.missingSymbols.joined(separator: ", ")): those ops fail below")
        }
        var failed = 0
        let checks = CUDASelfTest.run(cuda: cuda, reference: backend, scale: options.has("--quick") ? .small : .sd,
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
        throw PEAError.usage("selftest: --backend must be cpu or cuda, got '\(backendName)'")
    }
}
