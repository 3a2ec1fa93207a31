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
    /// A failure inside a backend, with its kind so that a caller can react to it (free memory and retry
    /// smaller after `.outOfMemory`, say) without reading the message.
    case backend(String, kind: BackendFailure = .other)

    public var description: String {
        switch self {
        case .invalidFile(let path, let reason): return "\(path): \(reason)"
        case .invalidConfig(let path, let reason): return "\(path): \(reason)"
        case .shapeMismatch(let message): return "shape mismatch: \(message)"
        case .unsupported(let message): return "unsupported: \(message)"
        case .usage(let message): return message
        case .backend(let message, _): return message
        }
    }
}

/// The kinds of backend failure (pea_cuda.h's status codes; the CPU backend's allocation and data errors).
public enum BackendFailure: String, Sendable, Equatable {
    /// The device or host could not allocate the memory asked for.
    case outOfMemory
    /// An argument the kernel cannot take, or data out of its range (a token id outside the vocabulary).
    case invalidArgument
    /// A failed kernel launch or library call on the device.
    case launchFailure
    /// No driver, no device, or a library that cannot be used.
    case unavailable
    /// Anything else (a failure further up, wrapped with its context).
    case other
}

extension PEAError {
    /// The backend failure's kind, for `.backend` errors (nil for every other case).
    public var backendFailure: BackendFailure? {
        if case .backend(_, let kind) = self { return kind }
        return nil
    }

    /// Usage errors exit with status 2, everything else with 1 (the convention of getopt-style tools).
    public var isUsage: Bool {
        if case .usage = self { return true }
        return false
    }
}
