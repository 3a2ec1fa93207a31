#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels
import PEADiffusion

let benchUsage = """
Usage: pea bench <subcommand> [options]

Subcommands:
  gemm   time the CPU GEMM (ck_sgemm) on random data (see 'pea bench gemm --help')
  unet   time full UNet evaluations of a config's architecture with random weights (see 'pea bench unet --help')
  kernels  time single ops (norms, attention, conv, GEMM, elementwise) at SD1.5 shapes (see 'pea bench kernels --help')
  train-step  time one PEA distillation step (teacher, student, losses, backward, AdamW) at a config's size
           (see 'pea bench train-step --help')
  allreduce  under mpirun/srun: time the all-reduce of the adapter's gradients (see 'pea bench allreduce --help')
"""

/// `pea bench gemm`'s options, declared once for its parser and its help.
enum BenchGEMMOptions {
    static let limit = 1 << 20
    static let m = CommandOption.value("--m", "M", .range(1...limit), help: "the product: C[M,N] = op(A)[M,K] · op(B)[K,N]",
                                       label: "--m M --n N --k K")
    static let n = CommandOption.value("--n", "N", .range(1...limit), help: nil)   // in --m's row
    static let k = CommandOption.value("--k", "K", .range(1...limit), help: nil)
    static let transA = CommandOption.flag("--transa", help: "A is stored K×M / B is stored N×K", label: "--transa, --transb")
    static let transB = CommandOption.flag("--transb", help: nil)
    static let threads = CommandOption.value("--threads", "T", .range(0...1024), help: "threads (default: every online CPU)")
    static let repeats = CommandOption.value(
        "--repeats", "R", .range(1...100_000), help: "timed runs after one warm-up (default: enough for ~1 s, at least 3)")
    static let kernel = CommandOption.value(
        "--kernel", "avx512|avx2|portable", .choices(["avx512", "avx2", "portable"]),
        help: "force a kernel (default: the best the CPU supports)")
    static let json = CommandOption.flag("--json", help: "print one JSON object instead of the text line")

    static let spec = CommandSpec(
        name: "bench gemm",
        usage: ["pea bench gemm --m M --n N --k K [--transa] [--transb] [--threads T] [--repeats R] [--kernel K] [--json]"],
        description: "Times the CPU GEMM (ck_sgemm) on random data.",
        groups: [.init("Options", [m, n, k, transA, transB, threads, repeats, kernel, json])])
}

func runBench(_ arguments: [String]) throws {
    try Subcommands(command: "bench", usage: benchUsage, table: [
        "gemm": { rest in
            if CommandSpec.asksForHelp(rest) { print(BenchGEMMOptions.spec.help); return }
            try runGEMMBench(rest)
        },
        "unet": runBenchUNet, "kernels": runBenchKernels, "train-step": runBenchTrainStep, "allreduce": runBenchAllReduce,
    ]).run(arguments)
}

/// Fills `count` floats with uniform values in [-1, 1) from a 64-bit LCG (deterministic, no Foundation).
private func fillRandom(_ p: UnsafeMutablePointer<Float>, count: Int, seed: UInt64) {
    var state = seed
    for i in 0..<count {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        p[i] = Float(state >> 40) / Float(1 << 24) * 2 - 1
    }
}

private func runGEMMBench(_ arguments: [String]) throws {
    typealias O = BenchGEMMOptions
    let options = try O.spec.parse(arguments)
    guard options.has(O.m), options.has(O.n), options.has(O.k) else {
        throw PEAError.usage("bench gemm: --m, --n and --k are required (see 'pea bench gemm --help')")
    }
    let m = try options.int(O.m), n = try options.int(O.n), k = try options.int(O.k)
    let threads = try options.optionalInt(O.threads) ?? 0
    let fixedRepeats = try options.optionalInt(O.repeats)
    let transA = options.has(O.transA), transB = options.has(O.transB)
    if let kernel = try options.optionalString(O.kernel) {
        guard ck_gemm_set_kernel(kernel) == CK_OK else {
            throw PEAError.unsupported("bench gemm: kernel '\(kernel)' is not supported by this CPU")
        }
    }
    ck_set_num_threads(Int32(threads))

    // Operands as stored: A is M×K (K×M when transposed), B is K×N (N×K), C is M×N; all 64-byte aligned.
    let lda = transA ? m : k, ldb = transB ? k : n
    func allocate(_ count: Int) -> UnsafeMutablePointer<Float> {
        UnsafeMutableRawPointer.allocate(byteCount: count * MemoryLayout<Float>.stride, alignment: 64)
            .bindMemory(to: Float.self, capacity: count)
    }
    let a = allocate(m * k), b = allocate(k * n), c = allocate(m * n)
    defer {
        a.deallocate()
        b.deallocate()
        c.deallocate()
    }
    fillRandom(a, count: m * k, seed: 1)
    fillRandom(b, count: k * n, seed: 2)
    fillRandom(c, count: m * n, seed: 3)

    func once() -> Double {
        let start = monotonicSeconds()
        ck_sgemm(transA ? 1 : 0, transB ? 1 : 0, Int64(m), Int64(n), Int64(k), 1, a, Int64(lda), b, Int64(ldb),
                 0, c, Int64(n))
        return monotonicSeconds() - start
    }
    _ = once()  // warm-up: thread pool start, packing buffers, page faults
    var times: [Double] = []
    let started = monotonicSeconds()
    if let fixedRepeats {
        for _ in 0..<fixedRepeats { times.append(once()) }
    } else {
        while times.count < 3 || (monotonicSeconds() - started < 1.0 && times.count < 100_000) { times.append(once()) }
    }
    times.sort()
    let best = times[0]
    let median = times.count % 2 == 1 ? times[times.count / 2] : (times[times.count / 2 - 1] + times[times.count / 2]) / 2
    let gflops = 2 * Double(m) * Double(n) * Double(k) / best / 1e9
    let kernel = String(cString: ck_gemm_kernel())
    let usedThreads = Int(ck_get_num_threads())

    func fixed(_ x: Double, _ digits: Int) -> String { printfFormatted("%.\(digits)f", x) }
    if options.has(O.json) {
        let object: [String: JSONValue] = [
            "m": .number(Double(m)), "n": .number(Double(n)), "k": .number(Double(k)), "transa": .bool(transA),
            "transb": .bool(transB), "threads": .number(Double(usedThreads)), "kernel": .string(kernel),
            "repeats": .number(Double(times.count)), "best_ms": .number(rounded(best * 1e3, 4)),
            "median_ms": .number(rounded(median * 1e3, 4)), "gflops": .number(rounded(gflops, 2))]
        print(JSONValue.object(object).serialized())
    } else {
        let shape = "\(m)x\(n)x\(k)" + (transA ? " transA" : "") + (transB ? " transB" : "")
        print("gemm \(shape)  kernel \(kernel)  threads \(usedThreads)  best \(fixed(best * 1e3, 3)) ms  "
            + "median \(fixed(median * 1e3, 3)) ms  \(fixed(gflops, 1)) GFLOP/s  (\(times.count) runs)")
    }
}
