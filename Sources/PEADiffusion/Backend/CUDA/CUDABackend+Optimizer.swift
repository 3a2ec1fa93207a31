import CKernels

/// The optimizer ops on the device (CKernels/cuda/optimizer.cu): the adapter's AdamW step and its gradients'
/// sums of squares, bit for bit the CPU kernels', so training gives the same weights on either backend.
extension CUDABackend {
    public func adamw(parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor, gradient: Tensor,
                      scalars: AdamWScalars) throws -> (parameter: Tensor, firstMoment: Tensor, secondMoment: Tensor) {
        let op = "adamw"
        try requireF32(op, floats(op, parameter, firstMoment, secondMoment, gradient))
        try ShapeRules.adamw(parameter: parameter, firstMoment: firstMoment, secondMoment: secondMoment, gradient: gradient)
        let step = try kernel(for: .adamw, CUDALibrary.AdamWFn.self)
        let p = try empty(parameter.shape, .f32), m = try empty(parameter.shape, .f32), v = try empty(parameter.shape, .f32)
        guard parameter.count > 0 else { return (p, m, v) }
        func f(_ x: Tensor) -> UnsafeMutablePointer<Float>? { pointer(x)?.assumingMemoryBound(to: Float.self) }
        var hyper = scalars.kernelValue
        try check(step(context.handle, f(parameter), f(firstMoment), f(secondMoment), f(gradient), f(p), f(m), f(v),
                       Int64(parameter.count), &hyper), op)
        return (p, m, v)
    }

    public func sumOfSquares(_ x: Tensor) throws -> Double {
        let op = "sumOfSquares"
        try requireF32(op, floats(op, x))
        let sum = try kernel(for: .sumOfSquares, CUDALibrary.SumSquaresFn.self)
        var total = 0.0
        try check(sum(context.handle, pointer(x)?.assumingMemoryBound(to: Float.self), Int64(x.count), &total), op)
        return total
    }

    /// The optimizer ops take f32 only (the adapter's weights and moments).
    private func requireF32(_ op: String, _ dtype: DType) throws {
        guard dtype == .f32 else { throw PEAError.unsupported("\(op): f32 tensors only (the adapter's weights and moments), got \(dtype)") }
    }
}
