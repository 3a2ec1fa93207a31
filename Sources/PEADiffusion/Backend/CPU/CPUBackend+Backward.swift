import CKernels

/// The CPU backend's backward ops: the data gradients of the UNet's ops and the layer norm's parameter
/// gradients, each a C kernel of CKernels/cpu/ next to its forward. Arguments are checked with the forward
/// op's rules on the input, and gradOutput must have the forward output's shape.
extension CPUBackend {
    public func conv2dBackwardData(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int], stride: (Int, Int),
                                   padding: Padding2D) throws -> Tensor {
        try f32("conv2dBackwardData", gradOutput)
        try f32OrHalfWeight("conv2dBackwardData", weight)
        var plan = try ShapeRules.conv2dBackwardData(gradOutput, weight: weight, inputShape: inputShape, stride: stride, padding: padding)
        let dx = try empty(plan.outputShape, .f32)
        if dx.count == 0 { return dx }
        let workspace = try conv2dWorkspace(&plan.params)
        try check(ck_conv2d_backward_data_f32(&plan.params, floats(gradOutput), pointer(weight), weight.dtype.kernelCode, floats(dx),
                                              workspace?.pointer.assumingMemoryBound(to: Float.self)), "conv2dBackwardData")
        return dx
    }

    public func groupNormBackward(_ gradOutput: Tensor, input x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?,
                                  eps: Float, fuseSiLU: Bool) throws -> Tensor {
        try f32("groupNormBackward", gradOutput, x, weight, bias)
        let (batch, channels, spatial) = try ShapeRules.groupNormBackward(gradOutput, input: x, groups: groups, weight: weight, bias: bias)
        let dx = try empty(x.shape, .f32)
        ck_group_norm_backward_f32(floats(gradOutput), floats(x), weight.map(floats), bias.map(floats), floats(dx),
                                   Int64(batch), Int64(channels), Int64(spatial), Int64(groups), eps, fuseSiLU ? 1 : 0)
        return dx
    }

    public func layerNormBackward(_ gradOutput: Tensor, input x: Tensor, weight: Tensor?, eps: Float,
                                  parameterGradients: Bool) throws -> (input: Tensor, weight: Tensor?, bias: Tensor?) {
        try f32("layerNormBackward", gradOutput, x, weight)
        let (rows, width) = try ShapeRules.layerNormBackward(gradOutput, input: x, weight: weight)
        let dx = try empty(x.shape, .f32)
        let dWeight = parameterGradients ? try empty([width], .f32) : nil
        let dBias = parameterGradients ? try empty([width], .f32) : nil
        ck_layer_norm_backward_f32(floats(gradOutput), floats(x), weight.map(floats), floats(dx),
                                   dWeight.map(floats), dBias.map(floats), Int64(rows), Int64(width), eps)
        return (dx, dWeight, dBias)
    }

    /// ck_attention_backward_f32 (attention.c): the scores recomputed a block of query rows at a time in a
    /// per-thread buffer of at most 4 MB at SD1.5's token counts, where the composed default
    /// (ComputeBackend+Backward.swift) forms Tq×Tk matrices and streams them through memory. It takes every
    /// shape the forward does (no mask, not causal, as the protocol asks), so nothing falls back. dq, dk, dv
    /// are laid out as q, k, v.
    public func attentionBackward(_ gradOutput: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: Int,
                                  scale: Float?) throws -> (q: Tensor, k: Tensor, v: Tensor) {
        let op = "attentionBackward"
        try f32(op, gradOutput, q, k, v)
        var plan = try ShapeRules.backward(op) {
            try ShapeRules.attention(q: q, k: k, v: v, heads: heads, mask: nil, causal: false, scale: scale)
        }
        try ShapeRules.requireGradOutput(gradOutput, plan.outputShape, op)
        let (dq, dk, dv) = (try empty(q.shape, .f32), try empty(k.shape, .f32), try empty(v.shape, .f32))
        plan.params.q = UnsafePointer(floats(q)); plan.params.k = UnsafePointer(floats(k)); plan.params.v = UnsafePointer(floats(v))
        try check(ck_attention_backward_f32(&plan.params, floats(gradOutput), floats(dq), floats(dk), floats(dv)), op)
        return (dq, dk, dv)
    }

    public func softmaxBackward(_ gradOutput: Tensor, output y: Tensor) throws -> Tensor {
        try f32("softmaxBackward", gradOutput, y)
        let (rows, width) = try ShapeRules.softmaxBackward(gradOutput, output: y)
        let dx = try empty(y.shape, .f32)
        ck_softmax_backward_f32(floats(gradOutput), floats(y), floats(dx), Int64(rows), Int64(width))
        return dx
    }

    public func activationBackward(_ gradOutput: Tensor, input x: Tensor, _ kind: Activation) throws -> Tensor {
        try f32("activationBackward", gradOutput, x)
        try ShapeRules.activationBackward(gradOutput, input: x, kind)
        let dx = try empty(x.shape, .f32)
        ck_activation_backward_f32(kind.kernelCode, floats(gradOutput), floats(x), floats(dx), Int64(x.count))
        return dx
    }

    public func gegluBackward(_ gradOutput: Tensor, input x: Tensor) throws -> Tensor {
        try f32("gegluBackward", gradOutput, x)
        let plan = try ShapeRules.gegluBackward(gradOutput, input: x)
        let dx = try empty(x.shape, .f32)
        ck_geglu_backward_f32(floats(gradOutput), floats(x), floats(dx), Int64(plan.rows), Int64(plan.width))
        return dx
    }

    public func upsampleNearest2xBackward(_ gradOutput: Tensor) throws -> Tensor {
        try f32("upsampleNearest2xBackward", gradOutput)
        let plan = try ShapeRules.upsampleNearest2xBackward(gradOutput)
        let dx = try empty(plan.outputShape, .f32)
        ck_upsample_nearest2x_backward_f32(floats(gradOutput), floats(dx), Int64(plan.planes), Int64(plan.height), Int64(plan.width))
        return dx
    }
}
