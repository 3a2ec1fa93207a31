/// Every error Pea throws. Each case carries a message that names the file, tensor, field or op involved,
/// so that the command-line tool can print it as it is.
public enum PEAError: Error, CustomStringConvertible, Equatable {
    /// A file that cannot be read or whose contents are malformed (safetensors, JSON, images, …).
    case invalidFile(path: String, reason: String)
    /// A model configuration we cannot honour: a missing key, an unsupported value.
    case invalidConfig(path: String, reason: String)
    /// Tensors whose shapes or dtypes do not fit the operation.
    case shapeMismatch(String)
    /// An operation the selected backend does not implement for these arguments.
    case unsupported(String)
    /// Bad command-line usage or argument values.
    case usage(String)
    /// A failure inside a backend (out of memory, a kernel error, a data value out of range).
    case backend(String)

    public var description: String {
        switch self {
        case .invalidFile(let path, let reason): return "\(path): \(reason)"
        case .invalidConfig(let path, let reason): return "\(path): \(reason)"
        case .shapeMismatch(let message): return "shape mismatch: \(message)"
        case .unsupported(let message): return "unsupported: \(message)"
        case .usage(let message): return message
        case .backend(let message): return message
        }
    }
}

extension PEAError {
    /// Usage errors exit with status 2, everything else with 1 (the convention of getopt-style tools).
    public var isUsage: Bool {
        if case .usage = self { return true }
        return false
    }
}
