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
  gemm   time the CPU GEMM (ck_sgemm) on random data
           --m M --n N --k K     the product: C[M,N] = op(A)[M,K] · op(B)[K,N]
           [--transa] [--transb] A is stored K×M / B is stored N×K
           [--threads T]         threads (default: every online CPU)
           [--repeats R]         timed runs after one warm-up (default: enough for ~1 s, at least 3)
           [--kernel avx512|avx2|portable]   force a kernel (default: the best the CPU supports)
           [--json]              print one JSON object instead of the text line
  unet   time full UNet evaluations of a config's architecture with random weights (see 'pea bench unet --help')
  kernels  time single ops (norms, attention, conv, GEMM, elementwise) at SD1.5 shapes (see 'pea bench kernels --help')
  train-step  time one PEA distillation step (teacher, student, losses, backward, AdamW) at a config's size
           (see 'pea bench train-step --help')
"""

func runBench(_ arguments: [String]) throws {
    guard let subcommand = arguments.first else {
        print(benchUsage)
        throw PEAError.usage("bench: no subcommand given (one of: gemm, unet, kernels, train-step)")
    }
    let rest = Array(arguments.dropFirst())
    switch subcommand {
    case "help", "--help", "-h":
        print(benchUsage)
    case "unet":
        try runBenchUNet(rest)
    case "kernels": try runBenchKernels(rest)
    case "train-step": try runBenchTrainStep(rest)
    case "gemm":
        if rest.contains("--help") || rest.contains("-h") {
            print(benchUsage)
            return
        }
        try runGEMMBench(rest)
    default:
        throw PEAError.usage("bench: unknown subcommand '\(subcommand)' (one of: gemm, unet, kernels, train-step)")
    }
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
    let options = try Arguments(arguments, command: "bench gemm", spec: [
        "--m": .value, "--n": .value, "--k": .value, "--threads": .value, "--repeats": .value,
        "--transa": .flag, "--transb": .flag, "--kernel": .value, "--json": .flag,
    ])
    let limit = 1 << 20
    guard options.has("--m"), options.has("--n"), options.has("--k") else {
        throw PEAError.usage("bench gemm: --m, --n and --k are required (see 'pea bench --help')")
    }
    let m = try options.int("--m", default: 1, range: 1...limit)
    let n = try options.int("--n", default: 1, range: 1...limit)
    let k = try options.int("--k", default: 1, range: 1...limit)
    let threads = try options.int("--threads", default: 0, range: 0...1024)
    let fixedRepeats = try options.int("--repeats")
    if let fixedRepeats, !(1...100_000).contains(fixedRepeats) {
        throw PEAError.usage("bench gemm: option '--repeats' must be in 1...100000, got \(fixedRepeats)")
    }
    let transA = options.has("--transa"), transB = options.has("--transb")
    if let kernel = options.string("--kernel") {
        guard ["avx512", "avx2", "portable"].contains(kernel) else {
            throw PEAError.usage("bench gemm: unknown kernel '\(kernel)' (one of: avx512, avx2, portable)")
        }
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
    if options.has("--json") {
        print("{\"m\": \(m), \"n\": \(n), \"k\": \(k), \"transa\": \(transA), \"transb\": \(transB), "
            + "\"threads\": \(usedThreads), \"kernel\": \"\(kernel)\", \"repeats\": \(times.count), "
            + "\"best_ms\": \(fixed(best * 1e3, 4)), \"median_ms\": \(fixed(median * 1e3, 4)), "
            + "\"gflops\": \(fixed(gflops, 2))}")
    } else {
        let shape = "\(m)x\(n)x\(k)" + (transA ? " transA" : "") + (transB ? " transB" : "")
        print("gemm \(shape)  kernel \(kernel)  threads \(usedThreads)  best \(fixed(best * 1e3, 3)) ms  "
            + "median \(fixed(median * 1e3, 3)) ms  \(fixed(gflops, 1)) GFLOP/s  (\(times.count) runs)")
    }
}
