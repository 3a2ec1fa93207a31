import CKernels

/// The CPU backend's backward ops: the data gradients of the UNet's ops and the layer norm's parameter
/// gradients, each a C kernel of CKernels/cpu/ next to its forward. Arguments are checked with the forward
/// op's rules on the input, and gradOutput must have the forward output's shape.
extension CPUBackend {
    public func conv2dBackwardData(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int], stride: (Int, Int),
                                   padding: Padding2D) throws -> Tensor {
        let op = "conv2dBackwardData"
        try f32(op, gradOutput, weight)
        let outShape = try ShapeRules.backward(op) {
            try ShapeRules.conv2dOutput(inputShape, weight: weight.shape, stride: stride, padding: padding)
        }
        try ShapeRules.requireGradOutput(gradOutput, outShape, op)
        var params = ck_conv2d_params(
            B: Int64(inputShape[0]), Cin: Int64(inputShape[1]), H: Int64(inputShape[2]), W: Int64(inputShape[3]),
            Cout: Int64(weight.shape[0]), kh: Int64(weight.shape[2]), kw: Int64(weight.shape[3]),
            strideH: Int64(stride.0), strideW: Int64(stride.1),
            padTop: Int64(padding.top), padBottom: Int64(padding.bottom), padLeft: Int64(padding.left), padRight: Int64(padding.right))
        let dx = try empty(inputShape, .f32)
        if dx.count == 0 { return dx }
        let workspaceCount = Int(ck_conv2d_workspace_floats(&params))
        let workspace = workspaceCount > 0 ? try CPUStorage(byteCount: workspaceCount * 4) : nil
        ck_conv2d_backward_data_f32(&params, floats(gradOutput), floats(weight), floats(dx),
                                    workspace?.pointer.assumingMemoryBound(to: Float.self))
        return dx
    }

    public func groupNormBackward(_ gradOutput: Tensor, input x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?,
                                  eps: Float, fuseSiLU: Bool) throws -> Tensor {
        let op = "groupNormBackward"
        try f32(op, gradOutput, x, weight, bias)
        let (batch, channels, spatial) = try ShapeRules.groupNorm(x, groups: groups, weight: weight, bias: bias, op: op)
        try ShapeRules.requireGradOutput(gradOutput, x.shape, op)
        let dx = try empty(x.shape, .f32)
        ck_group_norm_backward_f32(floats(gradOutput), floats(x), weight.map(floats), bias.map(floats), floats(dx),
                                   Int64(batch), Int64(channels), Int64(spatial), Int64(groups), eps, fuseSiLU ? 1 : 0)
        return dx
    }

    public func layerNormBackward(_ gradOutput: Tensor, input x: Tensor, weight: Tensor?, eps: Float,
                                  parameterGradients: Bool) throws -> (input: Tensor, weight: Tensor?, bias: Tensor?) {
        let op = "layerNormBackward"
        try f32(op, gradOutput, x, weight)
        let (rows, width) = try ShapeRules.layerNorm(x, weight: weight, bias: nil, op: op)
        try ShapeRules.requireGradOutput(gradOutput, x.shape, op)
        let dx = try empty(x.shape, .f32)
        let dWeight = parameterGradients ? try empty([width], .f32) : nil
        let dBias = parameterGradients ? try empty([width], .f32) : nil
        ck_layer_norm_backward_f32(floats(gradOutput), floats(x), weight.map(floats), floats(dx),
                                   dWeight.map(floats), dBias.map(floats), Int64(rows), Int64(width), eps)
        return (dx, dWeight, dBias)
    }

    public func softmaxBackward(_ gradOutput: Tensor, output y: Tensor) throws -> Tensor {
        let op = "softmaxBackward"
        try f32(op, gradOutput, y)
        try ShapeRules.requireRank(y, 1...8, op, "output")
        try ShapeRules.requireGradOutput(gradOutput, y.shape, op)
        let width = y.shape[y.rank - 1]
        let dx = try empty(y.shape, .f32)
        ck_softmax_backward_f32(floats(gradOutput), floats(y), floats(dx), Int64(y.count / max(width, 1)), Int64(width))
        return dx
    }

    public func activationBackward(_ gradOutput: Tensor, input x: Tensor, _ kind: Activation) throws -> Tensor {
        let op = "activationBackward"
        try f32(op, gradOutput, x)
        try ShapeRules.requireGradOutput(gradOutput, x.shape, op)
        let dx = try empty(x.shape, .f32)
        let n = Int64(x.count)
        switch kind {
        case .gelu: ck_gelu_backward_f32(floats(gradOutput), floats(x), floats(dx), n, Int32(CK_GELU_ERF))
        case .geluTanh: ck_gelu_backward_f32(floats(gradOutput), floats(x), floats(dx), n, Int32(CK_GELU_TANH))
        case .silu: ck_silu_backward_f32(floats(gradOutput), floats(x), floats(dx), n)
        case .quickGELU: throw PEAError.unsupported("\(op): quickGELU has no backward (the UNet does not use it)")
        }
        return dx
    }

    public func gegluBackward(_ gradOutput: Tensor, input x: Tensor) throws -> Tensor {
        let op = "gegluBackward"
        try f32(op, gradOutput, x)
        guard x.rank >= 1, x.shape[x.rank - 1] % 2 == 0 else {
            throw PEAError.shapeMismatch("\(op): the last dimension of \(x.shape) must be even")
        }
        let width = x.shape[x.rank - 1] / 2
        try ShapeRules.requireGradOutput(gradOutput, Array(x.shape.dropLast()) + [width], op)
        let dx = try empty(x.shape, .f32)
        ck_geglu_backward_f32(floats(gradOutput), floats(x), floats(dx), Int64(gradOutput.count / max(width, 1)), Int64(width))
        return dx
    }

    public func upsampleNearest2xBackward(_ gradOutput: Tensor) throws -> Tensor {
        let op = "upsampleNearest2xBackward"
        try f32(op, gradOutput)
        try ShapeRules.requireRank(gradOutput, 4...4, op, "gradOutput")
        let (height, width) = (gradOutput.shape[2], gradOutput.shape[3])
        guard height % 2 == 0, width % 2 == 0 else {
            throw PEAError.shapeMismatch("\(op): gradOutput \(gradOutput.shape) is not the output of a 2× upsampling (odd height or width)")
        }
        let dx = try empty([gradOutput.shape[0], gradOutput.shape[1], height / 2, width / 2], .f32)
        ck_upsample_nearest2x_backward_f32(floats(gradOutput), floats(dx), Int64(gradOutput.shape[0] * gradOutput.shape[1]),
                                           Int64(height / 2), Int64(width / 2))
        return dx
    }
}
