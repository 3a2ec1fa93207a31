/// The tensors of an inputs file (`pea eval … --inputs`), read by name, with errors that name the file and the
/// tensor. Floating-point tensors come out in f32 (f16/bf16 are converted); with `floatOnly` false, integer
/// tensors (ids, timesteps) are accepted as they are.
public struct InputTensors {
    public let file: SafeTensorsFile

    public init(path: String) throws { file = try SafeTensorsFile(path: path) }

    public func contains(_ name: String) -> Bool { file.contains(name) }

    /// The tensor on the host.
    public func host(_ name: String, floatOnly: Bool = true) throws -> HostTensor {
        guard file.contains(name) else {
            throw PEAError.invalidFile(path: file.path, reason: "missing input tensor '\(name)'")
        }
        let values = try file.tensor(name)
        if floatOnly && !values.dtype.isFloatingPoint {
            throw PEAError.invalidFile(path: file.path, reason: "input '\(name)' is \(values.dtype), expected floating point")
        }
        return values.dtype == .f16 || values.dtype == .bf16 ? values.converted(to: .f32) : values
    }

    /// The tensor uploaded to `backend`.
    public func tensor(_ name: String, on backend: any ComputeBackend, floatOnly: Bool = true) throws -> Tensor {
        try backend.upload(host(name, floatOnly: floatOnly))
    }

    public func optionalTensor(_ name: String, on backend: any ComputeBackend, floatOnly: Bool = true) throws -> Tensor? {
        file.contains(name) ? try tensor(name, on: backend, floatOnly: floatOnly) : nil
    }
}
