#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea bench allreduce`'s options.
enum BenchAllReduceOptions {
    /// The official adapter's parameter count (1024→2048→2048→768 with its layer norm): what `pea train` under a
    /// launcher all-reduces every step (plus 5 floats: the losses and the stop flag).
    static let officialAdapterParameters = 7_866_368
    static let count = CommandOption.value(
        "--count", "N", default: String(officialAdapterParameters), .range(1...1 << 31),
        help: "f32 values in the buffer", defaultNote: ", the official SD1.5 adapter's gradients")
    static let repeats = CommandOption.value("--repeats", "R", default: "10", .range(1...100_000), help: "timed all-reduces after one warm-up")
    static let json = CommandOption.flag("--json", help: "print one JSON object instead of the text line")
    static let spec = CommandSpec(
        name: "bench allreduce",
        usage: ["mpirun -np N pea bench allreduce [--count N] [--repeats R] [--json]"],
        description: """
            Times the in-place f32 sum all-reduce that `pea train` runs every step under mpirun or srun (one fused
            buffer of the adapter's gradients, through libpea_mpi.so: `make mpi`), on every rank, a barrier before
            each. Rank 0 prints its best and median time per all-reduce (an all-reduce ends on no rank before every
            rank's part has arrived) and the bus bandwidth, 2·(N−1)/N × bytes / time (what a ring all-reduce moves
            per rank). Run alone it measures nothing but says so.
            """,
        groups: [.init("Options", [count, repeats, json])])
}

func runBenchAllReduce(_ arguments: [String]) throws {
    typealias O = BenchAllReduceOptions
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    let options = try O.spec.parse(arguments)
    let count = try options.int(O.count), repeats = try options.int(O.repeats)
    let group = try ProcessGroup.join()
    guard group.size > 1 else {
        throw PEAError.usage("bench allreduce: not under a launcher of several processes; run it as mpirun -np 2 pea bench allreduce")
    }
    var buffer = (0..<count).map { Float(($0 &* 7919) % 1000) / 1000 }
    var times: [Double] = []
    for index in 0...repeats {
        try group.barrier()
        let start = monotonicSeconds()
        try group.allReduceSum(&buffer)
        if index > 0 { times.append(monotonicSeconds() - start) }   // the first: warm-up (connections, pages)
    }
    times.sort()
    let best = times[0], median = times[times.count / 2]
    let bytes = Double(count * MemoryLayout<Float>.size)
    let busGBs = 2 * Double(group.size - 1) / Double(group.size) * bytes / median / 1e9
    if group.isRoot {
        if options.has(O.json) {
            print(JSONValue.object([
                "ranks": .number(Double(group.size)), "count": .number(Double(count)), "repeats": .number(Double(repeats)),
                "best_ms": .number(rounded(best * 1e3, 3)), "median_ms": .number(rounded(median * 1e3, 3)),
                "bus_gb_per_s": .number(rounded(busGBs, 3))]).serialized())
        } else {
            print("allreduce \(count) f32 (\(printfFormatted("%.1f", bytes / 1e6)) MB) over \(group.size) ranks: best "
                  + "\(printfFormatted("%.2f", best * 1e3)) ms  median \(printfFormatted("%.2f", median * 1e3)) ms  "
                  + "bus \(printfFormatted("%.2f", busGBs)) GB/s  (\(repeats) runs)")
        }
    }
    try group.finish()
}
