import CKernels

/// Element types a tensor can hold. f32 is the reference compute type; f16 and bf16 are storage types
/// (weights, and activations on the CUDA backend); i32/i64 hold token ids and timesteps.
public enum DType: String, Sendable, CaseIterable, CustomStringConvertible {
    case f32, f16, bf16, i32, i64

    public var byteSize: Int {
        switch self {
        case .f32, .i32: return 4
        case .f16, .bf16: return 2
        case .i64: return 8
        }
    }

    public var isFloatingPoint: Bool { self == .f32 || self == .f16 || self == .bf16 }

    /// The largest finite value of a floating-point dtype (torch.finfo(dtype).max), as a Float that converts to
    /// it exactly; f32's for the integer types. Masks use its negative so that they stay finite once converted.
    public var greatestFiniteMagnitude: Float {
        switch self {
        case .f16: return 65504
        case .bf16: return Float(bitPattern: 0x7F7F_0000)   // 3.3895e38
        default: return .greatestFiniteMagnitude
        }
    }

    /// The safetensors spelling ("F32", "F16", "BF16", "I32", "I64").
    public var safetensorsName: String {
        switch self {
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        case .i32: return "I32"
        case .i64: return "I64"
        }
    }

    public init?(safetensorsName: String) {
        guard let match = DType.allCases.first(where: { $0.safetensorsName == safetensorsName }) else { return nil }
        self = match
    }

    /// The CK_* code of ckernels.h, for ck_convert.
    var kernelCode: Int32 {
        switch self {
        case .f32: return Int32(CK_F32)
        case .f16: return Int32(CK_F16)
        case .bf16: return Int32(CK_BF16)
        case .i32: return Int32(CK_I32)
        case .i64: return Int32(CK_I64)
        }
    }

    public var description: String { rawValue }
}
