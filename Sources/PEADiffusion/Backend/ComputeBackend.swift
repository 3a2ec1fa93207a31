import CKernels

/// The operations a backend offers, for capability queries (`supports`). Each has a row in the op registry
/// (`info`, OpRegistry.swift) that says what its tensors may be and what runs and checks it.
public enum Op: String, Sendable, CaseIterable {
    case cast, gemm, linear, conv2d, groupNorm, layerNorm, softmax, attention, activation, geglu
    case binary, affine, upsampleNearest2x, concat, split, permute, embedding, timestepEmbedding, mean
    // Backward ops, for training the adapter through the frozen UNet.
    case conv2dBackwardData, groupNormBackward, layerNormBackward, softmaxBackward, activationBackward
    case gegluBackward, upsampleNearest2xBackward
    // The adapter's optimizer (f32).
    case adamw, sumOfSquares
}

/// The seam between the models and the hardware. Models are written once against this protocol; a backend
/// owns memory (upload, download, allocation), runs ops (possibly asynchronously, in order) and says what it
/// supports. Every op gets its plan — validated arguments, output shape, kernel parameters — from `ShapeRules`
/// (OpPlans.swift) and throws `PEAError` naming the op, so the backends agree on what is legal and compute
/// the same thing; a backend checks only where the tensors live and which dtypes it computes in.
///
/// Conventions: tensors are contiguous and row-major; a `dim` argument may be negative (counted from the
/// end, as in torch); ops return new tensors and never modify their inputs.
public protocol ComputeBackend: AnyObject {
    /// "cpu", "cuda", … as the command line spells it.
    var name: String { get }

    // MARK: memory
    func upload(_ host: HostTensor) throws -> Tensor
    /// Copies raw row-major host bytes of `shape` and `dtype` to a new tensor — straight from a memory-mapped
    /// weights file, without an intermediate host copy.
    func upload(bytes: UnsafeRawBufferPointer, shape: [Int], dtype: DType) throws -> Tensor
    /// Copies a tensor to the host. The only operation that waits for queued work.
    func download(_ tensor: Tensor) throws -> HostTensor
    /// The tensor's values as f32 on the host (`download(tensor).floats()`; a backend may skip the copies).
    func downloadFloats(_ tensor: Tensor) throws -> [Float]
    func zeros(_ shape: [Int], dtype: DType) throws -> Tensor

    // MARK: execution
    /// Waits until every queued op has finished.
    func synchronize() throws

    // MARK: capability
    func supports(_ op: Op, dtype: DType) -> Bool

    /// The memory of its device when that is not the host's (a GPU's), for estimates made before allocating
    /// (`MemoryBudget`); nil for host memory or when the device does not say.
    var deviceMemoryBytes: Double? { get }

    /// Half-size weights: the dtype (f16 or bf16) in which a model loaded in f32 on this backend stores its
    /// weight matrices (linear and convolution weights, `WeightSource.matrix`), which the backend's GEMM widens
    /// to f32 as it packs them; nil: every parameter in the model's dtype.
    var halfWeights: DType? { get }

    // MARK: ops
    /// The values converted to `dtype` (f32 ↔ f16/bf16 rounding to nearest even; ids to f32 by value).
    func cast(_ x: Tensor, to dtype: DType) throws -> Tensor

    /// alpha · op(a) · op(b) + beta · c. a is [M, K] or [batch, M, K] (K×M when transposed), likewise b;
    /// a rank-2 operand is shared by every batch entry. c (optional; required when beta ≠ 0) has the output's
    /// shape [batch?, M, N].
    func gemm(_ a: Tensor, _ b: Tensor, transposeA: Bool, transposeB: Bool, alpha: Float, beta: Float,
              c: Tensor?) throws -> Tensor

    /// x [..., in] · weightᵀ + bias; weight [out, in], bias [out] (torch.nn.Linear).
    func linear(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> Tensor

    /// linear(x, weight, bias) + residual, residual shaped like the output (nil: plain `linear`). The default
    /// is the two ops; a backend may add the residual in the GEMM's epilogue.
    func linear(_ x: Tensor, weight: Tensor, bias: Tensor?, residual: Tensor?) throws -> Tensor

    /// x [B, Cin, H, W] ⋆ weight [Cout, Cin, kh, kw] + bias (torch.nn.functional.conv2d after F.pad).
    func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D) throws -> Tensor

    /// conv2d(x, weight, bias) + residual, residual shaped like the output [B, Cout, Ho, Wo] (nil: plain
    /// `conv2d`). The default is the two ops; a backend may add the residual in the convolution's epilogue.
    func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D,
                residual: Tensor?) throws -> Tensor

    /// Group norm over x [B, C, ...] (torch.nn.functional.group_norm), optionally followed by SiLU.
    func groupNorm(_ x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?, eps: Float, fuseSiLU: Bool) throws -> Tensor

    /// Layer norm over the last dimension.
    func layerNorm(_ x: Tensor, weight: Tensor?, bias: Tensor?, eps: Float) throws -> Tensor

    /// Softmax over the last dimension (a row that is all −∞ gives zeros).
    func softmax(_ x: Tensor) throws -> Tensor

    /// Multi-head scaled-dot-product attention in the layout linear projections produce:
    /// q [B, Tq, H·D], k [B, Tk, H·D], v [B, Tk, H·Dv] → [B, Tq, H·Dv]. `mask` is additive, broadcastable
    /// (right-aligned, as torch) to [B, H, Tq, Tk]; `causal` masks keys after the query (top-left aligned,
    /// torch's is_causal); `scale` defaults to 1/√D. The Tq×Tk score matrix is never materialised.
    func attention(q: Tensor, k: Tensor, v: Tensor, heads: Int, mask: Tensor?, causal: Bool, scale: Float?) throws -> Tensor

    func activation(_ x: Tensor, _ kind: Activation) throws -> Tensor

    /// diffusers' GEGLU after its projection: x [..., 2D] → x[..., :D] · gelu(x[..., D:]).
    func geglu(_ x: Tensor) throws -> Tensor

    /// Elementwise a ⊕ b with torch broadcasting.
    func binary(_ op: BinaryOp, _ a: Tensor, _ b: Tensor) throws -> Tensor

    /// scale · x + shift.
    func affine(_ x: Tensor, scale: Float, shift: Float) throws -> Tensor

    /// Nearest-neighbour 2× upsampling of x [B, C, H, W].
    func upsampleNearest2x(_ x: Tensor) throws -> Tensor

    func concat(_ tensors: [Tensor], dim: Int) throws -> Tensor
    func split(_ x: Tensor, sizes: [Int], dim: Int) throws -> [Tensor]
    /// x.permute(dims).contiguous().
    func permute(_ x: Tensor, _ dims: [Int]) throws -> Tensor

    /// table [V, D] rows picked by ids (i32 or i64, any shape) → [ids.shape…, D].
    func embedding(_ ids: Tensor, table: Tensor) throws -> Tensor

    /// diffusers' get_timestep_embedding: t [B] (any numeric dtype) → [B, dim] f32.
    func timestepEmbedding(_ t: Tensor, dim: Int, flipSinToCos: Bool, downscaleFreqShift: Float,
                           scale: Float, maxPeriod: Float) throws -> Tensor

    func mean(_ x: Tensor, dim: Int, keepDim: Bool) throws -> Tensor

    // MARK: backward ops
    // Training the PEA adapter sends gradients back through the frozen UNet: data gradients for its ops, and
    // parameter gradients only for the adapter's layer norm (its linears' weight gradients are GEMMs).
    // Each takes the gradient of the forward op's output and what the forward op read, recomputes what it
    // needs (norm statistics, activations) and returns new tensors.

    /// The gradients with respect to q, k and v of `attention(q:k:v:heads:mask: nil, causal: false, scale:)`,
    /// given the gradient of its output. The default (ComputeBackend+Backward.swift) is composed of the ops
    /// below and GEMMs; the CPU and CUDA backends run blockwise kernels. A requirement, so that callers holding
    /// `any ComputeBackend` (the taped backend) reach a backend's own version.
    func attentionBackward(_ gradOutput: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: Int,
                           scale: Float?) throws -> (q: Tensor, k: Tensor, v: Tensor)

    /// The gradient with respect to the input x of `conv2d(x, weight, …)`, where x has `inputShape`.
    func conv2dBackwardData(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int], stride: (Int, Int),
                            padding: Padding2D) throws -> Tensor

    /// The gradient with respect to x of `groupNorm(x, …)` with the same arguments (`bias` is only read when
    /// `fuseSiLU` is set: the SiLU's input depends on it).
    func groupNormBackward(_ gradOutput: Tensor, input x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?,
                           eps: Float, fuseSiLU: Bool) throws -> Tensor

    /// The gradients of `layerNorm(x, weight, bias, eps)` with respect to x and, when `parameterGradients`
    /// is set, to the weight and the bias (nil otherwise).
    func layerNormBackward(_ gradOutput: Tensor, input x: Tensor, weight: Tensor?, eps: Float,
                           parameterGradients: Bool) throws -> (input: Tensor, weight: Tensor?, bias: Tensor?)

    /// The gradient with respect to the input of `softmax`, from the forward's output y.
    func softmaxBackward(_ gradOutput: Tensor, output y: Tensor) throws -> Tensor

    /// The gradient with respect to x of `activation(x, kind)` (.gelu, .geluTanh and .silu).
    func activationBackward(_ gradOutput: Tensor, input x: Tensor, _ kind: Activation) throws -> Tensor

    /// The gradient with respect to x [..., 2D] of `geglu(x)`.
    func gegluBackward(_ gradOutput: Tensor, input x: Tensor) throws -> Tensor

    /// The gradient with respect to x [B, C, H, W] of `upsampleNearest2x(x)`: each 2×2 block of gradOutput summed.
    func upsampleNearest2xBackward(_ gradOutput: Tensor) throws -> Tensor

    // MARK: optimizer ops
    // The adapter's AdamW runs where its weights live (`AdamW`, Training/AdamW.swift): f32 tensors, results
    // bit for bit the CPU kernels' on every backend (ck_adamw_f32, ck_sum_squares_f32).

    /// One AdamW step of one f32 tensor (ckernels.h's formula with `scalars`): the new parameter and moments.
    func adamw(parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor, gradient: Tensor,
               scalars: AdamWScalars) throws -> (parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor)

    /// Σ x² of an f32 tensor, in f64 and ck_sum_squares_f32's order. Waits for the queued work.
    func sumOfSquares(_ x: Tensor) throws -> Double
}

/// One AdamW step's f32 scalars for one tensor, as `AdamW` forms them from its f64 hyperparameters (ckernels.h,
/// `ck_adamw_f32`, says how they enter the update).
public struct AdamWScalars: Sendable, Equatable {
    public var decay, weight1, keep2, weight2, stepSize, correction2Root, epsilon: Float

    var kernelValue: ck_adamw_hyper {
        ck_adamw_hyper(decay: decay, weight1: weight1, keep2: keep2, weight2: weight2, step_size: stepSize,
                       correction2_root: correction2Root, eps: epsilon)
    }
}

extension ComputeBackend {
    public var deviceMemoryBytes: Double? { nil }
    public var halfWeights: DType? { nil }

    /// Through a `HostTensor`: one extra host copy, for backends without a direct path.
    public func upload(bytes: UnsafeRawBufferPointer, shape: [Int], dtype: DType) throws -> Tensor {
        guard bytes.count == shape.reduce(1, *) * dtype.byteSize else {
            throw PEAError.shapeMismatch("upload: \(bytes.count) bytes for \(dtype) \(shape)")
        }
        return try upload(HostTensor(shape: shape, dtype: dtype, bytes: Array(bytes)))
    }

    public func add(_ a: Tensor, _ b: Tensor) throws -> Tensor { try binary(.add, a, b) }
    public func sub(_ a: Tensor, _ b: Tensor) throws -> Tensor { try binary(.sub, a, b) }
    public func mul(_ a: Tensor, _ b: Tensor) throws -> Tensor { try binary(.mul, a, b) }
    public func div(_ a: Tensor, _ b: Tensor) throws -> Tensor { try binary(.div, a, b) }
    public func scale(_ x: Tensor, by factor: Float) throws -> Tensor { try affine(x, scale: factor, shift: 0) }

    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?, residual: Tensor?) throws -> Tensor {
        try addingResidual(residual, to: linear(x, weight: weight, bias: bias), "linear")
    }

    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D,
                       residual: Tensor?) throws -> Tensor {
        try addingResidual(residual, to: conv2d(x, weight: weight, bias: bias, stride: stride, padding: padding), "conv2d")
    }

    /// y + residual for the composed residual ops.
    private func addingResidual(_ residual: Tensor?, to y: Tensor, _ op: String) throws -> Tensor {
        try ShapeRules.requireResidual(residual, y.shape, op)
        return try residual.map { try add(y, $0) } ?? y
    }

    public func upload(_ values: [Float], shape: [Int]) throws -> Tensor {
        guard values.count == shape.reduce(1, *) else { return try upload(HostTensor(values, shape: shape)) }  // its error
        return try values.withUnsafeBytes { try upload(bytes: $0, shape: shape, dtype: .f32) }
    }

    public func downloadFloats(_ tensor: Tensor) throws -> [Float] {
        try download(tensor).floats()
    }
}
