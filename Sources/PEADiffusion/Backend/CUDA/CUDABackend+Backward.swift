import CKernels

/// The CUDA backend's backward ops (training the PEA adapter through the frozen UNet): each is one call into
/// the pea_cuda library's backward kernels (CKernels/cuda: conv2d.cu, norm.cu, elementwise.cu), which mirror
/// the CPU references `ck_*_backward_f32`, and attention_backward.cu for `attentionBackward`. As for the forward ops: float tensors of one dtype (f32, f16 or
/// bf16; f32 accumulation), the plan from `ShapeRules` (the forward op's rule plus `gradOutput` shaped like
/// the forward's output), work queued on the context's stream, library failures as `PEAError.backend` naming
/// the op.
extension CUDABackend {
    public func conv2dBackwardData(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int], stride: (Int, Int),
                                   padding: Padding2D) throws -> Tensor {
        let dtype = try floats("conv2dBackwardData", gradOutput, weight)
        var plan = try ShapeRules.conv2dBackwardData(gradOutput, weight: weight, inputShape: inputShape, stride: stride, padding: padding)
        let backward = try kernel(for: .conv2dBackwardData, CUDALibrary.Conv2dBackwardDataFn.self)
        let dx = try empty(plan.outputShape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, &plan.params, pointer(gradOutput), pointer(weight), pointer(dx)),
                  "conv2dBackwardData")
        return dx
    }

    public func groupNormBackward(_ gradOutput: Tensor, input x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?,
                                  eps: Float, fuseSiLU: Bool) throws -> Tensor {
        let dtype = try floats("groupNormBackward", gradOutput, x, weight, bias)
        let (batch, channels, spatial) = try ShapeRules.groupNormBackward(gradOutput, input: x, groups: groups, weight: weight, bias: bias)
        let backward = try kernel(for: .groupNormBackward, CUDALibrary.GroupNormBackwardFn.self)
        let dx = try empty(x.shape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(x),
                           weight.map(pointer) ?? nil, bias.map(pointer) ?? nil, pointer(dx),
                           Int64(batch), Int64(channels), Int64(spatial), Int64(groups), eps, fuseSiLU ? 1 : 0), "groupNormBackward")
        return dx
    }

    public func layerNormBackward(_ gradOutput: Tensor, input x: Tensor, weight: Tensor?, eps: Float,
                                  parameterGradients: Bool) throws -> (input: Tensor, weight: Tensor?, bias: Tensor?) {
        let dtype = try floats("layerNormBackward", gradOutput, x, weight)
        let (rows, width) = try ShapeRules.layerNormBackward(gradOutput, input: x, weight: weight)
        let backward = try kernel(for: .layerNormBackward, CUDALibrary.LayerNormBackwardFn.self)
        let dx = try empty(x.shape, dtype)
        let dgamma = try parameterGradients ? empty([width], dtype) : nil
        let dbeta = try parameterGradients ? empty([width], dtype) : nil
        if width == 0 { return (dx, dgamma, dbeta) }
        // With no rows the library still writes dγ = dβ = 0 (empty sums).
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(x),
                           weight.map(pointer) ?? nil, pointer(dx), dgamma.map(pointer) ?? nil, dbeta.map(pointer) ?? nil,
                           Int64(rows), Int64(width), eps), "layerNormBackward")
        return (dx, dgamma, dbeta)
    }

    /// attention_backward.cu (FlashAttention-2 style: no Tq×Tk scores in memory) when the library has it and the
    /// head dims fit its limit, else the composed default (ComputeBackend+Backward.swift). dq, dk, dv come out
    /// in the inputs' dtype, laid out as q, k, v.
    public func attentionBackward(_ gradOutput: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: Int,
                                  scale: Float?) throws -> (q: Tensor, k: Tensor, v: Tensor) {
        let op = "attentionBackward"
        let dtype = try floats(op, gradOutput, q, k, v)
        var plan = try ShapeRules.backward(op) {
            try ShapeRules.attention(q: q, k: k, v: v, heads: heads, mask: nil, causal: false, scale: scale)
        }
        try ShapeRules.requireGradOutput(gradOutput, plan.outputShape, op)
        let limit = Int(PEA_CUDA_ATTENTION_BACKWARD_MAX_D)
        guard let backward = attentionBackwardFunction, plan.shape.headDim <= limit, plan.shape.valueHeadDim <= limit else {
            return try composedAttentionBackward(gradOutput, q: q, k: k, v: v, heads: heads, scale: scale)
        }
        let (dq, dk, dv) = (try empty(q.shape, dtype), try empty(k.shape, dtype), try empty(v.shape, dtype))
        bindAttentionInputs(&plan.params, q: q, k: k, v: v, mask: nil)   // dq, dk, dv are written with q, k, v's strides
        try check(backward(context.handle, dtype.kernelCode, &plan.params, pointer(gradOutput), pointer(dq), pointer(dk), pointer(dv)),
                  op)
        return (dq, dk, dv)
    }

    public func softmaxBackward(_ gradOutput: Tensor, output y: Tensor) throws -> Tensor {
        let dtype = try floats("softmaxBackward", gradOutput, y)
        let (rows, width) = try ShapeRules.softmaxBackward(gradOutput, output: y)
        let backward = try kernel(for: .softmaxBackward, CUDALibrary.SoftmaxBackwardFn.self)
        let dx = try empty(y.shape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(y), pointer(dx), Int64(rows), Int64(width)),
                  "softmaxBackward")
        return dx
    }

    public func activationBackward(_ gradOutput: Tensor, input x: Tensor, _ kind: Activation) throws -> Tensor {
        let dtype = try floats("activationBackward", gradOutput, x)
        try ShapeRules.activationBackward(gradOutput, input: x, kind)
        let backward = try kernel(for: .activationBackward, CUDALibrary.ActivationBackwardFn.self)
        let dx = try empty(x.shape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, kind.kernelCode, pointer(gradOutput), pointer(x), pointer(dx), Int64(x.count)),
                  "activationBackward \(kind.rawValue)")
        return dx
    }

    public func gegluBackward(_ gradOutput: Tensor, input x: Tensor) throws -> Tensor {
        let dtype = try floats("gegluBackward", gradOutput, x)
        let plan = try ShapeRules.gegluBackward(gradOutput, input: x)
        let backward = try kernel(for: .gegluBackward, CUDALibrary.GegluBackwardFn.self)
        let dx = try empty(x.shape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(x), pointer(dx), Int64(plan.rows), Int64(plan.width)),
                  "gegluBackward")
        return dx
    }

    public func upsampleNearest2xBackward(_ gradOutput: Tensor) throws -> Tensor {
        let dtype = try floats("upsampleNearest2xBackward", gradOutput)
        let plan = try ShapeRules.upsampleNearest2xBackward(gradOutput)
        let backward = try kernel(for: .upsampleNearest2xBackward, CUDALibrary.UpsampleBackwardFn.self)
        let dx = try empty(plan.outputShape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(dx), Int64(plan.planes),
                           Int64(plan.height), Int64(plan.width)), "upsampleNearest2xBackward")
        return dx
    }
}
