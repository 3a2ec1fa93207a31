#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

let usage = """
pea — text-to-image diffusion with Stable Diffusion models and the PEA multilingual adapter

Usage:
  pea bench gemm --m M --n N --k K [--threads T] [--repeats R] [--kernel avx512|avx2|portable]
                                  time our CPU GEMM and print GFLOP/s
  pea selftest                    run a quick check of every CPU op against its plain reference
  pea help | --help               this text

Commands not listed here (generate, eval, train) are not built yet; see the project's issues.
"""

func printError(_ message: String) {
    var stderrStream = StandardError()
    print("pea: error: \(message)", to: &stderrStream)
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) { fputs(string, stderr) }
}

func run(_ arguments: [String]) throws {
    guard let command = arguments.first else {
        print(usage)
        throw PEAError.usage("no command given")
    }
    let rest = Array(arguments.dropFirst())
    switch command {
    case "help", "--help", "-h":
        print(usage)
    case "bench":
        try runBench(rest)
    case "selftest":
        try runSelftest(rest)
    default:
        throw PEAError.usage("unknown command '\(command)' (see 'pea --help')")
    }
}

do {
    try run(Array(CommandLine.arguments.dropFirst()))
} catch let error as PEAError {
    printError(error.description)
    exit(error.isUsage ? 2 : 1)
} catch {
    printError("\(error)")
    exit(1)
}
