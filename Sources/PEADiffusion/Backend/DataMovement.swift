/// A backend that runs data-movement plans: it makes tensors and runs one strided copy
/// (ShapeRules.StridedCopy); concat, split and permute are written once, here, for every such backend.
protocol StridedCopying: ComputeBackend {
    func empty(_ shape: [Int], _ dtype: DType) throws -> Tensor
    /// Throws unless the tensor lives in this backend's memory.
    func own(_ x: Tensor, _ op: String) throws
    func copy(_ copy: ShapeRules.StridedCopy, from source: Tensor, to destination: Tensor, _ op: String) throws
}

extension StridedCopying {
    public func concat(_ tensors: [Tensor], dim: Int) throws -> Tensor {
        for t in tensors { try own(t, "concat") }
        let plan = try ShapeRules.concat(tensors, dim: dim)
        let y = try empty(plan.outputShape, tensors[0].dtype)
        for (t, copy) in zip(tensors, plan.copies) { try self.copy(copy, from: t, to: y, "concat") }
        return y
    }

    public func split(_ x: Tensor, sizes: [Int], dim: Int) throws -> [Tensor] {
        try own(x, "split")
        let plan = try ShapeRules.split(x, sizes: sizes, dim: dim)
        return try zip(plan.outputShapes, plan.copies).map { shape, copy in
            let part = try empty(shape, x.dtype)
            try self.copy(copy, from: x, to: part, "split")
            return part
        }
    }

    public func permute(_ x: Tensor, _ dims: [Int]) throws -> Tensor {
        try own(x, "permute")
        let plan = try ShapeRules.permute(x, dims)
        let y = try empty(plan.outputShape, x.dtype)
        try copy(plan.copy, from: x, to: y, "permute")
        return y
    }
}
