#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `--backend auto|cpu|cuda`, `--precision fp32|fp16|bf16` and `--threads T`, shared by every command that
/// runs a model. The choice itself is the library's `BackendSelection`; here are its flags and their wording.
enum BackendOptions {
    static let backend = CommandOption.value(
        "--backend", BackendSelection.Choice.allCases.map(\.rawValue).joined(separator: "|"), default: "auto",
        .choices(BackendSelection.Choice.allCases.map(\.rawValue)),
        help: "where to compute. The CUDA library (libpea_cuda.so, 'make cuda') is looked for in $PEA_CUDA_LIB, beside "
            + "the pea executable, then in .build-cuda/ and the repository root",
        defaultNote: ": CUDA when its library, a driver and a device are present, else the CPU")
    static let precision = CommandOption.value(
        "--precision", precisionNames.joined(separator: "|"), default: "fp32", .choices(precisionNames),
        help: "storage precision of the CUDA backend's tensors",
        defaultNote: "; the CPU backend computes in fp32 only")
    static let threads = CommandOption.value("--threads", "T", .range(0...4096),
                                             help: "CPU threads (default: every online CPU)")
    static let device = CommandOption.value("--device", "N", default: "0", .range(0...1023),
                                            help: "the CUDA device to use, numbered as CUDA_VISIBLE_DEVICES leaves them",
                                            defaultNote: "; under mpirun or srun, pea train and pea generate --prompts take the rank's "
                                                + "local rank modulo the visible devices")
    static let weights = CommandOption.value(
        "--weights", "f32|bf16|f16", default: "f32", .choices(["f32", "bf16", "f16"]),
        help: "how the CPU backend holds weight matrices (linear and convolution weights): bf16 or f16 halve their memory; "
            + "the GEMM widens them to f32 as it reads them, and everything is computed in f32 (the CUDA backend stores "
            + "weights in --precision)")
    static let all = [backend, precision, threads, device]
    /// For commands that only run models forward (generate, serve, eval, bench unet): `all` and --weights.
    static let inference = all + [weights]

    static let precisionNames = BackendSelection.Precision.allCases.map(\.rawValue)

    /// The backend and dtype the options select; the CUDA fallback notice goes to stderr.
    /// `defaultDevice`: the CUDA device when --device is not given (a launched rank's local rank).
    static func select(_ options: ParsedOptions, defaultDevice: Int? = nil) throws -> BackendSelection {
        let command = options.command
        let precisionName = try options.string(precision)
        if options.has(device), try options.string(backend) == BackendSelection.Choice.cpu.rawValue {
            throw PEAError.usage("\(command): --device picks a CUDA device; --backend cpu has none")
        }
        do {
            let halfWeights: DType? = switch try options.string(weights) { case "bf16": .bf16; case "f16": .f16; default: nil }
            let selection = try BackendSelection(BackendSelection.Choice(rawValue: options.string(backend))!,
                                                 precision: BackendSelection.Precision(rawValue: precisionName)!,
                                                 threads: options.optionalInt(threads) ?? 0, device: options.has(device) ? options.int(device) : defaultDevice ?? options.int(device),
                                                 halfWeights: halfWeights)
            if let notice = selection.fallbackNotice { fputs("pea: \(notice)\n", stderr) }
            return selection
        } catch let failure as BackendSelection.Failure {
            switch failure {
            case .cpuComputesInFP32:
                throw PEAError.usage("\(command): the cpu backend computes in fp32 only; --precision \(precisionName) needs --backend cuda")
            case .precisionNeedsCUDA(_, let why):
                throw PEAError.usage("\(command): --precision \(precisionName) needs the CUDA backend, which is unavailable: \(why)")
            case .halfWeightsAreCPUs:
                throw PEAError.usage("\(command): --weights \(try options.string(weights)) is for the cpu backend; the cuda backend "
                                     + "stores weights in --precision (fp16, bf16)" + (options.has(backend) ? "" : "; add --backend cpu"))
            case .cudaFailed(let why):
                throw PEAError.backend("\(command): --backend cuda: \(why)", kind: .unavailable)
            }
        }
    }
}
