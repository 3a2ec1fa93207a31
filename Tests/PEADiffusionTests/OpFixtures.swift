import Foundation
@testable import PEADiffusion

/// One op-level reference case written by tools/reference/make_op_fixtures.py with torch:
/// tensors `in.<name>` and `out.<name>`, and metadata `op` and `params` (a JSON object).
struct OpFixture {
    let name: String
    let op: String
    let params: [String: Any]
    let inputs: [String: HostTensor]
    let outputs: [String: HostTensor]

    init(path: String) throws {
        let file = try SafeTensorsFile(path: path)
        name = String(path.split(separator: "/").last!.dropLast(".safetensors".count))
        guard let op = file.metadata["op"], let paramsText = file.metadata["params"],
              let params = try JSONSerialization.jsonObject(with: Data(paramsText.utf8)) as? [String: Any] else {
            throw PEAError.invalidFile(path: path, reason: "fixture without 'op' and 'params' metadata")
        }
        self.op = op
        self.params = params
        var inputs: [String: HostTensor] = [:], outputs: [String: HostTensor] = [:]
        for tensorName in file.names {
            if tensorName.hasPrefix("in.") { inputs[String(tensorName.dropFirst(3))] = try file.tensor(tensorName) }
            if tensorName.hasPrefix("out.") { outputs[String(tensorName.dropFirst(4))] = try file.tensor(tensorName) }
        }
        self.inputs = inputs
        self.outputs = outputs
    }

    /// Every fixture in Tests/Fixtures/ops, sorted by name.
    static func all() throws -> [OpFixture] {
        let directory = fixturesDirectory() + "/ops"
        let names = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".safetensors") }.sorted()
        return try names.map { try OpFixture(path: directory + "/" + $0) }
    }

    func int(_ key: String) -> Int { (params[key] as! NSNumber).intValue }
    func float(_ key: String) -> Float { (params[key] as! NSNumber).floatValue }
    func flag(_ key: String) -> Bool { int(key) != 0 }
    func ints(_ key: String) -> [Int] { (params[key] as! [NSNumber]).map(\.intValue) }

    /// Runs the case's op on `backend` and returns its outputs by name, downloaded to the host.
    func run(on backend: any ComputeBackend) throws -> [String: HostTensor] {
        func input(_ key: String) throws -> Tensor { try backend.upload(inputs[key]!) }
        func optionalInput(_ key: String) throws -> Tensor? { try inputs[key].map(backend.upload) }
        func single(_ tensor: Tensor) throws -> [String: HostTensor] { ["y": try backend.download(tensor)] }

        switch op {
        case "gemm":
            return try single(backend.gemm(input("a"), input("b"), transposeA: flag("transA"), transposeB: flag("transB"),
                                           alpha: float("alpha"), beta: float("beta"), c: input("c")))
        case "linear":
            return try single(backend.linear(input("x"), weight: input("weight"), bias: optionalInput("bias")))
        case "conv2d":
            let stride = ints("stride"), padding = ints("padding")
            return try single(backend.conv2d(input("x"), weight: input("weight"), bias: optionalInput("bias"),
                                             stride: (stride[0], stride[1]),
                                             padding: Padding2D(top: padding[0], bottom: padding[1], left: padding[2], right: padding[3])))
        case "group_norm":
            return try single(backend.groupNorm(input("x"), groups: int("groups"), weight: input("weight"), bias: input("bias"),
                                                eps: float("eps"), fuseSiLU: flag("silu")))
        case "layer_norm":
            return try single(backend.layerNorm(input("x"), weight: input("weight"), bias: input("bias"), eps: float("eps")))
        case "softmax":
            return try single(backend.softmax(input("x")))
        case "attention":
            let scale = (params["scale"] as? NSNumber)?.floatValue
            return try single(backend.attention(q: input("q"), k: input("k"), v: input("v"), heads: int("heads"),
                                                mask: optionalInput("mask"), causal: flag("causal"), scale: scale))
        case "gelu":
            let kind: Activation = (params["approximate"] as? String) == "tanh" ? .geluTanh : .gelu
            return try single(backend.activation(input("x"), kind))
        case "quick_gelu":
            return try single(backend.activation(input("x"), .quickGELU))
        case "silu":
            return try single(backend.activation(input("x"), .silu))
        case "geglu":
            return try single(backend.geglu(input("x")))
        case "binary":
            let op = BinaryOp(rawValue: params["op"] as! String)!
            return try single(backend.binary(op, input("a"), input("b")))
        case "affine":
            return try single(backend.affine(input("x"), scale: float("alpha"), shift: float("beta")))
        case "upsample_nearest2x":
            return try single(backend.upsampleNearest2x(input("x")))
        case "concat":
            let parts = try inputs.keys.sorted { Int($0)! < Int($1)! }.map(input)
            return try single(backend.concat(parts, dim: int("dim")))
        case "split":
            let parts = try backend.split(input("x"), sizes: ints("sizes"), dim: int("dim"))
            var outputs: [String: HostTensor] = [:]
            for (index, part) in parts.enumerated() { outputs["\(index)"] = try backend.download(part) }
            return outputs
        case "permute":
            return try single(backend.permute(input("x"), ints("dims")))
        case "embedding":
            return try single(backend.embedding(input("ids"), table: input("table")))
        case "timestep_embedding":
            return try single(backend.timestepEmbedding(input("t"), dim: int("dim"), flipSinToCos: flag("flip_sin_to_cos"),
                                                        downscaleFreqShift: float("downscale_freq_shift"),
                                                        scale: float("scale"), maxPeriod: float("max_period")))
        case "mean":
            return try single(backend.mean(input("x"), dim: int("dim"), keepDim: flag("keepdim")))
        case "convert":
            let x = try input("x")
            return ["f16": try backend.download(backend.cast(x, to: .f16)),
                    "bf16": try backend.download(backend.cast(x, to: .bf16))]
        default:
            throw PEAError.unsupported("fixture \(name): unknown op '\(op)'")
        }
    }
}
