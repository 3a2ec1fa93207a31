#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `--backend auto|cpu|cuda`, `--precision fp32|fp16|bf16` and `--threads T`, shared by every command that
/// runs a model.
struct BackendOptions {
    static let spec: [String: Arguments.Kind] = ["--backend": .value, "--precision": .value, "--threads": .value]
    static let help = """
      --backend auto|cpu|cuda   where to compute (default auto: CUDA when its library, a driver and a device
                                are present, else the CPU). The CUDA library (libpea_cuda.so, 'make cuda') is
                                looked for in $PEA_CUDA_LIB, beside the pea executable, then in .build-cuda/ and
                                the repository root
      --precision fp32|fp16|bf16
                                storage precision of the CUDA backend's tensors (default fp32; the CPU backend
                                computes in fp32 only)
      --threads T               CPU threads (default: every online CPU)
    """

    let backend: any ComputeBackend
    /// The dtype `--precision` asks for (f32, f16 or bf16); f16/bf16 only with the CUDA backend.
    let precision: DType

    init(_ options: Arguments, command: String) throws {
        let threads = try options.int("--threads", default: 0, range: 0...4096)
        let precisionName = options.string("--precision") ?? "fp32"
        switch precisionName {
        case "fp32": precision = .f32
        case "fp16": precision = .f16
        case "bf16": precision = .bf16
        default: throw PEAError.usage("\(command): --precision must be fp32, fp16 or bf16, got '\(precisionName)'")
        }
        switch options.string("--backend") ?? "auto" {
        case "cpu":
            guard precision == .f32 else {
                throw PEAError.usage("\(command): the cpu backend computes in fp32 only; --precision \(precisionName) needs --backend cuda")
            }
            backend = CPUBackend(threads: threads)
        case "cuda":
            do {
                backend = try CUDABackend()
            } catch {
                throw PEAError.backend("\(command): --backend cuda: \(Self.withoutPrefix("\(error)"))")
            }
        case "auto":
            switch CUDABackend.availability() {
            case .success(let cuda):
                backend = cuda
            case .failure(let why):
                guard precision == .f32 else {
                    throw PEAError.usage("\(command): --precision \(precisionName) needs the CUDA backend, which is unavailable: \(Self.withoutPrefix(why.message))")
                }
                // Say why only where CUDA could have been expected (a library was found, or PEA_CUDA_LIB is
                // set); a machine without any CUDA library uses the CPU silently.
                if why.userExpectsCUDA {
                    fputs("pea: CUDA unavailable (\(Self.withoutPrefix(why.message))); using the CPU\n", stderr)
                }
                backend = CPUBackend(threads: threads)
            }
        case let other:
            throw PEAError.usage("\(command): --backend must be auto, cpu or cuda, got '\(other)'")
        }
    }

    /// The loader's messages start with "cuda: "; inside a sentence that already says CUDA it is noise.
    static func withoutPrefix(_ message: String) -> String {
        message.hasPrefix("cuda: ") ? String(message.dropFirst(6)) : message
    }
}
