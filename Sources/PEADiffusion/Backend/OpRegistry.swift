// The op registry: one row per op saying what every part of Pea needs to know about it — the dtypes it takes,
// the pea_cuda.h functions that run it, the backward ops that differentiate it and the torch fixtures that
// check it. `supports` on every backend, the CUDA backend's kernel lookup, the taped backend's gradients and
// the test suites' coverage checks all read these rows, so a new op is one row here (docs/adding-an-op.md).

/// What the registry knows about one op.
public struct OpInfo: Sendable {
    /// Which dtypes the op's tensors may have, relative to the backend's compute dtypes (the CPU computes in
    /// f32; CUDA in f32, f16 and bf16).
    public enum DTypes: Sendable {
        /// The backend's compute dtypes.
        case compute
        /// Every dtype (data movement, conversions; timesteps of any numeric dtype).
        case any
        /// Integer ids (i32, i64) and tables in a compute dtype (embedding).
        case idsAndCompute
        /// f32 only (the adapter's optimizer: f32 weights and moments).
        case f32

        public func accepts(_ dtype: DType, compute: Set<DType>) -> Bool {
            switch self {
            case .compute: return compute.contains(dtype)
            case .any: return true
            case .idsAndCompute: return dtype == .i32 || dtype == .i64 || compute.contains(dtype)
            case .f32: return dtype == .f32
            }
        }
    }

    public let dtypes: DTypes
    /// The pea_cuda.h functions the CUDA backend calls to run the op (each on pea_cuda.h's PEA_CUDA_FUNCTIONS
    /// list); the backend supports the op when its library exports all of them.
    public let cudaFunctions: [String]
    /// The ops `TapedBackend` calls to send a gradient back through this one (nil: the op takes no part in
    /// differentiation — backward and optimizer ops, integer lookups). A taped backend supports the op when
    /// its wrapped backend supports these too.
    public let backward: [Op]?
    /// The fixtures of tools/reference/make_op_fixtures.py (their `op` field) that check the CPU op against
    /// torch; empty for ops checked elsewhere: backward ops by finite differences (BackwardOpTests), the
    /// optimizer ops against torch's AdamW (OptimizerTests).
    public let torchFixtures: [String]
}

extension Op {
    /// This op's row of the registry (looked up in a table built once: backends read it on every call).
    public var info: OpInfo { Self.registry[self]! }

    private static let registry: [Op: OpInfo] = Dictionary(uniqueKeysWithValues: allCases.map { ($0, $0.row) })

    private var row: OpInfo {
        func row(_ dtypes: OpInfo.DTypes, _ cuda: String, backward: [Op]?, torch: [String]) -> OpInfo {
            OpInfo(dtypes: dtypes, cudaFunctions: ["pea_cuda_" + cuda], backward: backward, torchFixtures: torch)
        }
        switch self {
        case .cast: return row(.any, "convert", backward: [.cast], torch: ["convert"])
        case .gemm: return row(.compute, "gemm", backward: [.gemm, .affine], torch: ["gemm"])
        case .linear: return row(.compute, "linear", backward: [.gemm, .mean, .affine], torch: ["linear"])
        case .conv2d: return row(.compute, "conv2d", backward: [.conv2dBackwardData], torch: ["conv2d"])
        case .groupNorm: return row(.compute, "group_norm", backward: [.groupNormBackward], torch: ["group_norm"])
        case .layerNorm: return row(.compute, "layer_norm", backward: [.layerNormBackward], torch: ["layer_norm"])
        case .softmax: return row(.compute, "softmax", backward: [.softmaxBackward], torch: ["softmax"])
        case .attention:
            return row(.compute, "attention", backward: [.gemm, .softmax, .softmaxBackward, .permute, .split, .concat, .mean, .affine],
                       torch: ["attention"])
        case .activation:
            return row(.compute, "activation", backward: [.activationBackward], torch: ["gelu", "quick_gelu", "silu"])
        case .geglu: return row(.compute, "geglu", backward: [.gegluBackward], torch: ["geglu"])
        case .binary: return row(.compute, "binary", backward: [.binary, .affine, .mean], torch: ["binary"])
        case .affine: return row(.compute, "affine", backward: [.affine], torch: ["affine"])
        case .upsampleNearest2x:
            return row(.compute, "upsample_nearest2x", backward: [.upsampleNearest2xBackward], torch: ["upsample_nearest2x"])
        case .concat: return row(.any, "copy_strided", backward: [.split], torch: ["concat"])
        case .split: return row(.any, "copy_strided", backward: [.concat], torch: ["split"])
        case .permute: return row(.any, "copy_strided", backward: [.permute], torch: ["permute"])
        case .embedding: return row(.idsAndCompute, "embedding", backward: nil, torch: ["embedding"])
        case .timestepEmbedding: return row(.any, "timestep_embedding", backward: nil, torch: ["timestep_embedding"])
        case .mean: return row(.compute, "mean", backward: [.binary, .affine], torch: ["mean"])
        case .conv2dBackwardData: return row(.compute, "conv2d_backward_data", backward: nil, torch: [])
        case .groupNormBackward: return row(.compute, "group_norm_backward", backward: nil, torch: [])
        case .layerNormBackward: return row(.compute, "layer_norm_backward", backward: nil, torch: [])
        case .softmaxBackward: return row(.compute, "softmax_backward", backward: nil, torch: [])
        case .activationBackward: return row(.compute, "activation_backward", backward: nil, torch: [])
        case .gegluBackward: return row(.compute, "geglu_backward", backward: nil, torch: [])
        case .upsampleNearest2xBackward: return row(.compute, "upsample_nearest2x_backward", backward: nil, torch: [])
        case .adamw: return row(.f32, "adamw", backward: nil, torch: [])
        case .sumOfSquares: return row(.f32, "sum_squares", backward: nil, torch: [])
        }
    }
}
