import PEADiffusion

/// `--profile` of the bench commands: one more run under the CUDA backend's per-op profile.
let profileOption = CommandOption.flag(
    "--profile", help: "(CUDA backend) one more run with each op call bracketed by GPU events: prints the GPU time per op "
        + "(calls, total, share, mean) and the GPU's idle time waiting for the host")

/// The CUDA backend to profile on, or the usage error saying why not (checked before any work).
func profilingBackend(_ backend: ComputeBackend, command: String) throws -> CUDABackend {
    guard let cuda = backend as? CUDABackend else {
        throw PEAError.usage("\(command): --profile times ops with GPU events; it needs the CUDA backend (--backend cuda), not \(backend.name)")
    }
    return cuda
}

/// The profile as a table: each op's calls, GPU time, share of the ops' time and mean per call, largest
/// first; then the span and the GPU's idle time within it.
func profileTable(_ profile: CUDAProfile, of run: String) -> String {
    let total = profile.opMilliseconds
    func pad(_ s: String, _ width: Int, left: Bool = false) -> String {
        let fill = String(repeating: " ", count: max(0, width - s.count))
        return left ? s + fill : fill + s
    }
    var lines = ["GPU time per op, \(run):",
                 "  " + pad("op", 30, left: true) + pad("calls", 8) + pad("total ms", 11) + pad("share", 8) + pad("mean µs", 10)]
    for op in profile.ops {
        let share = total > 0 ? 100 * op.milliseconds / total : 0
        lines.append("  " + pad(op.name, 30, left: true) + pad("\(op.calls)", 8)
            + pad(printfFormatted("%.3f", op.milliseconds), 11) + pad(printfFormatted("%.1f%%", share), 8)
            + pad(printfFormatted("%.1f", 1000 * op.milliseconds / Double(max(op.calls, 1))), 10))
    }
    let calls = profile.ops.reduce(0) { $0 + $1.calls }
    lines.append("  " + pad("all ops", 30, left: true) + pad("\(calls)", 8) + pad(printfFormatted("%.3f", total), 11))
    lines.append("  GPU span \(printfFormatted("%.3f", profile.spanMilliseconds)) ms from the first op's start to the "
        + "last op's end, \(printfFormatted("%.3f", profile.idleMilliseconds)) ms of it idle (waiting for the host); "
        + "\(profile.deviceAllocations) cudaMalloc calls")
    return lines.joined(separator: "\n")
}

/// The profile as JSON fields: "profile": [{"op", "calls", "ms"}, …], "profile_span_ms",
/// "profile_device_allocations".
func profileJSONFields(_ profile: CUDAProfile) -> [String: JSONValue] {
    let ops = profile.ops.map { JSONValue.object(["op": .string($0.name), "calls": .number(Double($0.calls)), "ms": .number($0.milliseconds)]) }
    return ["profile": .array(ops), "profile_span_ms": .number(profile.spanMilliseconds),
            "profile_device_allocations": .number(Double(profile.deviceAllocations))]
}
