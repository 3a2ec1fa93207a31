/// Where a model's parameters come from. A layer asks for each parameter by its full diffusers name and the
/// shape its configuration implies; the source checks the shape and returns a tensor on the model's backend.
public protocol WeightSource: AnyObject {
    var backend: any ComputeBackend { get }
    /// Whether a parameter of this name exists (for optional parameters such as a shortcut convolution).
    func contains(_ name: String) -> Bool
    func tensor(_ name: String, shape: [Int]) throws -> Tensor
    /// A weight matrix that only the backend's GEMM reads (a linear or convolution weight): stored in the
    /// backend's `halfWeights` dtype when it has one and the model loads in f32, else as `tensor` stores it.
    func matrix(_ name: String, shape: [Int]) throws -> Tensor
}

extension WeightSource {
    /// The dtype `matrix` stores a parameter in, for a model loading in `dtype`.
    func matrixDType(_ dtype: DType) -> DType { dtype == .f32 ? backend.halfWeights ?? .f32 : dtype }
}

/// A view of a weight source under a name prefix, so a block reads `norm1.weight` rather than
/// `down_blocks.1.resnets.0.norm1.weight`. `weights["resnets.0"]` descends one level.
public struct Weights {
    public let source: any WeightSource
    public let prefix: String

    public init(_ source: any WeightSource, prefix: String = "") {
        self.source = source
        self.prefix = prefix
    }

    public var backend: any ComputeBackend { source.backend }

    public subscript(_ child: String) -> Weights {
        Weights(source, prefix: fullName(child))
    }

    public func fullName(_ name: String) -> String { prefix.isEmpty ? name : "\(prefix).\(name)" }

    public func contains(_ name: String) -> Bool { source.contains(fullName(name)) }

    public func tensor(_ name: String, _ shape: [Int]) throws -> Tensor {
        try source.tensor(fullName(name), shape: shape)
    }

    public func matrix(_ name: String, _ shape: [Int]) throws -> Tensor {
        try source.matrix(fullName(name), shape: shape)
    }
}

/// Parameters read from safetensors files (one file or a sharded index) and uploaded to `backend` in `dtype`
/// (f32 by default; f16/bf16 for the CUDA backend's reduced precision), converting whatever the file stores as
/// they load. Every parameter — norm scales and biases included — gets the one dtype, since the kernels take
/// one dtype per call; only weight matrices (`matrix`) may be held in the backend's `halfWeights` dtype. Names can be rewritten first (`rename`), which is how older
/// checkpoints' parameter names are mapped onto today's. Records which tensors were used, so a loader can
/// report the ones nothing asked for.
public final class SafeTensorsWeights: WeightSource {
    public let backend: any ComputeBackend
    public let file: SafeTensorsCollection
    /// The dtype every parameter is uploaded in.
    public let dtype: DType
    private var stored: [String: String] = [:]     // the name a layer asks for → the name in the file
    private(set) var used: Set<String> = []

    /// `rename` maps a file's tensor name to the name the model uses (return it unchanged when no rule applies;
    /// nil when the tensor is not this model's, as another component's in a single-file checkpoint).
    public init(_ file: SafeTensorsCollection, backend: any ComputeBackend, dtype: DType = .f32,
                rename: (String) -> String? = { $0 }) {
        precondition(dtype.isFloatingPoint, "SafeTensorsWeights: parameters load as f32, f16 or bf16")
        self.file = file
        self.backend = backend
        self.dtype = dtype
        for name in file.names { if let mapped = rename(name) { stored[mapped] = name } }
    }

    public func contains(_ name: String) -> Bool { stored[name] != nil }

    public func tensor(_ name: String, shape: [Int]) throws -> Tensor {
        try load(name, shape: shape, dtype: dtype)
    }

    public func matrix(_ name: String, shape: [Int]) throws -> Tensor {
        try load(name, shape: shape, dtype: matrixDType(dtype))
    }

    private func load(_ name: String, shape: [Int], dtype: DType) throws -> Tensor {
        guard let storedName = stored[name] else {
            throw PEAError.invalidFile(path: file.path, reason: "missing tensor '\(name)'")
        }
        let info = try file.info(storedName)
        // A 1×1 convolution stored as a linear weight (or the reverse) is the same matrix; older VAE
        // checkpoints store the mid-block attention projections as 1×1 convolutions.
        guard info.shape == shape || sameMatrix(info.shape, shape) else {
            throw PEAError.invalidFile(path: file.path, reason: "tensor '\(storedName)' has shape \(info.shape), the model expects \(shape)")
        }
        guard info.dtype.isFloatingPoint else {
            throw PEAError.invalidFile(path: file.path, reason: "tensor '\(storedName)' is \(info.dtype), expected a floating-point parameter")
        }
        used.insert(storedName)
        // The backend holds its own copy: the mapped pages leave the resident set once it is made, so that
        // loading a model does not hold its weights twice.
        defer { try? file.releasePages(storedName) }
        if info.dtype == dtype {
            // Straight from the memory map to the backend: no host copy in between.
            return try file.withBytes(storedName) { try backend.upload(bytes: $0, shape: shape, dtype: dtype) }
        }
        var values = try file.tensor(storedName).converted(to: dtype)
        values.shape = shape
        return try backend.upload(values)
    }

    /// The model's tensors in the file (those `rename` kept) that the model never asked for, sorted.
    public var unusedNames: [String] { stored.values.filter { !used.contains($0) }.sorted() }
}

/// [out, in] and [out, in, 1, 1] are the same matrix: a 1×1 convolution stored as a linear weight or the reverse.
func sameMatrix(_ a: [Int], _ b: [Int]) -> Bool {
    func core(_ s: [Int]) -> [Int] { s.count == 4 && s[2] == 1 && s[3] == 1 ? [s[0], s[1]] : s }
    return core(a) == core(b)
}

/// Deterministic random parameters of the right shapes, for benchmarks of full-size architectures (speed
/// does not depend on the values). Values are uniform in ±1/√fan-in, like torch's default initialisation,
/// so activations stay in a sane range; 1-D parameters (norm scales, biases) are near 1 or near 0.
public final class RandomWeights: WeightSource {
    public let backend: any ComputeBackend
    private var generator: SplitMix64
    public private(set) var parameterCount = 0
    /// The dtype the parameters are stored in (f32 by default; f16/bf16 for the CUDA backend's precisions).
    public let dtype: DType

    public init(backend: any ComputeBackend, seed: UInt64 = 0, dtype: DType = .f32) {
        self.backend = backend
        self.dtype = dtype
        generator = SplitMix64(seed: seed)
    }

    /// Every parameter a model may ask for exists, so optional parameters are created too.
    public func contains(_ name: String) -> Bool { true }

    public func tensor(_ name: String, shape: [Int]) throws -> Tensor {
        try make(name, shape: shape, dtype: dtype)
    }

    public func matrix(_ name: String, shape: [Int]) throws -> Tensor {
        try make(name, shape: shape, dtype: matrixDType(dtype))
    }

    private func make(_ name: String, shape: [Int], dtype: DType) throws -> Tensor {
        // Shapes come from a config (block_out_channels [100000, 200000]): the values are a Swift array, so
        // what the model holds so far plus this parameter (its array and its upload) is checked first.
        let elements = shape.reduce(1.0) { $0 * Double($1) }
        try MemoryBudget.require((Double(parameterCount) + 2 * elements) * 4, on: backend,
                                 for: "random parameter '\(name)' of shape \(shape) (after \(parameterCount) parameters)")
        let count = shape.reduce(1, *)
        parameterCount += count
        let fanIn = shape.count > 1 ? shape.dropFirst().reduce(1, *) : 1
        let bound = Float(1 / Double(fanIn).squareRoot())
        let isScale = shape.count == 1 && name.hasSuffix(".weight")
        var values = [Float](repeating: 0, count: count)
        for i in 0..<count {
            let u = generator.uniform() * 2 - 1
            values[i] = isScale ? 1 + 0.1 * u : (shape.count == 1 ? 0.1 * u : bound * u)
        }
        // Rounded to `dtype` here, so that the backend never holds an f32 copy of a half-size parameter.
        let host = HostTensor(values, shape: shape)
        return try backend.upload(dtype == .f32 ? host : host.converted(to: dtype))
    }
}
