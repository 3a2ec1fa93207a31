import CKernels

/// The optimizer ops on host memory: ck_adamw_f32 on copies of the inputs (ops never modify them), and
/// ck_sum_squares_f32.
extension CPUBackend {
    public func adamw(parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor, gradient: Tensor,
                      scalars: AdamWScalars) throws -> (parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor) {
        try f32("adamw", parameter, firstMoment, secondMoment, gradient)
        try ShapeRules.adamw(parameter: parameter, firstMoment: firstMoment, secondMoment: secondMoment, gradient: gradient)
        let outputs = try [parameter, firstMoment, secondMoment].map { input -> Tensor in
            let copy = try empty(input.shape, .f32)
            pointer(copy).copyMemory(from: pointer(input), byteCount: input.byteCount)
            return copy
        }
        var hyper = scalars.kernelValue
        ck_adamw_f32(floats(outputs[0]), floats(outputs[1]), floats(outputs[2]), floats(gradient), Int64(parameter.count), &hyper)
        return (outputs[0], outputs[1], outputs[2])
    }

    public func sumOfSquares(_ x: Tensor) throws -> Double {
        try f32("sumOfSquares", x)
        return ck_sum_squares_f32(floats(x), Int64(x.count))
    }
}
