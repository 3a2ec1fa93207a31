// PEA-Diffusion's adapter (Ma et al., ECCV 2024; the `MLP` of the authors' train/test scripts): it maps a
// language-specific text encoder's last hidden state [B, L, in] into the conditioning an English Stable
// Diffusion UNet expects.
//   SD1.x form:  layernorm → projector = Linear(no bias) → GELU → Linear(no bias) → … → Linear(no bias)
//                → the sequence [B, L, out] (out = cross_attention_dim, 768 for SD1.5)
//   SDXL form:   the same stack to 1280, then two heads — sequence = fc(GELU(x)) [B, L, 2048] (fc has a bias),
//                pooled = mean of x over the L tokens, padding included [B, 1280] (SDXL's text_embeds)
// GELU is the exact (erf) one, torch's nn.GELU(). The layer norm is nn.LayerNorm (eps 1e-5). Depth and widths
// differ between the released scripts (3 linears of 2048 in training, 5 of 3072 at SD1.5 inference), so they are
// read from the checkpoint: `projector.{0,2,4,…}.weight` (the odd indices are the GELUs), and `fc.*` makes it
// the SDXL form. The released configs have no residual (`use_residual=False`).

/// The PEA adapter, with its shape read from the tensors of its checkpoint.
public struct PEAAdapter {
    /// The encoder width it reads (the layer norm's size).
    public let inputDim: Int
    /// The width of the sequence it produces: the last linear's output (SD1.x form) or fc's (SDXL form).
    public let outputDim: Int
    /// [in, hidden…, stack out]: the widths through the projector.
    public let widths: [Int]
    /// SDXL form: the pooled vector's width (the stack's output, 1280); nil for the SD1.x form.
    public let pooledDim: Int?
    /// Whether this is the SDXL form (it has `fc` and a pooled output).
    public var isSDXL: Bool { fc != nil }
    /// The parameter count.
    public var parameterCount: Int {
        2 * inputDim + zip(widths, widths.dropFirst()).map { $0 * $1 }.reduce(0, +) + (pooledDim.map { ($0 + 1) * outputDim } ?? 0)
    }

    let layerNorm: LayerNorm
    let projector: [Linear]
    let fc: Linear?

    /// The names a PEA adapter may have, for messages.
    static let expectedNames = "layernorm.weight, layernorm.bias, projector.{0,2,4,…}.weight and, for SDXL, fc.weight and fc.bias"

    /// Builds the adapter from the tensors `weights` holds under the official names (`layernorm.*`,
    /// `projector.N.weight`, `fc.*`), inferring its depth and widths from their shapes. Any other tensor, a gap
    /// in the projector's indices, or a width that does not chain is an error naming the tensor.
    public init(weights source: CheckpointWeights, prefix: String = "") throws {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: source.path, reason: reason) }
        let full = { (name: String) in prefix + name }
        func shape(_ name: String, rank: Int) throws -> [Int] {
            guard let shape = source.shape(of: full(name)) else {
                throw fail("missing tensor '\(full(name))' (a PEA adapter has \(PEAAdapter.expectedNames))")
            }
            guard shape.count == rank, shape.allSatisfy({ $0 > 0 }) else {
                throw fail("tensor '\(full(name))' has shape \(shape); a PEA adapter's \(name) is \(rank == 1 ? "a vector" : "a matrix [out, in]")")
            }
            return shape
        }

        // Which tensors are there: everything must be a known name.
        var projectorIndices: [Int] = []
        var hasFC = false
        for name in source.names {
            guard name.hasPrefix(prefix) else {
                throw fail("unexpected tensor '\(name)' (a PEA adapter has \(PEAAdapter.expectedNames))")
            }
            let local = String(name.dropFirst(prefix.count))
            switch local {
            case "layernorm.weight", "layernorm.bias": continue
            case "fc.weight", "fc.bias": hasFC = true; continue
            default: break
            }
            let parts = local.split(separator: ".", omittingEmptySubsequences: false)
            if parts.count == 3, parts[0] == "projector", let index = Int(parts[1]), String(index) == parts[1] {
                guard parts[2] == "weight" else {
                    throw fail("unexpected tensor '\(name)': the PEA adapter's projector linears have no bias")
                }
                guard index % 2 == 0 else {
                    throw fail("unexpected tensor '\(name)': odd projector indices are the GELUs between the linears, which have no parameters")
                }
                projectorIndices.append(index / 2)
                continue
            }
            throw fail("unexpected tensor '\(name)' (a PEA adapter has \(PEAAdapter.expectedNames))")
        }
        projectorIndices.sort()
        guard !projectorIndices.isEmpty else {
            throw fail("missing tensor '\(full("projector.0.weight"))' (a PEA adapter has \(PEAAdapter.expectedNames))")
        }
        for (expected, index) in projectorIndices.enumerated() where expected != index {
            throw fail("missing tensor '\(full("projector.\(2 * expected).weight"))': the projector has 'projector.\(2 * index).weight' after it but no linear in between")
        }

        // Widths: the layer norm's size, then each linear's [out, in] chained.
        let normWidth = try shape("layernorm.weight", rank: 1)[0]
        let normBias = try shape("layernorm.bias", rank: 1)[0]
        guard normBias == normWidth else {
            throw fail("tensor '\(full("layernorm.bias"))' has shape [\(normBias)], but 'layernorm.weight' has [\(normWidth)]")
        }
        var widths = [normWidth]
        for index in projectorIndices {
            let name = "projector.\(2 * index).weight"
            let matrix = try shape(name, rank: 2)
            guard matrix[1] == widths.last! else {
                let from = index == 0 ? "the layer norm's \(normWidth) features" : "the \(widths.last!) outputs of 'projector.\(2 * index - 2).weight'"
                throw fail("tensor '\(full(name))' has shape \(matrix), but its input must match \(from)")
            }
            widths.append(matrix[0])
        }
        var fcOut: Int?
        if hasFC {
            let matrix = try shape("fc.weight", rank: 2)
            guard matrix[1] == widths.last! else {
                throw fail("tensor '\(full("fc.weight"))' has shape \(matrix), but its input must match the projector's \(widths.last!) outputs")
            }
            let bias = try shape("fc.bias", rank: 1)
            guard bias[0] == matrix[0] else {
                throw fail("tensor '\(full("fc.bias"))' has shape \(bias), but 'fc.weight' has \(matrix[0]) outputs")
            }
            fcOut = matrix[0]
        }

        let w = Weights(source, prefix: prefix.isEmpty ? "" : String(prefix.dropLast()))
        self.widths = widths
        inputDim = normWidth
        layerNorm = try LayerNorm(w["layernorm"], dim: normWidth, eps: 1e-5)
        projector = try projectorIndices.map { index in
            try Linear(w["projector.\(2 * index)"], in: widths[index], out: widths[index + 1], bias: false)
        }
        fc = try fcOut.map { try Linear(w["fc"], in: widths.last!, out: $0) }
        pooledDim = fcOut == nil ? nil : widths.last!
        outputDim = fcOut ?? widths.last!
    }

    /// Loads an adapter checkpoint: a safetensors file, or a `torch.save(state_dict)` file (`pytorch_model.bin`,
    /// `.pt`, …, as the authors release them) read natively; a folder holding one of those under a usual name.
    /// Parameters load in `dtype` (f32 by default), whatever the checkpoint stores. Names may carry one common
    /// prefix (`module.`, `proj.`). Input states in another dtype are cast to it; the outputs are in it.
    public static func load(path: String, backend: any ComputeBackend, dtype: DType = .f32) throws -> PEAAdapter {
        var file = path
        if isDirectory(path) {
            let candidates = ["adapter.safetensors", "model.safetensors", "pytorch_model.bin", "adapter.bin", "proj.bin"]
            guard let found = candidates.first(where: { isRegularFile(joinPath(path, $0)) }) else {
                throw PEAError.invalidFile(path: path, reason: "a folder without an adapter checkpoint; tried \(candidates.joined(separator: ", "))")
            }
            file = joinPath(path, found)
        }
        let source = try CheckpointWeights(path: file, backend: backend, dtype: dtype)
        let adapter = try PEAAdapter(weights: source, prefix: try adapterPrefix(source))
        // Checked in the dtype they are used in (a large f32 value is infinite in f16): a NaN weight would only
        // show as a NaN image at the end of generation.
        for (name, tensor) in adapter.namedParameters {
            guard try backend.download(tensor).floats().allSatisfy(\.isFinite) else {
                throw PEAError.invalidFile(path: file, reason: "tensor '\(name)' has values that are not finite in \(dtype)")
            }
        }
        return adapter
    }

    /// states [B, L, inputDim] → (sequence [B, L, outputDim], pooled [B, pooledDim] for the SDXL form).
    public func callAsFunction(_ states: Tensor) throws -> (sequence: Tensor, pooled: Tensor?) {
        let b = states.backend
        guard states.rank == 3, states.shape[2] == inputDim else {
            throw PEAError.shapeMismatch("PEA adapter: states must be [B, L, \(inputDim)], got \(states.shape)")
        }
        let dtype = layerNorm.weight.dtype
        var x = try layerNorm(states.dtype == dtype ? states : b.cast(states, to: dtype))   // [B, L, in]
        for (i, linear) in projector.enumerated() {
            if i > 0 { x = try b.activation(x, .gelu) }
            x = try linear(x)                                            // [B, L, widths[i + 1]]
        }
        guard let fc else { return (x, nil) }
        let sequence = try fc(b.activation(x, .gelu))                    // [B, L, outputDim]
        let pooled = try b.mean(x, dim: 1, keepDim: false)               // [B, pooledDim]
        return (sequence, pooled)
    }

    /// Every parameter under its official name (`layernorm.weight`, `layernorm.bias`, `projector.{0,2,…}.weight`,
    /// `fc.weight`, `fc.bias`), in that order.
    public var namedParameters: [(name: String, tensor: Tensor)] {
        var named: [(name: String, tensor: Tensor)] = [("layernorm.weight", layerNorm.weight), ("layernorm.bias", layerNorm.bias)]
        for (i, linear) in projector.enumerated() { named.append(("projector.\(2 * i).weight", linear.weight)) }
        if let fc {
            named.append(("fc.weight", fc.weight))
            if let bias = fc.bias { named.append(("fc.bias", bias)) }
        }
        return named
    }

    /// The same adapter over new parameter tensors, by official name (an optimizer step's result); each must
    /// have the shape of the parameter it replaces.
    public func replacingParameters(_ parameters: [String: Tensor]) throws -> PEAAdapter {
        func take(_ name: String, _ old: Tensor) throws -> Tensor {
            guard let new = parameters[name] else { throw PEAError.shapeMismatch("PEA adapter: no new value for '\(name)'") }
            guard new.shape == old.shape else {
                throw PEAError.shapeMismatch("PEA adapter: '\(name)' must keep its shape \(old.shape), got \(new.shape)")
            }
            return new
        }
        let norm = LayerNorm(weight: try take("layernorm.weight", layerNorm.weight), bias: try take("layernorm.bias", layerNorm.bias), eps: layerNorm.eps)
        let linears = try projector.enumerated().map { i, linear in
            Linear(weight: try take("projector.\(2 * i).weight", linear.weight), bias: nil)
        }
        let head = try fc.map { fc in
            Linear(weight: try take("fc.weight", fc.weight), bias: try fc.bias.map { try take("fc.bias", $0) })
        }
        return PEAAdapter(layerNorm: norm, projector: linears, fc: head)
    }

    /// A freshly initialised adapter as torch initialises the official `MLP`: LayerNorm weight 1, bias 0; each
    /// linear (and fc) uniform in ±1/√fan_in (nn.Linear's default), from a seeded generator. `widths` is
    /// [in, hidden…, stack out]; `fcOutput` makes it the SDXL form.
    public static func initialized(widths: [Int], fcOutput: Int? = nil, backend: any ComputeBackend, seed: UInt64) throws -> PEAAdapter {
        guard widths.count >= 2, widths.allSatisfy({ $0 > 0 }), fcOutput.map({ $0 > 0 }) ?? true else {
            throw PEAError.usage("PEA adapter: widths must be at least [in, out], all positive, got \(widths)")
        }
        var random = SplitMix64(seed: seed)
        func uniform(_ count: Int, bound: Float) -> [Float] { (0..<count).map { _ in (Float(random.uniform()) * 2 - 1) * bound } }
        func linear(_ input: Int, _ output: Int, bias: Bool) throws -> Linear {
            let bound = 1 / Float(input).squareRoot()
            return Linear(weight: try backend.upload(uniform(output * input, bound: bound), shape: [output, input]),
                          bias: bias ? try backend.upload(uniform(output, bound: bound), shape: [output]) : nil)
        }
        let norm = LayerNorm(weight: try backend.upload([Float](repeating: 1, count: widths[0]), shape: [widths[0]]),
                             bias: try backend.upload([Float](repeating: 0, count: widths[0]), shape: [widths[0]]), eps: 1e-5)
        let linears = try zip(widths, widths.dropFirst()).map { try linear($0, $1, bias: false) }
        let head = try fcOutput.map { try linear(widths.last!, $0, bias: true) }
        return PEAAdapter(layerNorm: norm, projector: linears, fc: head)
    }

    /// The memberwise form; widths are read from the tensors.
    init(layerNorm: LayerNorm, projector: [Linear], fc: Linear?) {
        self.layerNorm = layerNorm
        self.projector = projector
        self.fc = fc
        widths = [layerNorm.weight.shape[0]] + projector.map { $0.weight.shape[0] }
        inputDim = widths[0]
        pooledDim = fc == nil ? nil : widths.last!
        outputDim = fc?.weight.shape[0] ?? widths.last!
    }

    /// The one prefix before `layernorm.weight` ("" for the official checkpoints).
    static func adapterPrefix(_ source: CheckpointWeights) throws -> String {
        let matches = source.names.filter { $0 == "layernorm.weight" || $0.hasSuffix(".layernorm.weight") }
        guard matches.count == 1 else {
            if matches.isEmpty {
                throw PEAError.invalidFile(path: source.path, reason: "missing tensor 'layernorm.weight': not a PEA adapter (it has \(PEAAdapter.expectedNames))")
            }
            throw PEAError.invalidFile(path: source.path, reason: "several adapters in one file: \(matches.joined(separator: ", "))")
        }
        return String(matches[0].dropLast("layernorm.weight".count))
    }
}
