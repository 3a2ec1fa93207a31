// Reverse-mode differentiation for training the PEA adapter through the frozen UNet.
//
// `TapedBackend` wraps a backend. Models run on it unchanged (they call `x.backend.op(...)`, and the tensors it
// returns name it as their backend), and every op whose inputs depend on a tensor marked with
// `requireGradient` is recorded on a tape with a closure that maps the gradient of its output to the gradients
// of its inputs, using the wrapped backend's backward ops. `backward(from:)` replays the tape in reverse.
//
// Gradients are keyed by storage: ops always return new storage, and a reshape (`Tensor.reshaped`) shares it,
// so a gradient belongs to a buffer, whatever shape a later op reads it with. A closure keeps alive exactly
// the tensors its backward reads (a norm's input, attention's q/k/v, …); ops on tensors that need no gradient
// (the time embedding, anything before the first cross-attention) are not recorded and keep nothing.
// The gradient rule, as llm.c: a backward closure returns fresh gradients; the tape sums them (`+=`) per buffer.

/// A backend that records, for reverse-mode differentiation, the ops that depend on tensors requiring a gradient.
public final class TapedBackend: ComputeBackend {
    public let inner: any ComputeBackend
    public var name: String { inner.name }

    /// The buffers whose gradient is wanted or flows: leaves marked by `requireGradient`, and the outputs of
    /// recorded ops. Held weakly: a buffer that is freed stops being tracked, so a new buffer that happens to get
    /// its address is not mistaken for it.
    private var tracked: [ObjectIdentifier: WeakStorage] = [:]

    private final class WeakStorage {
        weak var storage: TensorStorage?
        init(_ storage: TensorStorage) { self.storage = storage }
    }
    private var tape: [Entry] = []
    private var gradients: [ObjectIdentifier: Tensor] = [:]

    /// One recorded op: which input buffers take a gradient (nil for those that don't), its output buffers and
    /// shapes, and the rule mapping output gradients (nil where none flowed) to input gradients.
    private struct Entry {
        let op: String
        let inputs: [ObjectIdentifier?]
        let outputs: [ObjectIdentifier]
        let outputShapes: [[Int]]
        let backward: ([Tensor?]) throws -> [Tensor?]
    }

    public init(wrapping inner: any ComputeBackend) {
        self.inner = inner
    }

    // MARK: differentiation

    /// Marks a leaf (an adapter parameter, an input) whose gradient `backward` should produce.
    public func requireGradient(_ tensor: Tensor) {
        track(tensor.storage)
    }

    private func track(_ storage: TensorStorage) {
        tracked[ObjectIdentifier(storage)] = WeakStorage(storage)
    }

    private func isTracked(_ storage: TensorStorage) -> Bool {
        tracked[ObjectIdentifier(storage)]?.storage === storage
    }

    /// Whether `tensor` is a leaf marked with `requireGradient` or depends on one through recorded ops.
    public func requiresGradient(_ tensor: Tensor) -> Bool {
        isTracked(tensor.storage)
    }

    /// The number of recorded ops (for tests and memory reports).
    public var recordedOps: Int { tape.count }

    /// Replays the tape backwards from `output` with the seed gradient `seed` (ones, for a scalar loss, when
    /// nil), leaving the gradients of the leaves for `gradient(of:)`. The tape is consumed: what it kept alive for
    /// the backward pass is released.
    /// A freed buffer's address may be reused by a later one; keying gradients by address stays sound because
    /// the replay runs in reverse: a buffer's consumers are replayed before its producer, which takes (removes)
    /// its gradient, before any older buffer that had the same address is reached.
    public func backward(from output: Tensor, seed: Tensor? = nil) throws {
        let start = try seed.map(unwrap) ?? inner.upload([Float](repeating: 1, count: output.count), shape: output.shape)
        guard start.count == output.count else {
            throw PEAError.shapeMismatch("backward: seed gradient \(start.shape) for an output of shape \(output.shape)")
        }
        let seedOfOutputDType = start.dtype == output.dtype ? start : try inner.cast(start, to: output.dtype)
        try accumulate(seedOfOutputDType, into: ObjectIdentifier(output.storage))
        while let entry = tape.popLast() {
            let outputGradients = entry.outputs.map { gradients.removeValue(forKey: $0) }
            guard outputGradients.contains(where: { $0 != nil }) else { continue }
            let shaped = try zip(outputGradients, entry.outputShapes).map { gradient, shape in
                try gradient.map { $0.shape == shape ? $0 : try $0.reshaped(shape) }
            }
            let inputGradients: [Tensor?]
            do {
                inputGradients = try entry.backward(shaped)
            } catch let error as PEAError {
                throw PEAError.backend("backward of \(entry.op): \(error)", kind: error.backendFailure ?? .other)
            }
            for (id, gradient) in zip(entry.inputs, inputGradients) {
                guard let id, let gradient else { continue }
                try accumulate(gradient, into: id)
            }
        }
    }

    /// The gradient `backward` left for a leaf, in the leaf's shape (nil when nothing flowed to it).
    public func gradient(of tensor: Tensor) throws -> Tensor? {
        try gradients[ObjectIdentifier(tensor.storage)].map { try wrap($0.reshaped(tensor.shape)) }
    }

    private func accumulate(_ gradient: Tensor, into id: ObjectIdentifier) throws {
        if let existing = gradients[id] {
            gradients[id] = try inner.add(existing, gradient.reshaped(existing.shape))
        } else {
            gradients[id] = gradient
        }
    }

    /// Records an op when one of its inputs takes part in differentiation. `differentiable[i]` says whether the
    /// rule can produce input i's gradient; an input that needs one the rule cannot give is an error, not a
    /// silently missing gradient. An op whose output is one of its inputs (a no-op cast) records nothing.
    private func record(_ op: String, inputs: [Tensor?], differentiable: [Bool], outputs: [Tensor],
                        backward: @escaping ([Tensor?]) throws -> [Tensor?]) throws {
        let ids: [ObjectIdentifier?] = inputs.map { input in
            guard let input, isTracked(input.storage) else { return nil }
            return ObjectIdentifier(input.storage)
        }
        guard ids.contains(where: { $0 != nil }) else { return }
        let outputIDs = outputs.map { ObjectIdentifier($0.storage) }
        guard !outputIDs.contains(where: { ids.contains($0) }) else { return }
        for (i, id) in ids.enumerated() where id != nil && !differentiable[i] {
            throw PEAError.unsupported("\(op): no gradient with respect to its input \(i), which requires one")
        }
        for output in outputs { track(output.storage) }
        tape.append(Entry(op: op, inputs: ids, outputs: outputIDs, outputShapes: outputs.map(\.shape), backward: backward))
    }

    // MARK: gradient checkpointing

    /// Gradient checkpointing (diffusers' `gradient_checkpointing`, `torch.utils.checkpoint`): when set, the layers
    /// that ask (`checkpointedLayer`: every resnet and transformer block) keep only their inputs for the backward
    /// pass and run again from them when it reaches them, trading a second forward pass of those layers for the
    /// activations inside them.
    public var checkpointsLayers = false

    /// Runs `layer` on `inputs`, every tensor it reads that may take a gradient among them. When an input takes
    /// part in differentiation, the forward pass runs on the wrapped backend (nothing inside the layer is
    /// recorded or kept) and one entry is recorded, keeping the inputs, whose backward runs the layer again on a
    /// nested tape and differentiates it there. Recomputing gives the same values (the same kernels on the same
    /// inputs), so the gradients are those of the plain tape up to the order in which a buffer's gradient terms
    /// are summed.
    public func checkpointed(_ op: String, _ inputs: [Tensor], _ layer: @escaping ([Tensor]) throws -> Tensor) throws -> Tensor {
        let inner = self.inner
        func plain(_ t: Tensor) -> Tensor { Tensor(shape: t.shape, dtype: t.dtype, storage: t.storage, backend: inner) }
        let needs = inputs.map(requiresGradient)
        let output = wrap(try layer(inputs.map(plain)))
        guard needs.contains(true) else { return output }
        try record(op, inputs: inputs, differentiable: inputs.map { _ in true }, outputs: [output]) { gradients in
            guard let gradient = gradients[0] else { return inputs.map { _ in nil } }
            let nested = TapedBackend(wrapping: inner)
            let replayed = inputs.map { nested.wrap(plain($0)) }
            for (tensor, need) in zip(replayed, needs) where need { nested.requireGradient(tensor) }
            try nested.backward(from: layer(replayed), seed: gradient)
            return try zip(replayed, needs).map { tensor, need in need ? try nested.gradient(of: tensor).map(nested.unwrap) : nil }
        }
        return output
    }

    // MARK: memory

    func wrap(_ t: Tensor) -> Tensor {
        t.backend === self ? t : Tensor(shape: t.shape, dtype: t.dtype, storage: t.storage, backend: self)
    }

    func unwrap(_ t: Tensor) -> Tensor {
        t.backend === self ? Tensor(shape: t.shape, dtype: t.dtype, storage: t.storage, backend: inner) : t
    }

    public func upload(_ host: HostTensor) throws -> Tensor { wrap(try inner.upload(host)) }
    public func upload(bytes: UnsafeRawBufferPointer, shape: [Int], dtype: DType) throws -> Tensor {
        wrap(try inner.upload(bytes: bytes, shape: shape, dtype: dtype))
    }
    public func download(_ tensor: Tensor) throws -> HostTensor { try inner.download(unwrap(tensor)) }
    public func downloadFloats(_ tensor: Tensor) throws -> [Float] { try inner.downloadFloats(unwrap(tensor)) }
    public func zeros(_ shape: [Int], dtype: DType) throws -> Tensor { wrap(try inner.zeros(shape, dtype: dtype)) }
    public func synchronize() throws { try inner.synchronize() }
    public var deviceMemoryBytes: Double? { inner.deviceMemoryBytes }
    /// The wrapped backend supports the op and the ops that differentiate it (its registry row's `backward`).
    public func supports(_ op: Op, dtype: DType) -> Bool {
        inner.supports(op, dtype: dtype) && (op.info.backward ?? []).allSatisfy { inner.supports($0, dtype: dtype) }
    }

    // MARK: forward ops, each with its backward rule

    public func cast(_ x: Tensor, to dtype: DType) throws -> Tensor {
        let y = try inner.cast(unwrap(x), to: dtype)
        let from = x.dtype
        try record("cast", inputs: [x], differentiable: [from.isFloatingPoint], outputs: [y]) { [inner] g in
            [try inner.cast(g[0]!, to: from)]
        }
        return wrap(y)
    }

    public func gemm(_ a: Tensor, _ b: Tensor, transposeA: Bool, transposeB: Bool, alpha: Float, beta: Float,
                     c: Tensor?) throws -> Tensor {
        let (ai, bi, ci) = (unwrap(a), unwrap(b), c.map(unwrap))
        let y = try inner.gemm(ai, bi, transposeA: transposeA, transposeB: transposeB, alpha: alpha, beta: beta, c: ci)
        // Broadcast (a rank-2 operand shared by a batch) would need a sum over the batch; not needed by the models.
        let sameRank = ai.rank == y.rank && bi.rank == y.rank
        try record("gemm", inputs: [a, b, c], differentiable: [sameRank, sameRank, true], outputs: [y]) { [inner] g in
            let dy = g[0]!
            // C = α·op(A)·op(B) + β·C0:  d op(A) = α·dC·op(B)ᵀ,  d op(B) = α·op(A)ᵀ·dC.
            let da = transposeA
                ? try inner.gemm(bi, dy, transposeA: transposeB, transposeB: true, alpha: alpha, beta: 0, c: nil)
                : try inner.gemm(dy, bi, transposeA: false, transposeB: !transposeB, alpha: alpha, beta: 0, c: nil)
            let db = transposeB
                ? try inner.gemm(dy, ai, transposeA: true, transposeB: transposeA, alpha: alpha, beta: 0, c: nil)
                : try inner.gemm(ai, dy, transposeA: !transposeA, transposeB: false, alpha: alpha, beta: 0, c: nil)
            return [da, db, ci == nil ? nil : try inner.scale(dy, by: beta)]
        }
        return wrap(y)
    }

    public func linear(_ x: Tensor, weight: Tensor, bias: Tensor?) throws -> Tensor {
        let (xi, wi) = (unwrap(x), unwrap(weight))
        let y = try inner.linear(xi, weight: wi, bias: bias.map(unwrap))
        let needInput = requiresGradient(x), needWeight = requiresGradient(weight), needBias = bias.map(requiresGradient) ?? false
        try record("linear", inputs: [x, weight, bias], differentiable: [true, true, true], outputs: [y]) { [inner] g in
            let dy = g[0]!
            let (outFeatures, inFeatures) = (wi.shape[0], wi.shape[1])
            let rows = dy.count / outFeatures
            let dy2 = try dy.reshaped([rows, outFeatures])
            // y = x·Wᵀ + b:  dx = dy·W,  dW = dyᵀ·x,  db = Σ_rows dy.
            let dx = needInput
                ? try inner.gemm(dy2, wi, transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil).reshaped(xi.shape)
                : nil
            let dw = needWeight
                ? try inner.gemm(dy2, xi.reshaped([rows, inFeatures]), transposeA: true, transposeB: false, alpha: 1, beta: 0, c: nil)
                : nil
            let db = needBias ? try inner.sumToShape(dy2, [outFeatures]) : nil
            return [dx, dw, db]
        }
        return wrap(y)
    }

    public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor?, stride: (Int, Int), padding: Padding2D) throws -> Tensor {
        let (xi, wi) = (unwrap(x), unwrap(weight))
        let y = try inner.conv2d(xi, weight: wi, bias: bias.map(unwrap), stride: stride, padding: padding)
        let inputShape = xi.shape
        try record("conv2d", inputs: [x, weight, bias], differentiable: [true, false, false], outputs: [y]) { [inner] g in
            [try inner.conv2dBackwardData(g[0]!, weight: wi, inputShape: inputShape, stride: stride, padding: padding), nil, nil]
        }
        return wrap(y)
    }

    public func groupNorm(_ x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?, eps: Float, fuseSiLU: Bool) throws -> Tensor {
        let (xi, wi, bi) = (unwrap(x), weight.map(unwrap), bias.map(unwrap))
        let y = try inner.groupNorm(xi, groups: groups, weight: wi, bias: bi, eps: eps, fuseSiLU: fuseSiLU)
        try record("groupNorm", inputs: [x, weight, bias], differentiable: [true, false, false], outputs: [y]) { [inner] g in
            [try inner.groupNormBackward(g[0]!, input: xi, groups: groups, weight: wi, bias: bi, eps: eps, fuseSiLU: fuseSiLU), nil, nil]
        }
        return wrap(y)
    }

    public func layerNorm(_ x: Tensor, weight: Tensor?, bias: Tensor?, eps: Float) throws -> Tensor {
        let (xi, wi) = (unwrap(x), weight.map(unwrap))
        let y = try inner.layerNorm(xi, weight: wi, bias: bias.map(unwrap), eps: eps)
        let parameters = (weight.map(requiresGradient) ?? false) || (bias.map(requiresGradient) ?? false)
        try record("layerNorm", inputs: [x, weight, bias], differentiable: [true, true, true], outputs: [y]) { [inner] g in
            let grads = try inner.layerNormBackward(g[0]!, input: xi, weight: wi, eps: eps, parameterGradients: parameters)
            return [grads.input, grads.weight, grads.bias]
        }
        return wrap(y)
    }

    public func softmax(_ x: Tensor) throws -> Tensor {
        let y = try inner.softmax(unwrap(x))
        try record("softmax", inputs: [x], differentiable: [true], outputs: [y]) { [inner] g in
            [try inner.softmaxBackward(g[0]!, output: y)]
        }
        return wrap(y)
    }

    public func attention(q: Tensor, k: Tensor, v: Tensor, heads: Int, mask: Tensor?, causal: Bool, scale: Float?) throws -> Tensor {
        let (qi, ki, vi) = (unwrap(q), unwrap(k), unwrap(v))
        let y = try inner.attention(q: qi, k: ki, v: vi, heads: heads, mask: mask.map(unwrap), causal: causal, scale: scale)
        // The models that are trained through (the UNet's attention) use neither a mask nor causality.
        let plain = mask == nil && !causal
        try record("attention", inputs: [q, k, v, mask], differentiable: [plain, plain, plain, false], outputs: [y]) { [inner] g in
            let grads = try inner.attentionBackward(g[0]!, q: qi, k: ki, v: vi, heads: heads, scale: scale)
            return [grads.q, grads.k, grads.v, nil]
        }
        return wrap(y)
    }

    public func activation(_ x: Tensor, _ kind: Activation) throws -> Tensor {
        let xi = unwrap(x)
        let y = try inner.activation(xi, kind)
        try record("activation", inputs: [x], differentiable: [kind.hasBackward], outputs: [y]) { [inner] g in
            [try inner.activationBackward(g[0]!, input: xi, kind)]
        }
        return wrap(y)
    }

    public func geglu(_ x: Tensor) throws -> Tensor {
        let xi = unwrap(x)
        let y = try inner.geglu(xi)
        try record("geglu", inputs: [x], differentiable: [true], outputs: [y]) { [inner] g in
            [try inner.gegluBackward(g[0]!, input: xi)]
        }
        return wrap(y)
    }

    public func binary(_ op: BinaryOp, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        let (ai, bi) = (unwrap(a), unwrap(b))
        let y = try inner.binary(op, ai, bi)
        let (needA, needB) = (requiresGradient(a), requiresGradient(b))
        try record("binary.\(op)", inputs: [a, b], differentiable: [true, true], outputs: [y]) { [inner] g in
            let dy = g[0]!
            var da: Tensor?, db: Tensor?
            switch op {
            case .add:
                da = needA ? dy : nil
                db = needB ? dy : nil
            case .sub:
                da = needA ? dy : nil
                db = needB ? try inner.scale(dy, by: -1) : nil
            case .mul:
                da = needA ? try inner.mul(dy, bi) : nil
                db = needB ? try inner.mul(dy, ai) : nil
            case .div:
                // y = a / b:  da = dy / b,  db = −dy·y / b.
                da = needA ? try inner.div(dy, bi) : nil
                db = needB ? try inner.scale(inner.div(inner.mul(dy, y), bi), by: -1) : nil
            }
            return [try da.map { try inner.sumToShape($0, ai.shape) }, try db.map { try inner.sumToShape($0, bi.shape) }]
        }
        return wrap(y)
    }

    public func affine(_ x: Tensor, scale: Float, shift: Float) throws -> Tensor {
        let y = try inner.affine(unwrap(x), scale: scale, shift: shift)
        try record("affine", inputs: [x], differentiable: [true], outputs: [y]) { [inner] g in
            [try inner.scale(g[0]!, by: scale)]
        }
        return wrap(y)
    }

    public func upsampleNearest2x(_ x: Tensor) throws -> Tensor {
        let y = try inner.upsampleNearest2x(unwrap(x))
        try record("upsampleNearest2x", inputs: [x], differentiable: [true], outputs: [y]) { [inner] g in
            [try inner.upsampleNearest2xBackward(g[0]!)]
        }
        return wrap(y)
    }

    public func concat(_ tensors: [Tensor], dim: Int) throws -> Tensor {
        let inners = tensors.map(unwrap)
        let y = try inner.concat(inners, dim: dim)
        let sizes = inners.map { $0.shape[dim < 0 ? dim + $0.rank : dim] }
        try record("concat", inputs: tensors, differentiable: tensors.map { _ in true }, outputs: [y]) { [inner] g in
            try inner.split(g[0]!, sizes: sizes, dim: dim)
        }
        return wrap(y)
    }

    public func split(_ x: Tensor, sizes: [Int], dim: Int) throws -> [Tensor] {
        let parts = try inner.split(unwrap(x), sizes: sizes, dim: dim)
        try record("split", inputs: [x], differentiable: [true], outputs: parts) { [inner] g in
            let filled = try zip(g, parts).map { gradient, part in try gradient ?? inner.zeros(part.shape, dtype: part.dtype) }
            return [try inner.concat(filled, dim: dim)]
        }
        return parts.map(wrap)
    }

    public func permute(_ x: Tensor, _ dims: [Int]) throws -> Tensor {
        let y = try inner.permute(unwrap(x), dims)
        var inverse = [Int](repeating: 0, count: dims.count)
        for (i, d) in dims.enumerated() { inverse[d < 0 ? d + dims.count : d] = i }
        try record("permute", inputs: [x], differentiable: [true], outputs: [y]) { [inner] g in
            [try inner.permute(g[0]!, inverse)]
        }
        return wrap(y)
    }

    public func embedding(_ ids: Tensor, table: Tensor) throws -> Tensor {
        let y = try inner.embedding(unwrap(ids), table: unwrap(table))
        try record("embedding", inputs: [ids, table], differentiable: [false, false], outputs: [y]) { _ in [nil, nil] }
        return wrap(y)
    }

    public func timestepEmbedding(_ t: Tensor, dim: Int, flipSinToCos: Bool, downscaleFreqShift: Float,
                                  scale: Float, maxPeriod: Float) throws -> Tensor {
        let y = try inner.timestepEmbedding(unwrap(t), dim: dim, flipSinToCos: flipSinToCos,
                                            downscaleFreqShift: downscaleFreqShift, scale: scale, maxPeriod: maxPeriod)
        try record("timestepEmbedding", inputs: [t], differentiable: [false], outputs: [y]) { _ in [nil] }
        return wrap(y)
    }

    public func mean(_ x: Tensor, dim: Int, keepDim: Bool) throws -> Tensor {
        let xi = unwrap(x)
        let y = try inner.mean(xi, dim: dim, keepDim: keepDim)
        let axis = dim < 0 ? dim + xi.rank : dim
        try record("mean", inputs: [x], differentiable: [true], outputs: [y]) { [inner] g in
            // Every element of the reduced axis receives dy / n (broadcast back over that axis).
            var kept = xi.shape
            kept[axis] = 1
            let spread = try inner.add(inner.zeros(xi.shape, dtype: g[0]!.dtype), g[0]!.reshaped(kept))
            return [try inner.scale(spread, by: 1 / Float(max(xi.shape[axis], 1)))]
        }
        return wrap(y)
    }

    // MARK: backward ops pass through (a taped backward pass is not itself differentiated)

    public func conv2dBackwardData(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int], stride: (Int, Int),
                                   padding: Padding2D) throws -> Tensor {
        wrap(try inner.conv2dBackwardData(unwrap(gradOutput), weight: unwrap(weight), inputShape: inputShape, stride: stride, padding: padding))
    }
    public func groupNormBackward(_ gradOutput: Tensor, input x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?,
                                  eps: Float, fuseSiLU: Bool) throws -> Tensor {
        wrap(try inner.groupNormBackward(unwrap(gradOutput), input: unwrap(x), groups: groups, weight: weight.map(unwrap),
                                         bias: bias.map(unwrap), eps: eps, fuseSiLU: fuseSiLU))
    }
    public func layerNormBackward(_ gradOutput: Tensor, input x: Tensor, weight: Tensor?, eps: Float,
                                  parameterGradients: Bool) throws -> (input: Tensor, weight: Tensor?, bias: Tensor?) {
        let r = try inner.layerNormBackward(unwrap(gradOutput), input: unwrap(x), weight: weight.map(unwrap), eps: eps,
                                            parameterGradients: parameterGradients)
        return (wrap(r.input), r.weight.map(wrap), r.bias.map(wrap))
    }
    public func softmaxBackward(_ gradOutput: Tensor, output y: Tensor) throws -> Tensor {
        wrap(try inner.softmaxBackward(unwrap(gradOutput), output: unwrap(y)))
    }
    public func activationBackward(_ gradOutput: Tensor, input x: Tensor, _ kind: Activation) throws -> Tensor {
        wrap(try inner.activationBackward(unwrap(gradOutput), input: unwrap(x), kind))
    }
    public func gegluBackward(_ gradOutput: Tensor, input x: Tensor) throws -> Tensor {
        wrap(try inner.gegluBackward(unwrap(gradOutput), input: unwrap(x)))
    }
    public func adamw(parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor, gradient: Tensor,
                      scalars: AdamWScalars) throws -> (parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor) {
        let out = try inner.adamw(parameter: unwrap(parameter), firstMoment: unwrap(firstMoment),
                                  secondMoment: unwrap(secondMoment), gradient: unwrap(gradient), scalars: scalars)
        return (wrap(out.parameter), wrap(out.firstMoment), wrap(out.secondMoment))
    }
    public func sumOfSquares(_ x: Tensor) throws -> Double { try inner.sumOfSquares(unwrap(x)) }
    public func upsampleNearest2xBackward(_ gradOutput: Tensor) throws -> Tensor {
        wrap(try inner.upsampleNearest2xBackward(unwrap(gradOutput)))
    }
}

/// Runs a layer of the UNet, as a gradient checkpoint when its first input is on a `TapedBackend` that
/// checkpoints layers (`TapedBackend.checkpointed`: `inputs` must hold every tensor the layer reads that may take
/// a gradient); otherwise simply runs it.
func checkpointedLayer(_ op: String, _ inputs: [Tensor], _ layer: @escaping ([Tensor]) throws -> Tensor) throws -> Tensor {
    if let tape = inputs[0].backend as? TapedBackend, tape.checkpointsLayers { return try tape.checkpointed(op, inputs, layer) }
    return try layer(inputs)
}
