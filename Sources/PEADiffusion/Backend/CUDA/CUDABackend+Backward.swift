import CKernels

/// The CUDA backend's backward ops (training the PEA adapter through the frozen UNet): each is one call into
/// the pea_cuda library's backward kernels (CKernels/cuda: conv2d.cu, norm.cu, elementwise.cu), which mirror
/// the CPU references `ck_*_backward_f32`. As for the forward ops: float tensors of one dtype (f32, f16 or
/// bf16; f32 accumulation), arguments validated with the forward op's `ShapeRules` plus `gradOutput` shaped
/// like the forward's output, work queued on the context's stream, library failures as `PEAError.backend`
/// naming the op.
extension CUDABackend {
    /// Whether the library exports the kernel of a backward op (`supports(_:dtype:)` asks this).
    func hasBackwardKernel(_ op: Op) -> Bool {
        switch op {
        case .conv2dBackwardData: return library.conv2dBackwardData != nil
        case .groupNormBackward: return library.groupNormBackward != nil
        case .layerNormBackward: return library.layerNormBackward != nil
        case .softmaxBackward: return library.softmaxBackward != nil
        case .activationBackward: return library.activationBackward != nil
        case .gegluBackward: return library.gegluBackward != nil
        case .upsampleNearest2xBackward: return library.upsampleNearest2xBackward != nil
        default: return false
        }
    }

    public func conv2dBackwardData(_ gradOutput: Tensor, weight: Tensor, inputShape: [Int], stride: (Int, Int),
                                   padding: Padding2D) throws -> Tensor {
        let op = "conv2dBackwardData"
        let dtype = try floats(op, gradOutput, weight)
        let outShape = try ShapeRules.backward(op) {
            try ShapeRules.conv2dOutput(inputShape, weight: weight.shape, stride: stride, padding: padding)
        }
        try ShapeRules.requireGradOutput(gradOutput, outShape, op)
        let backward = try function(library.conv2dBackwardData, "pea_cuda_conv2d_backward_data", op)
        var params = ck_conv2d_params(
            B: Int64(inputShape[0]), Cin: Int64(inputShape[1]), H: Int64(inputShape[2]), W: Int64(inputShape[3]),
            Cout: Int64(weight.shape[0]), kh: Int64(weight.shape[2]), kw: Int64(weight.shape[3]),
            strideH: Int64(stride.0), strideW: Int64(stride.1),
            padTop: Int64(padding.top), padBottom: Int64(padding.bottom), padLeft: Int64(padding.left), padRight: Int64(padding.right))
        let dx = try empty(inputShape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, &params, pointer(gradOutput), pointer(weight),
                                   pointer(dx)), op)
        return dx
    }

    public func groupNormBackward(_ gradOutput: Tensor, input x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?,
                                  eps: Float, fuseSiLU: Bool) throws -> Tensor {
        let op = "groupNormBackward"
        let dtype = try floats(op, gradOutput, x, weight, bias)
        let (batch, channels, spatial) = try ShapeRules.groupNorm(x, groups: groups, weight: weight, bias: bias, op: op)
        try ShapeRules.requireGradOutput(gradOutput, x.shape, op)
        let backward = try function(library.groupNormBackward, "pea_cuda_group_norm_backward", op)
        let dx = try empty(x.shape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(x),
                                   weight.map(pointer) ?? nil, bias.map(pointer) ?? nil, pointer(dx),
                                   Int64(batch), Int64(channels), Int64(spatial), Int64(groups), eps, fuseSiLU ? 1 : 0), op)
        return dx
    }

    public func layerNormBackward(_ gradOutput: Tensor, input x: Tensor, weight: Tensor?, eps: Float,
                                  parameterGradients: Bool) throws -> (input: Tensor, weight: Tensor?, bias: Tensor?) {
        let op = "layerNormBackward"
        let dtype = try floats(op, gradOutput, x, weight)
        let (rows, width) = try ShapeRules.layerNorm(x, weight: weight, bias: nil, op: op)
        try ShapeRules.requireGradOutput(gradOutput, x.shape, op)
        let backward = try function(library.layerNormBackward, "pea_cuda_layer_norm_backward", op)
        let dx = try empty(x.shape, dtype)
        let dgamma = try parameterGradients ? empty([width], dtype) : nil
        let dbeta = try parameterGradients ? empty([width], dtype) : nil
        if width == 0 { return (dx, dgamma, dbeta) }
        // With no rows the library still writes dγ = dβ = 0 (empty sums).
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(x),
                                   weight.map(pointer) ?? nil, pointer(dx),
                                   dgamma.map(pointer) ?? nil, dbeta.map(pointer) ?? nil,
                                   Int64(rows), Int64(width), eps), op)
        return (dx, dgamma, dbeta)
    }

    public func softmaxBackward(_ gradOutput: Tensor, output y: Tensor) throws -> Tensor {
        let op = "softmaxBackward"
        let dtype = try floats(op, gradOutput, y)
        try ShapeRules.requireRank(y, 1...8, op, "output")
        try ShapeRules.requireGradOutput(gradOutput, y.shape, op)
        let backward = try function(library.softmaxBackward, "pea_cuda_softmax_backward", op)
        let dx = try empty(y.shape, dtype)
        if dx.count == 0 { return dx }
        let width = y.shape[y.rank - 1]
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(y),
                                   pointer(dx), Int64(y.count / width), Int64(width)), op)
        return dx
    }

    public func activationBackward(_ gradOutput: Tensor, input x: Tensor, _ kind: Activation) throws -> Tensor {
        let op = "activationBackward"
        let dtype = try floats(op, gradOutput, x)
        try ShapeRules.requireGradOutput(gradOutput, x.shape, op)
        let code: Int32
        switch kind {
        case .gelu: code = Int32(PEA_ACT_GELU_ERF)
        case .geluTanh: code = Int32(PEA_ACT_GELU_TANH)
        case .silu: code = Int32(PEA_ACT_SILU)
        case .quickGELU: throw PEAError.unsupported("\(op): quickGELU has no backward (the UNet does not use it)")
        }
        let backward = try function(library.activationBackward, "pea_cuda_activation_backward", op)
        let dx = try empty(x.shape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, code, pointer(gradOutput), pointer(x),
                                   pointer(dx), Int64(x.count)), "\(op) \(kind.rawValue)")
        return dx
    }

    public func gegluBackward(_ gradOutput: Tensor, input x: Tensor) throws -> Tensor {
        let op = "gegluBackward"
        let dtype = try floats(op, gradOutput, x)
        guard x.rank >= 1, x.shape[x.rank - 1] % 2 == 0 else {
            throw PEAError.shapeMismatch("\(op): the last dimension of \(x.shape) must be even")
        }
        let width = x.shape[x.rank - 1] / 2
        try ShapeRules.requireGradOutput(gradOutput, Array(x.shape.dropLast()) + [width], op)
        let backward = try function(library.gegluBackward, "pea_cuda_geglu_backward", op)
        let dx = try empty(x.shape, dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(x),
                                   pointer(dx), Int64(gradOutput.count / width), Int64(width)), op)
        return dx
    }

    public func upsampleNearest2xBackward(_ gradOutput: Tensor) throws -> Tensor {
        let op = "upsampleNearest2xBackward"
        let dtype = try floats(op, gradOutput)
        try ShapeRules.requireRank(gradOutput, 4...4, op, "gradOutput")
        let shape = gradOutput.shape
        guard shape[2] % 2 == 0, shape[3] % 2 == 0 else {
            throw PEAError.shapeMismatch("\(op): gradOutput \(shape) is not the output of a 2× upsampling (odd height or width)")
        }
        let backward = try function(library.upsampleNearest2xBackward, "pea_cuda_upsample_nearest2x_backward", op)
        let dx = try empty([shape[0], shape[1], shape[2] / 2, shape[3] / 2], dtype)
        if dx.count == 0 { return dx }
        try check(backward(context.handle, dtype.kernelCode, pointer(gradOutput), pointer(dx),
                                   Int64(shape[0] * shape[1]), Int64(shape[2] / 2), Int64(shape[3] / 2)), op)
        return dx
    }
}
