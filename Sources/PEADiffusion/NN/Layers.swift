// The torch.nn layers the diffusers models are made of, holding their parameters as backend tensors.
// Each reads its parameters under the names torch gives them (`weight`, `bias`).

/// torch.nn.Linear: x [..., in] → x·Wᵀ + b, W [out, in].
public struct Linear {
    public let weight: Tensor
    public let bias: Tensor?

    public init(_ w: Weights, in inFeatures: Int, out outFeatures: Int, bias hasBias: Bool = true) throws {
        weight = try w.matrix("weight", [outFeatures, inFeatures])
        bias = hasBias ? try w.tensor("bias", [outFeatures]) : nil
    }

    /// A layer over given parameter tensors (a trained adapter's updated weights).
    public init(weight: Tensor, bias: Tensor?) {
        self.weight = weight
        self.bias = bias
    }

    /// With `residual` (the output's shape), x·Wᵀ + b + residual: one op where the backend fuses it.
    public func callAsFunction(_ x: Tensor, residual: Tensor? = nil) throws -> Tensor {
        try x.backend.linear(x, weight: weight, bias: bias, residual: residual)
    }
}

/// torch.nn.Conv2d (no groups, no dilation), NCHW, with padding per side.
public struct Conv2d {
    public let weight: Tensor
    public let bias: Tensor?
    public let stride: Int
    public let padding: Padding2D

    public init(_ w: Weights, in inChannels: Int, out outChannels: Int, kernel: Int, stride: Int = 1,
                padding: Padding2D, bias hasBias: Bool = true) throws {
        weight = try w.matrix("weight", [outChannels, inChannels, kernel, kernel])
        bias = hasBias ? try w.tensor("bias", [outChannels]) : nil
        self.stride = stride
        self.padding = padding
    }

    /// The common case: a k×k kernel with "same" padding k/2.
    public init(_ w: Weights, in inChannels: Int, out outChannels: Int, kernel: Int, stride: Int = 1) throws {
        try self.init(w, in: inChannels, out: outChannels, kernel: kernel, stride: stride, padding: .uniform(kernel / 2))
    }

    /// With `residual` (the output's shape), conv(x) + b + residual: one op where the backend fuses it.
    public func callAsFunction(_ x: Tensor, residual: Tensor? = nil) throws -> Tensor {
        try x.backend.conv2d(x, weight: weight, bias: bias, stride: (stride, stride), padding: padding, residual: residual)
    }
}

/// torch.nn.GroupNorm with affine parameters; `silu` fuses the SiLU that follows it in most diffusers blocks.
public struct GroupNorm {
    public let groups: Int
    public let eps: Float
    public let weight: Tensor
    public let bias: Tensor

    public init(_ w: Weights, groups: Int, channels: Int, eps: Float) throws {
        guard groups > 0, channels % groups == 0 else {
            throw PEAError.shapeMismatch("\(w.prefix): \(channels) channels do not split into \(groups) groups")
        }
        self.groups = groups
        self.eps = eps
        weight = try w.tensor("weight", [channels])
        bias = try w.tensor("bias", [channels])
    }

    public func callAsFunction(_ x: Tensor, silu: Bool = false) throws -> Tensor {
        try x.backend.groupNorm(x, groups: groups, weight: weight, bias: bias, eps: eps, fuseSiLU: silu)
    }
}

/// torch.nn.LayerNorm over the last dimension, with affine parameters.
public struct LayerNorm {
    public let eps: Float
    public let weight: Tensor
    public let bias: Tensor

    public init(_ w: Weights, dim: Int, eps: Float = 1e-5) throws {
        self.eps = eps
        weight = try w.tensor("weight", [dim])
        bias = try w.tensor("bias", [dim])
    }

    /// A layer over given parameter tensors (a trained adapter's updated weights).
    public init(weight: Tensor, bias: Tensor, eps: Float = 1e-5) {
        self.eps = eps
        self.weight = weight
        self.bias = bias
    }

    public func callAsFunction(_ x: Tensor) throws -> Tensor {
        try x.backend.layerNorm(x, weight: weight, bias: bias, eps: eps)
    }
}
