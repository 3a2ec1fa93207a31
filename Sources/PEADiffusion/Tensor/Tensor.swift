import CKernels
/// Memory a backend owns: host memory for the CPU backend, device memory for the CUDA backend.
/// Nothing above the backend looks inside.
public protocol TensorStorage: AnyObject {
    var byteCount: Int { get }
}

/// A contiguous, row-major tensor that lives on one backend. Images are NCHW, sequences [B, T, D].
///
/// A tensor is a shape and a dtype over backend-owned storage; it has no host copy. Reading its values
/// means an explicit `backend.download`, so there are no hidden host round-trips between ops.
public final class Tensor: CustomStringConvertible {
    public let shape: [Int]
    public let dtype: DType
    public let storage: TensorStorage
    public let backend: any ComputeBackend

    public init(shape: [Int], dtype: DType, storage: TensorStorage, backend: any ComputeBackend) {
        precondition(shape.allSatisfy { $0 >= 0 }, "Tensor: negative dimension in \(shape)")
        precondition(storage.byteCount >= shape.reduce(1, *) * dtype.byteSize, "Tensor: storage too small for \(shape)")
        self.shape = shape
        self.dtype = dtype
        self.storage = storage
        self.backend = backend
    }

    public var rank: Int { shape.count }
    public var count: Int { shape.reduce(1, *) }
    public var byteCount: Int { count * dtype.byteSize }

    /// The same storage seen with another shape of the same element count (no copy).
    public func reshaped(_ newShape: [Int]) throws -> Tensor {
        var resolved = newShape
        if let inferred = newShape.firstIndex(of: -1) {
            let known = newShape.enumerated().filter { $0.offset != inferred }.map(\.element).reduce(1, *)
            guard known > 0, count % known == 0 else {
                throw PEAError.shapeMismatch("reshape \(shape) to \(newShape)")
            }
            resolved[inferred] = count / known
        }
        guard resolved.allSatisfy({ $0 >= 0 }), resolved.reduce(1, *) == count else {
            throw PEAError.shapeMismatch("reshape \(shape) (\(count) elements) to \(newShape)")
        }
        return Tensor(shape: resolved, dtype: dtype, storage: storage, backend: backend)
    }

    public var description: String { "Tensor(\(shape), \(dtype), \(backend.name))" }
}

/// Padding of a 2-D convolution, per side (diffusers' VAE downsampler pads only right and bottom).
public struct Padding2D: Equatable, Sendable {
    public var top, bottom, left, right: Int

    public init(top: Int, bottom: Int, left: Int, right: Int) {
        self.top = top
        self.bottom = bottom
        self.left = left
        self.right = right
    }

    /// The same padding on every side, as torch's `padding=p`.
    public static func uniform(_ p: Int) -> Padding2D { Padding2D(top: p, bottom: p, left: p, right: p) }
}

public enum Activation: String, Sendable, CaseIterable {
    case gelu          // exact, erf form (torch's default)
    case geluTanh      // approximate="tanh"
    case quickGELU     // x·σ(1.702x), CLIP
    case silu

    /// ckernels.h's code for it (CK_ACT_*; pea_cuda.h's PEA_ACT_* are the same), which the kernels of both
    /// backends take.
    var kernelCode: Int32 {
        switch self {
        case .gelu: return Int32(CK_ACT_GELU_ERF)
        case .geluTanh: return Int32(CK_ACT_GELU_TANH)
        case .quickGELU: return Int32(CK_ACT_QUICK_GELU)
        case .silu: return Int32(CK_ACT_SILU)
        }
    }

    /// Whether the kernels have its backward (ckernels.h's CK_ACT_HAS_BACKWARD): not quick GELU, which the
    /// UNet does not use.
    public var hasBackward: Bool { self != .quickGELU }
}

public enum BinaryOp: String, Sendable, CaseIterable {
    case add, sub, mul, div

    /// ckernels.h's code for it (CK_ADD …), which the kernels of both backends take.
    var kernelCode: Int32 {
        switch self {
        case .add: return Int32(CK_ADD)
        case .sub: return Int32(CK_SUB)
        case .mul: return Int32(CK_MUL)
        case .div: return Int32(CK_DIV)
        }
    }
}
