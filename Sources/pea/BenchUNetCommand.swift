#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels
import PEADiffusion

let benchUNetUsage = """
Usage: pea bench unet --config FILE [--latent HxW] [--batch B] [--context-length T] [--repeats R] [--json]
                      [--profile] [--backend auto|cpu|cuda] [--precision fp32|fp16|bf16] [--threads T]

Builds the UNet a diffusers config.json describes, with random weights (speed does not depend on the values),
and times full evaluations on random inputs: one warm-up, then R timed runs (default 3). Prints the best and
median time and the process's peak resident memory (weights included); --json prints one JSON object with
the keys config, latent_h, latent_w, batch, threads, precision, best_ms, median_ms, peak_rss_mb, parameters
(and peak_device_mb on the CUDA backend). Weights and inputs are stored in the --precision dtype.
--profile (CUDA backend) runs one more evaluation with each op call bracketed by GPU events and prints the
GPU time per op (calls, total, share, mean) and the GPU's idle time waiting for the host; with --json, the
keys profile (a list of {op, calls, ms}), profile_span_ms and profile_device_allocations.
"""

func runBenchUNet(_ arguments: [String]) throws {
    if arguments.contains("--help") || arguments.contains("-h") { print(benchUNetUsage); return }
    var spec = BackendOptions.spec
    for key in ["--config", "--latent", "--batch", "--context-length", "--repeats"] { spec[key] = .value }
    spec["--json"] = .flag
    spec["--profile"] = .flag
    let options = try Arguments(arguments, command: "bench unet", spec: spec)
    let configPath = try options.requiredString("--config")
    let latent = (options.string("--latent") ?? "64x64").split(separator: "x").compactMap { Int($0) }
    guard latent.count == 2, latent.allSatisfy({ $0 > 0 }) else {
        throw PEAError.usage("bench unet: --latent must be HxW, e.g. 64x64")
    }
    let batch = try options.int("--batch", default: 1, range: 1...1024)
    let contextLength = try options.int("--context-length", default: 77, range: 1...4096)
    let repeats = try options.int("--repeats", default: 3, range: 1...1000)
    let backendOptions = try BackendOptions(options, command: "bench unet")
    let backend = backendOptions.backend, dtype = backendOptions.precision
    let profiler = options.has("--profile") ? try profilingBackend(backend, command: "bench unet") : nil

    let config = try UNetConfig(ConfigFile(path: configPath))
    let weights = RandomWeights(backend: backend, seed: 1, dtype: dtype)
    let unet = try UNet2DConditionModel(config: config, weights: Weights(weights))
    var random = SplitMix64(seed: 7)
    func randomTensor(_ shape: [Int]) throws -> Tensor {
        let x = try backend.upload(random.normals(shape.reduce(1, *)), shape: shape)
        return dtype == .f32 ? x : try backend.cast(x, to: dtype)
    }
    var inputs = UNetInputs(
        sample: try randomTensor([batch, config.inChannels, latent[0], latent[1]]),
        timestep: try backend.upload(HostTensor(ids: Array(repeating: 500, count: batch), shape: [batch])),
        encoderHiddenStates: try randomTensor([batch, contextLength, config.crossAttentionDim[0]]))
    if let textTime = config.textTime {
        inputs.textEmbeds = try randomTensor([batch, textTime.projectionInputDim - 6 * textTime.timeEmbedDim])
        inputs.timeIds = try randomTensor([batch, 6])
    }
    if let dim = config.timeCondProjDim { inputs.timestepCondition = try randomTensor([batch, dim]) }

    var times: [Double] = []
    for run in 0...repeats {
        let start = monotonicSeconds()
        _ = try backend.download(unet(inputs))
        if run > 0 { times.append((monotonicSeconds() - start) * 1000) }
    }
    times.sort()
    let best = times[0], median = times[times.count / 2]
    let profile = try profiler?.profiled { _ = try backend.download(unet(inputs)) }.profile
    let peak = peakResidentMegabytes()
    let threads = Int(ck_get_num_threads())
    var peakDevice: Double?
    if let cuda = backend as? CUDABackend, let stats = try? cuda.memoryStats() { peakDevice = Double(stats.peakBytes) / 1_048_576 }
    if options.has("--json") {
        var fields = ["\"config\": \"\(configPath)\"", "\"latent_h\": \(latent[0])", "\"latent_w\": \(latent[1])",
                      "\"batch\": \(batch)", "\"threads\": \(threads)", "\"precision\": \"\(dtype)\"",
                      "\"best_ms\": \(best)", "\"median_ms\": \(median)", "\"peak_rss_mb\": \(peak)"]
        if let peakDevice { fields.append("\"peak_device_mb\": \(peakDevice)") }
        fields.append("\"parameters\": \(weights.parameterCount)")
        if let profile { fields += profileJSONFields(profile) }
        print("{" + fields.joined(separator: ", ") + "}")
    } else {
        print("unet \(configPath)  latent \(latent[0])x\(latent[1])  batch \(batch)  \(backend.name) \(threads) threads  "
            + "best \(formatted(best)) ms  median \(formatted(median)) ms  peak RSS \(formatted(peak)) MB  "
            + "\(weights.parameterCount / 1_000_000)M parameters")
        if let profile { print(profileTable(profile, of: "one evaluation (\(dtype), batch \(batch), \(latent[0])x\(latent[1]))")) }
    }
}

/// The process's peak resident set size in MB (getrusage: ru_maxrss is in kilobytes on Linux).
func peakResidentMegabytes() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_maxrss) / 1024  // kilobytes on Linux
}

func formatted(_ value: Double) -> String {
    let rounded = (value * 10).rounded() / 10
    return "\(rounded)"
}
