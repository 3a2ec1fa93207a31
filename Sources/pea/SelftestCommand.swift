import PEADiffusion

let selftestUsage = """
Usage: pea selftest [--backend cpu] [--threads T]

Checks the backend's fast paths against plain references at SD-sized shapes and prints one line per check.
Exits non-zero if any check fails. (--backend cuda arrives with the CUDA backend.)
"""

func runSelftest(_ arguments: [String]) throws {
    if arguments.contains("--help") || arguments.contains("-h") {
        print(selftestUsage)
        return
    }
    let options = try Arguments(arguments, command: "selftest", spec: ["--backend": .value, "--threads": .value])
    let backendName = options.string("--backend") ?? "cpu"
    guard backendName == "cpu" || backendName == "auto" else {
        throw PEAError.usage("selftest: backend '\(backendName)' is not available in this build (only 'cpu')")
    }
    let backend = CPUBackend(threads: try options.int("--threads", default: 0, range: 0...1024))
    let checks = try SelfTest.run(on: backend)
    var failed = 0
    for check in checks {
        if !check.passed { failed += 1 }
        print("\(check.passed ? "ok  " : "FAIL") \(check.name)  rel_l2=\(check.relativeL2)  max_abs=\(check.maxAbsolute)")
    }
    print("\(checks.count - failed) passed, \(failed) failed")
    if failed > 0 { throw PEAError.backend("selftest: \(failed) check(s) failed") }
}
