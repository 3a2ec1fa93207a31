#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import CZlib

// Files written by `torch.save(state_dict, path)` (torch ≥ 1.6, torch/serialization.py `_save`), read without
// Python and without running anything from the file.
//
// The format: a zip archive whose entries torch writes uncompressed ("stored"), all under one folder named
// after the file (`pytorch_model/…` for pytorch_model.bin, `archive/…` for a buffer):
//   <folder>/data.pkl      the object, pickled (protocol 2 by default); each tensor's bytes are referenced by a
//                          persistent id ('storage', torch.FloatStorage, key, location, element count)
//   <folder>/data/<key>    one storage's raw little-endian bytes
//   <folder>/byteorder     "little" (torch ≥ 2.1), <folder>/version, .format_version, .storage_alignment, …
// A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`;
// a state dict is a `collections.OrderedDict` of tensors whose `_metadata` attribute is restored by BUILD.
//
// The unpickler (TorchUnpickler.swift) is a small, closed interpreter: it knows the opcodes such files use and
// the exact callables torch state dicts reference (an allow-list of names, never looked up or called as code).
// Any other global, INST/OBJ, BUILD on anything but a dict, or an unknown opcode is rejected with an error naming
// the file, the opcode and the class. Containers cannot be modified once they are inside another container, so the
// object graph has no cycles and a bounded depth.

/// Where one tensor of a torch checkpoint lies: its storage record, element offset and strides (in elements).
public struct TorchTensorInfo: Equatable, Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let strides: [Int]
    public let storageOffset: Int
    /// The storage's key: its bytes are the record `<folder>/data/<key>`.
    public let storageKey: String
    /// The storage's length in elements, as the persistent id declares it.
    public let storageElementCount: Int

    public var elementCount: Int { shape.reduce(1, *) }

    /// Row-major without gaps (how the tensor will be returned; other layouts are gathered element by element).
    public var isContiguous: Bool {
        var expected = 1
        for axis in stride(from: shape.count - 1, through: 0, by: -1) where shape[axis] != 1 {
            if strides[axis] != expected { return false }
            expected *= shape[axis]
        }
        return true
    }
}

/// A `torch.save` zip file, mapped read-only. Opening it reads the zip's central directory and unpickles
/// `data.pkl` (with the restricted unpickler) into tensor descriptions; tensor bytes are read when asked for
/// (`tensor`), gathered into a contiguous row-major copy when the tensor was saved as a strided view.
/// Immutable after `init`, so it may be shared between threads.
///
/// Accepted objects: a dict (or OrderedDict) of tensors, or a training checkpoint dict whose "state_dict"
/// entry is one (cn_clip, PyTorch Lightning); the other entries of such a checkpoint may be numbers, strings,
/// lists, tuples and dicts of those, and are ignored.
public final class TorchCheckpointFile: @unchecked Sendable {
    public let path: String
    /// Every tensor name, sorted.
    public let names: [String]
    /// The folder every record of the archive lies in (the saved file's stem, e.g. "pytorch_model").
    public let archiveFolder: String

    private let bytes: MappedBytes
    private let records: [String: ZipRecord]
    private let infos: [String: TorchTensorInfo]
    private let lock = PThreadLock()
    private var checkedRecords: Set<String> = []

    /// Maps and parses the file.
    /// - Throws: `PEAError.invalidFile(path:reason:)` naming the file and the record, opcode, class or tensor.
    public convenience init(path: String) throws {
        try self.init(bytes: MappedBytes(path: path), path: path)
    }

    /// Parses a file image held in memory (`path` is only used in messages).
    public convenience init(bytes: [UInt8], path: String) throws {
        try self.init(bytes: MappedBytes(copying: bytes), path: path)
    }

    private init(bytes: MappedBytes, path: String) throws {
        self.path = path
        self.bytes = bytes
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        let buffer = bytes.buffer
        guard buffer.count > 0 else { throw fail("the file is empty") }

        let zipMagic: [UInt8] = [0x50, 0x4B, 0x03, 0x04]
        let emptyZipMagic: [UInt8] = [0x50, 0x4B, 0x05, 0x06]
        let head = Array(buffer.prefix(4))
        guard head == zipMagic || head == emptyZipMagic else {
            if head.first == 0x80 {
                throw fail("not a zip archive but a bare pickle: the legacy torch.save format (torch < 1.6, or _use_new_zipfile_serialization=False) or a plain pickle; Pea reads only the zip format, so re-save it with torch >= 1.6 (torch.save(torch.load(path), path))")
            }
            throw fail("not a torch.save file: it does not start with a zip header (PK\\x03\\x04)")
        }
        records = try ZipDirectory.read(buffer, fail: fail)

        // The one folder holding data.pkl.
        let pickles = records.keys.filter { $0.hasSuffix("/data.pkl") && $0.split(separator: "/", omittingEmptySubsequences: false).count == 2 }
        guard pickles.count == 1, let pickleName = pickles.first else {
            if pickles.isEmpty {
                throw fail("the zip archive has no <folder>/data.pkl record: not a torch.save file")
            }
            throw fail("the zip archive has several data.pkl records (\(pickles.sorted().joined(separator: ", "))): not a torch.save file")
        }
        let folder = String(pickleName.dropLast("/data.pkl".count))
        archiveFolder = folder
        if records["\(folder)/constants.pkl"] != nil || records.keys.contains(where: { $0.hasPrefix("\(folder)/code/") }) {
            throw fail("a TorchScript archive (torch.jit.save), not a torch.save(state_dict) file")
        }
        if let order = records["\(folder)/byteorder"] {
            let text = String(decoding: try order.contents(buffer, path: path, verify: true), as: UTF8.self)
            guard text == "little" else {
                throw fail("record '\(folder)/byteorder' says \"\(text)\": Pea reads only little-endian checkpoints")
            }
        }
        guard let pickleRecord = records[pickleName] else { throw fail("missing \(pickleName)") }
        let pickle = Array(try pickleRecord.contents(buffer, path: path, verify: true))
        let root = try TorchUnpickler.run(pickle, context: "\(pickleName)", fail: fail)
        let tensors = try TorchUnpickler.stateDict(from: root, fail: fail)

        var infos: [String: TorchTensorInfo] = [:]
        for (name, tensor) in tensors {
            let key = tensor.storage.key
            guard let record = records["\(folder)/data/\(key)"] else {
                throw fail("tensor '\(name)': its storage record '\(folder)/data/\(key)' is missing from the archive")
            }
            let needed = try CheckedSize.product(tensor.storage.elementCount, tensor.storage.dtype.byteSize,
                                                 "tensor '\(name)': the byte size of storage '\(key)'", fail: fail)
            guard record.size >= needed else {
                throw fail("tensor '\(name)': storage record '\(folder)/data/\(key)' holds \(record.size) bytes, less than the \(tensor.storage.elementCount) \(tensor.storage.dtype) elements its header declares")
            }
            infos[name] = TorchTensorInfo(name: name, dtype: tensor.storage.dtype, shape: tensor.shape, strides: tensor.strides,
                                          storageOffset: tensor.offset, storageKey: key,
                                          storageElementCount: tensor.storage.elementCount)
        }
        self.infos = infos
        names = infos.keys.sorted()
    }

    public func contains(_ name: String) -> Bool { infos[name] != nil }

    public func info(_ name: String) throws -> TorchTensorInfo {
        guard let info = infos[name] else {
            throw PEAError.invalidFile(path: path, reason: "no tensor named '\(name)'")
        }
        return info
    }

    /// A contiguous row-major copy of the tensor in its stored dtype.
    public func tensor(_ name: String) throws -> HostTensor {
        let info = try info(name)
        let recordName = "\(archiveFolder)/data/\(info.storageKey)"
        guard let record = records[recordName] else {
            throw PEAError.invalidFile(path: path, reason: "tensor '\(name)': record '\(recordName)' is missing")
        }
        let verify = lock.withLock { !checkedRecords.contains(recordName) }
        let storage = try record.contents(bytes.buffer, path: path, verify: verify)
        if verify { lock.withLock { _ = checkedRecords.insert(recordName) } }
        let size = info.dtype.byteSize
        var out = [UInt8](repeating: 0, count: info.elementCount * size)
        if info.elementCount == 0 { return HostTensor(shape: info.shape, dtype: info.dtype, bytes: out) }
        return withExtendedLifetime(bytes) {
            out.withUnsafeMutableBytes { destination in
                if info.isContiguous {
                    destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: storage[(info.storageOffset * size)..<((info.storageOffset + info.elementCount) * size)]))
                    return
                }
                // Gather: walk the output in row-major order, keeping the source element index in step.
                let rank = info.shape.count
                var index = [Int](repeating: 0, count: rank)
                var source = info.storageOffset
                for element in 0..<info.elementCount {
                    (destination.baseAddress! + element * size).copyMemory(from: storage.baseAddress! + source * size, byteCount: size)
                    var axis = rank - 1
                    while axis >= 0 {
                        index[axis] += 1
                        source += info.strides[axis]
                        if index[axis] < info.shape[axis] { break }
                        source -= info.strides[axis] * info.shape[axis]
                        index[axis] = 0
                        axis -= 1
                    }
                }
            }
            return HostTensor(shape: info.shape, dtype: info.dtype, bytes: out)
        }
    }
}

public enum TorchCheckpoint {
    /// Every tensor of a `torch.save(state_dict)` file, as contiguous host tensors in their stored dtypes.
    public static func read(path: String) throws -> [String: HostTensor] {
        let file = try TorchCheckpointFile(path: path)
        var tensors: [String: HostTensor] = [:]
        for name in file.names { tensors[name] = try file.tensor(name) }
        return tensors
    }

    /// Whether the file starts like something torch.save writes — a zip archive, or a pickle (the legacy
    /// format) — rather than a safetensors file (whose first 8 bytes are a header length).
    public static func looksLikeTorchSave(path: String) -> Bool {
        // Not a regular file (or unreadable): not torch; the safetensors reader then names the problem.
        guard let (descriptor, _) = try? openRegularFile(path) else { return false }
        defer { close(descriptor) }
        var head = [UInt8](repeating: 0, count: 9)
        let count = head.withUnsafeMutableBytes { posixRead(descriptor, $0.baseAddress, 9) }
        // A safetensors file starts with its header's length (8 bytes, little-endian) and then "{"; that length
        // may well begin with 0x80 (a 384-byte header does), which is also pickle's PROTO opcode.
        if count == 9 && head[8] == UInt8(ascii: "{") && head[6] == 0 && head[7] == 0 { return false }
        return (count >= 4 && head[0] == 0x50 && head[1] == 0x4B) || (count >= 1 && head[0] == 0x80)
    }
}

// MARK: - Weight sources over checkpoint files

/// Parameters for a model from either file format: a safetensors file (or sharded index), or a torch.save
/// state dict (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`). Uploads to `backend` in `dtype` (f32 by default,
/// f16/bf16 for the CUDA backend's reduced precision), converting whatever the file stores.
/// Knows every tensor's shape before loading it, so a model can infer its sizes from the file (the PEA adapter
/// does). Names can be rewritten (`rename`: the file's name → the model's name); records which tensors were used.
public final class CheckpointWeights: WeightSource {
    public let backend: any ComputeBackend
    /// The file opened.
    public let path: String
    /// The dtype every parameter is uploaded in.
    public let dtype: DType
    /// The model's names of every tensor (after `rename`), sorted.
    public let names: [String]

    private enum Backing {
        case safetensors(SafeTensorsCollection)
        case torch(TorchCheckpointFile)
    }
    private let backing: Backing
    private var stored: [String: String] = [:]   // model name → name in the file
    private var shapes: [String: [Int]] = [:]     // name in the file → shape
    private var used: Set<String> = []

    /// Opens `path` by its contents: a zip archive (or a pickle: the legacy format, refused with its reason) is a
    /// torch.save file, anything else safetensors; a `.json` name is a sharded safetensors index.
    public convenience init(path: String, backend: any ComputeBackend, dtype: DType = .f32,
                            rename: (String) -> String? = { $0 }) throws {
        if !path.hasSuffix(".json") && TorchCheckpoint.looksLikeTorchSave(path: path) {
            try self.init(torch: TorchCheckpointFile(path: path), backend: backend, dtype: dtype, rename: rename)
        } else {
            try self.init(safetensors: SafeTensorsCollection(path: path), backend: backend, dtype: dtype, rename: rename)
        }
    }

    public init(safetensors file: SafeTensorsCollection, backend: any ComputeBackend, dtype: DType = .f32,
                rename: (String) -> String? = { $0 }) throws {
        precondition(dtype.isFloatingPoint, "CheckpointWeights: parameters load as f32, f16 or bf16")
        self.backend = backend
        self.dtype = dtype
        path = file.path
        backing = .safetensors(file)
        for name in file.names {
            guard let mapped = rename(name) else { continue }
            stored[mapped] = name
            // Tensors of dtypes Pea does not read have no shape here; asking for them fails with the reason.
            if let info = try? file.info(name) { shapes[name] = info.shape }
        }
        names = stored.keys.sorted()
    }

    public init(torch file: TorchCheckpointFile, backend: any ComputeBackend, dtype: DType = .f32,
                rename: (String) -> String? = { $0 }) throws {
        precondition(dtype.isFloatingPoint, "CheckpointWeights: parameters load as f32, f16 or bf16")
        self.backend = backend
        self.dtype = dtype
        path = file.path
        backing = .torch(file)
        for name in file.names {
            guard let mapped = rename(name) else { continue }
            stored[mapped] = name
            shapes[name] = try file.info(name).shape
        }
        names = stored.keys.sorted()
    }

    public func contains(_ name: String) -> Bool { stored[name] != nil }

    /// The shape of the tensor the model calls `name`, nil when there is none.
    public func shape(of name: String) -> [Int]? { stored[name].flatMap { shapes[$0] } }

    /// The file's own name for the tensor the model calls `name`.
    public func storedName(of name: String) -> String? { stored[name] }

    public func tensor(_ name: String, shape: [Int]) throws -> Tensor {
        try load(name, shape: shape, dtype: dtype)
    }

    public func matrix(_ name: String, shape: [Int]) throws -> Tensor {
        try load(name, shape: shape, dtype: matrixDType(dtype))
    }

    private func load(_ name: String, shape: [Int], dtype: DType) throws -> Tensor {
        guard let storedName = stored[name] else {
            throw PEAError.invalidFile(path: path, reason: "missing tensor '\(name)'")
        }
        var values = try hostTensor(storedName)
        // A 1×1 convolution stored as a linear weight (or the reverse) is the same matrix (LDM's VAE attention).
        guard values.shape == shape || sameMatrix(values.shape, shape) else {
            throw PEAError.invalidFile(path: path, reason: "tensor '\(storedName)' has shape \(values.shape), the model expects \(shape)")
        }
        guard values.dtype.isFloatingPoint else {
            throw PEAError.invalidFile(path: path, reason: "tensor '\(storedName)' is \(values.dtype), expected a floating-point parameter")
        }
        if values.dtype != dtype { values = values.converted(to: dtype) }
        values.shape = shape
        used.insert(storedName)
        return try backend.upload(values)
    }

    /// Whether the model has read the tensor it calls `name`.
    public func wasRead(_ name: String) -> Bool { stored[name].map(used.contains) ?? false }

    /// The file's names of the tensors the model never asked for, sorted.
    public var unusedNames: [String] { stored.values.filter { !used.contains($0) }.sorted() }

    private func hostTensor(_ storedName: String) throws -> HostTensor {
        switch backing {
        case .safetensors(let file): return try file.tensor(storedName)
        case .torch(let file): return try file.tensor(storedName)
        }
    }
}

// MARK: - File bytes

/// read(2), named apart from `TorchCheckpoint.read(path:)`.
private func posixRead(_ descriptor: Int32, _ buffer: UnsafeMutableRawPointer?, _ count: Int) -> Int {
    read(descriptor, buffer, count)
}
