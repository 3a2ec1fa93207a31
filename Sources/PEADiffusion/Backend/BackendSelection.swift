/// Which backend a run computes on and in which precision: auto (CUDA when a complete library, a driver and a
/// device are present, else the CPU), cpu or cuda; fp32, or fp16/bf16 storage on CUDA. The command line, the
/// server and jobs choose through this one place; each words the errors and the fallback notice its own way.
public struct BackendSelection {
    public enum Choice: String, CaseIterable, Sendable {
        case auto, cpu, cuda
    }

    /// Storage precisions by the names users type.
    public enum Precision: String, CaseIterable, Sendable {
        case fp32, fp16, bf16

        public var dtype: DType {
            switch self {
            case .fp32: return .f32
            case .fp16: return .f16
            case .bf16: return .bf16
            }
        }
    }

    /// Why a choice cannot be honoured; `description` says it without naming any caller's flags.
    public enum Failure: Error, CustomStringConvertible, Sendable {
        /// The CPU backend was chosen with f16 or bf16.
        case cpuComputesInFP32(requested: Precision)
        /// auto found no usable CUDA, and the precision needs it.
        case precisionNeedsCUDA(requested: Precision, unavailable: String)
        /// Half-size weights were asked for and CUDA was chosen (its weights follow the precision).
        case halfWeightsAreCPUs
        /// cuda was chosen and could not be opened.
        case cudaFailed(String)

        public var description: String {
            switch self {
            case .cpuComputesInFP32(let precision):
                return "the cpu backend computes in fp32 only; \(precision.rawValue) needs the cuda backend"
            case .precisionNeedsCUDA(let precision, let why):
                return "\(precision.rawValue) needs the CUDA backend, which is unavailable: \(why)"
            case .halfWeightsAreCPUs:
                return "half-size weights are the cpu backend's; the cuda backend stores weights in its precision"
            case .cudaFailed(let why):
                return "the cuda backend: \(why)"
            }
        }
    }

    public let backend: any ComputeBackend
    public let dtype: DType
    /// Set when auto fell back to the CPU where CUDA could have been expected (a library was found, or
    /// PEA_CUDA_LIB is set): "CUDA unavailable (…); using the CPU". A machine without any CUDA library uses
    /// the CPU silently.
    public let fallbackNotice: String?

    /// - Parameters:
    ///   - threads: CPU threads (0: every online CPU).
    ///   - device: the CUDA device ordinal (as `CUDA_VISIBLE_DEVICES` leaves them numbered).
    ///   - halfWeights: f16 or bf16 weight matrices on the CPU backend (`CPUBackend.halfWeights`).
    /// - Throws: `Failure`.
    public init(_ choice: Choice, precision: Precision, threads: Int, device: Int = 0, halfWeights: DType? = nil) throws {
        dtype = precision.dtype
        var notice: String?
        switch choice {
        case .cpu:
            guard precision == .fp32 else { throw Failure.cpuComputesInFP32(requested: precision) }
            backend = CPUBackend(threads: threads, halfWeights: halfWeights)
        case .cuda:
            if halfWeights != nil { throw Failure.halfWeightsAreCPUs }
            do { backend = try CUDABackend(device: device) } catch { throw Failure.cudaFailed(Self.withoutCUDAPrefix("\(error)")) }
        case .auto:
            switch CUDABackend.availability(device: device) {
            case .success(let cuda):
                if halfWeights != nil { throw Failure.halfWeightsAreCPUs }
                backend = cuda
            case .failure(let why):
                let reason = Self.withoutCUDAPrefix(why.message)
                guard precision == .fp32 else { throw Failure.precisionNeedsCUDA(requested: precision, unavailable: reason) }
                if why.userExpectsCUDA { notice = "CUDA unavailable (\(reason)); using the CPU" }
                backend = CPUBackend(threads: threads, halfWeights: halfWeights)
            }
        }
        fallbackNotice = notice
    }

    /// The CUDA loader's messages start with "cuda: "; inside a sentence that already says CUDA it is noise.
    public static func withoutCUDAPrefix(_ message: String) -> String {
        message.hasPrefix("cuda: ") ? String(message.dropFirst(6)) : message
    }
}
