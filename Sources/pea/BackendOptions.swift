import PEADiffusion

/// `--backend auto|cpu|cuda`, `--precision fp32|fp16|bf16` and `--threads T`, shared by every command that
/// runs a model.
struct BackendOptions {
    static let spec: [String: Arguments.Kind] = ["--backend": .value, "--precision": .value, "--threads": .value]
    static let help = """
      --backend auto|cpu|cuda   where to compute (default auto: CUDA when available, else the CPU)
      --precision fp32|fp16|bf16
                                compute precision (default fp32; the CPU backend computes in fp32 only)
      --threads T               CPU threads (default: every online CPU)
    """

    let backend: any ComputeBackend

    init(_ options: Arguments, command: String) throws {
        let threads = try options.int("--threads", default: 0, range: 0...4096)
        let precision = options.string("--precision") ?? "fp32"
        guard ["fp32", "fp16", "bf16"].contains(precision) else {
            throw PEAError.usage("\(command): --precision must be fp32, fp16 or bf16, got '\(precision)'")
        }
        switch options.string("--backend") ?? "auto" {
        case "auto", "cpu":
            // This build has no CUDA backend yet, so auto is the CPU.
            guard precision == "fp32" else {
                throw PEAError.usage("\(command): the cpu backend computes in fp32 only; --precision \(precision) needs --backend cuda")
            }
            backend = CPUBackend(threads: threads)
        case "cuda":
            throw PEAError.unsupported("\(command): the CUDA backend is not part of this build yet; use --backend cpu")
        case let other:
            throw PEAError.usage("\(command): --backend must be auto, cpu or cuda, got '\(other)'")
        }
    }
}
