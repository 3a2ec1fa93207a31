import CKernels

/// A tensor in host memory as plain bytes: what files hold and what crosses a backend's upload/download.
/// Row-major, contiguous, little-endian (the machines Pea runs on).
public struct HostTensor: Equatable, Sendable {
    public var shape: [Int]
    public var dtype: DType
    public var bytes: [UInt8]

    public var count: Int { shape.reduce(1, *) }

    public init(shape: [Int], dtype: DType, bytes: [UInt8]) {
        precondition(bytes.count == shape.reduce(1, *) * dtype.byteSize, "HostTensor: byte count does not match shape")
        self.shape = shape
        self.dtype = dtype
        self.bytes = bytes
    }

    /// An f32 tensor, or values converted to `dtype` (rounded to nearest even for f16/bf16).
    public init(_ values: [Float], shape: [Int], dtype: DType = .f32) {
        precondition(values.count == shape.reduce(1, *), "HostTensor: \(values.count) values for shape \(shape)")
        var bytes = [UInt8](repeating: 0, count: values.count * dtype.byteSize)
        values.withUnsafeBytes { source in
            bytes.withUnsafeMutableBytes { destination in
                _ = ck_convert(source.baseAddress, Int32(CK_F32), destination.baseAddress, dtype.kernelCode, Int64(values.count))
            }
        }
        self.init(shape: shape, dtype: dtype, bytes: bytes)
    }

    /// Integer ids (token ids, timesteps) as i32 or i64.
    public init(ids: [Int], shape: [Int], dtype: DType = .i64) {
        precondition(dtype == .i32 || dtype == .i64, "HostTensor(ids:) needs an integer dtype")
        precondition(ids.count == shape.reduce(1, *), "HostTensor: \(ids.count) ids for shape \(shape)")
        var bytes = [UInt8](repeating: 0, count: ids.count * dtype.byteSize)
        bytes.withUnsafeMutableBytes { destination in
            for (i, id) in ids.enumerated() {
                if dtype == .i64 { destination.storeBytes(of: Int64(id), toByteOffset: i * 8, as: Int64.self) }
                else { destination.storeBytes(of: Int32(truncatingIfNeeded: id), toByteOffset: i * 4, as: Int32.self) }
            }
        }
        self.init(shape: shape, dtype: dtype, bytes: bytes)
    }

    /// The values as f32, whatever the stored dtype (integers converted by value).
    public func floats() -> [Float] {
        var values = [Float](repeating: 0, count: count)
        bytes.withUnsafeBytes { source in
            values.withUnsafeMutableBytes { destination in
                _ = ck_convert(source.baseAddress, dtype.kernelCode, destination.baseAddress, Int32(CK_F32), Int64(count))
            }
        }
        return values
    }

    /// Integer values (i32 or i64 storage) as Int; nil for floating-point tensors.
    public func integers() -> [Int]? {
        switch dtype {
        case .i64: return bytes.withUnsafeBytes { raw in (0..<count).map { Int(raw.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)) } }
        case .i32: return bytes.withUnsafeBytes { raw in (0..<count).map { Int(raw.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)) } }
        default: return nil
        }
    }

    /// The same values stored as `dtype`.
    public func converted(to target: DType) -> HostTensor {
        if target == dtype { return self }
        var out = [UInt8](repeating: 0, count: count * target.byteSize)
        bytes.withUnsafeBytes { source in
            out.withUnsafeMutableBytes { destination in
                _ = ck_convert(source.baseAddress, dtype.kernelCode, destination.baseAddress, target.kernelCode, Int64(count))
            }
        }
        return HostTensor(shape: shape, dtype: target, bytes: out)
    }
}
