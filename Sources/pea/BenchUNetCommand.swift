#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels
import PEADiffusion

/// The options `pea bench unet` and `pea bench train-step` share: the UNet config, the input sizes, the runs.
enum BenchModelOptions {
    static let config = CommandOption.value("--config", "FILE", help: "a diffusers UNet config.json")
    static let latent = CommandOption.value("--latent", "HxW", default: "64x64", help: "latent height×width")
    static let batch = CommandOption.value("--batch", "B", default: "1", .range(1...1024), help: "samples per evaluation")
    static let contextLength = CommandOption.value(
        "--context-length", "T", default: "77", .range(1...4096), help: "tokens of the cross-attention states")
    static let repeats = CommandOption.value("--repeats", "R", default: "3", .range(1...1000), help: "timed runs after one warm-up")
    static let json = CommandOption.flag("--json", help: "print one JSON object (the keys above) instead of the text line")

}

/// What `bench unet` and `bench train-step` read alike, all before any work.
struct BenchModelSettings {
    let configPath: String
    let latent: (height: Int, width: Int)
    let batch, contextLength, repeats: Int
    let backend: any ComputeBackend
    let dtype: DType
    /// The backend again, with --profile.
    let profiler: CUDABackend?

    init(_ options: ParsedOptions) throws {
        typealias B = BenchModelOptions
        configPath = try options.string(B.config)
        let sizes = try options.string(B.latent).split(separator: "x").compactMap { Int($0) }
        guard sizes.count == 2, sizes.allSatisfy({ $0 > 0 }) else {
            throw PEAError.usage("\(options.command): --latent must be HxW, e.g. 64x64")
        }
        latent = (sizes[0], sizes[1])
        batch = try options.int(B.batch)
        contextLength = try options.int(B.contextLength)
        repeats = try options.int(B.repeats)
        let selection = try BackendOptions.select(options)
        backend = selection.backend
        dtype = selection.dtype
        profiler = options.has(profileOption) ? try profilingBackend(backend, command: options.command) : nil
    }
}

enum BenchUNetOptions {
    typealias B = BenchModelOptions
    static let cudaGraphs = CommandOption.value(
        "--cuda-graphs", "on|off", default: "off", .choices(["on", "off"]),
        help: "CUDA backend: time replays of the evaluation captured as a CUDA graph (the warm-up captures it), as pea "
            + "generate runs each denoising step; --profile then shows one graph_replay call")
    static let spec = CommandSpec(
        name: "bench unet",
        usage: ["pea bench unet --config FILE [--latent HxW] [--batch B] [--context-length T] [--repeats R] [--json]",
                "               [--profile] [--cuda-graphs on|off] [--backend auto|cpu|cuda] [--precision fp32|fp16|bf16] [--threads T]"],
        description: """
            Builds the UNet a diffusers config.json describes, with random weights (speed does not depend on the values),
            and times full evaluations on random inputs: one warm-up, then R timed runs (default 3). Prints the best and
            median time and the process's peak resident memory (weights included); --json prints one JSON object with
            the keys config, latent_h, latent_w, batch, threads, precision, weights, best_ms, median_ms, peak_rss_mb,
            page_faults_per_run (a timed evaluation's page faults: memory given back to the kernel and taken again),
            parameters (and peak_device_mb on the CUDA backend). Weights and inputs are stored in the --precision dtype;
            on the CPU, --weights bf16|f16 holds the weight matrices at half size.
            --profile (CUDA backend) runs one more evaluation with each op call bracketed by GPU events and prints the
            GPU time per op (calls, total, share, mean) and the GPU's idle time waiting for the host; with --json, the
            keys profile (a list of {op, calls, ms}), profile_span_ms and profile_device_allocations.
            """,
        groups: [.init("Options", [B.config, B.latent, B.batch, B.contextLength, B.repeats, B.json, profileOption, cudaGraphs]
                                  + BackendOptions.inference)])
}

func runBenchUNet(_ arguments: [String]) throws {
    typealias B = BenchModelOptions
    if CommandSpec.asksForHelp(arguments) { print(BenchUNetOptions.spec.help); return }
    let options = try BenchUNetOptions.spec.parse(arguments)
    let settings = try BenchModelSettings(options)
    let configPath = settings.configPath, latent = settings.latent, batch = settings.batch, repeats = settings.repeats
    let backend = settings.backend, dtype = settings.dtype

    let config = try UNetConfig(ConfigFile(path: configPath))
    let weights = RandomWeights(backend: backend, seed: 1, dtype: dtype)
    let unet = try UNet2DConditionModel(config: config, weights: Weights(weights))
    var random = SplitMix64(seed: 7)
    func randomTensor(_ shape: [Int]) throws -> Tensor {
        let x = try backend.upload(random.normals(shape.reduce(1, *)), shape: shape)
        return dtype == .f32 ? x : try backend.cast(x, to: dtype)
    }
    var inputs = DenoisingInputs(
        sample: try randomTensor([batch, config.inChannels, latent.height, latent.width]),
        timestep: try backend.upload(HostTensor(ids: Array(repeating: 500, count: batch), shape: [batch])),
        encoderHiddenStates: try randomTensor([batch, settings.contextLength, config.crossAttentionDim[0]]))
    if let pooled = config.pooledTextDim {
        inputs.textEmbeds = try randomTensor([batch, pooled])
        inputs.timeIds = try randomTensor([batch, 6])
    }
    if let dim = config.timeCondProjDim { inputs.timestepCondition = try randomTensor([batch, dim]) }
    let model: any DenoisingModel
    if try options.string(BenchUNetOptions.cudaGraphs) == "on" {
        guard let cuda = backend as? CUDABackend else {
            throw PEAError.usage("\(options.command): --cuda-graphs on needs the CUDA backend")
        }
        model = CUDAGraphedDenoiser(unet, backend: cuda)
    } else {
        model = unet
    }

    var times: [Double] = [], faults = 0
    for run in 0...repeats {
        let start = monotonicSeconds(), faultsBefore = pageFaults()
        _ = try backend.download(model(inputs))
        if run > 0 { times.append((monotonicSeconds() - start) * 1000); faults += pageFaults() - faultsBefore }
    }
    times.sort()
    let best = times[0], median = times[times.count / 2], faultsPerRun = faults / repeats
    let profile = try settings.profiler?.profiled { _ = try backend.download(model(inputs)) }.profile
    let peak = peakResidentMegabytes()
    let threads = Int(ck_get_num_threads())
    var peakDevice: Double?
    if let cuda = backend as? CUDABackend, let stats = try? cuda.memoryStats() { peakDevice = Double(stats.peakBytes) / 1_048_576 }
    if options.has(B.json) {
        var fields: [String: JSONValue] = [
            "config": .string(configPath), "latent_h": .number(Double(latent.height)), "latent_w": .number(Double(latent.width)),
            "batch": .number(Double(batch)), "threads": .number(Double(threads)), "precision": .string("\(dtype)"),
            "weights": .string("\(backend.halfWeights ?? dtype)"), "best_ms": .number(best), "median_ms": .number(median), "peak_rss_mb": .number(peak),
            "page_faults_per_run": .number(Double(faultsPerRun)), "parameters": .number(Double(weights.parameterCount))]
        if let peakDevice { fields["peak_device_mb"] = .number(peakDevice) }
        if let profile { fields.merge(profileJSONFields(profile)) { $1 } }
        print(JSONValue.object(fields).serialized())
    } else {
        print("unet \(configPath)  latent \(latent.height)x\(latent.width)  batch \(batch)  \(backend.name) \(threads) threads  "
            + "best \(formatted(best)) ms  median \(formatted(median)) ms  peak RSS \(formatted(peak)) MB  "
            + "\(faultsPerRun) page faults per evaluation  "
            + "\(weights.parameterCount / 1_000_000)M parameters" + (backend.halfWeights.map { ", \($0) weight matrices" } ?? ""))
        if let profile { print(profileTable(profile, of: "one evaluation (\(dtype), batch \(batch), \(latent.height)x\(latent.width))")) }
    }
}

/// The page faults the process has taken so far (getrusage: minor + major). A timed run's count is the
/// memory the allocator handed back to the kernel and took again: each fault zeroes a fresh 4 KiB page.
func pageFaults() -> Int {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return usage.ru_minflt + usage.ru_majflt
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
