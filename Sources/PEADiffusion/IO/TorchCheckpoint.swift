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
// The unpickler below is a small, closed interpreter: it knows the opcodes such files use and the exact
// callables torch state dicts reference (an allow-list of names, never looked up or called as code). Any other
// global, INST/OBJ, BUILD on anything but a dict, or an unknown opcode is rejected with an error naming the
// file, the opcode and the class. Containers cannot be modified once they are inside another container, so the
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
            let needed = tensor.storage.elementCount.multipliedReportingOverflow(by: tensor.storage.dtype.byteSize)
            guard !needed.overflow, record.size >= needed.partialValue else {
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
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return false }
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
                            rename: (String) -> String = { $0 }) throws {
        if !path.hasSuffix(".json") && TorchCheckpoint.looksLikeTorchSave(path: path) {
            try self.init(torch: TorchCheckpointFile(path: path), backend: backend, dtype: dtype, rename: rename)
        } else {
            try self.init(safetensors: SafeTensorsCollection(path: path), backend: backend, dtype: dtype, rename: rename)
        }
    }

    public init(safetensors file: SafeTensorsCollection, backend: any ComputeBackend, dtype: DType = .f32,
                rename: (String) -> String = { $0 }) throws {
        precondition(dtype.isFloatingPoint, "CheckpointWeights: parameters load as f32, f16 or bf16")
        self.backend = backend
        self.dtype = dtype
        path = file.path
        backing = .safetensors(file)
        for name in file.names {
            stored[rename(name)] = name
            // Tensors of dtypes Pea does not read have no shape here; asking for them fails with the reason.
            if let info = try? file.info(name) { shapes[name] = info.shape }
        }
        names = stored.keys.sorted()
    }

    public init(torch file: TorchCheckpointFile, backend: any ComputeBackend, dtype: DType = .f32,
                rename: (String) -> String = { $0 }) throws {
        precondition(dtype.isFloatingPoint, "CheckpointWeights: parameters load as f32, f16 or bf16")
        self.backend = backend
        self.dtype = dtype
        path = file.path
        backing = .torch(file)
        for name in file.names {
            stored[rename(name)] = name
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
        guard let storedName = stored[name] else {
            throw PEAError.invalidFile(path: path, reason: "missing tensor '\(name)'")
        }
        var values = try hostTensor(storedName)
        guard values.shape == shape else {
            throw PEAError.invalidFile(path: path, reason: "tensor '\(storedName)' has shape \(values.shape), the model expects \(shape)")
        }
        guard values.dtype.isFloatingPoint else {
            throw PEAError.invalidFile(path: path, reason: "tensor '\(storedName)' is \(values.dtype), expected a floating-point parameter")
        }
        if values.dtype != dtype { values = values.converted(to: dtype) }
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

// MARK: - Zip

/// One file of a zip archive, located through the central directory and its local header.
struct ZipRecord {
    let name: String
    let method: UInt16
    let flags: UInt16
    let crc: UInt32
    let size: Int
    let dataOffset: Int

    /// The record's bytes (a view into `archive`). Only stored (uncompressed), unencrypted records are read;
    /// `verify` checks the CRC-32 the archive declares (torch writes it; a zero CRC on a non-empty record means
    /// it was not computed and is not checked).
    func contents(_ archive: UnsafeRawBufferPointer, path: String, verify: Bool) throws -> UnsafeRawBufferPointer {
        guard flags & 1 == 0 else {
            throw PEAError.invalidFile(path: path, reason: "zip record '\(name)' is encrypted")
        }
        guard method == 0 else {
            let kind = method == 8 ? "deflate" : "method \(method)"
            throw PEAError.invalidFile(path: path, reason: "zip record '\(name)' is compressed (\(kind)); torch.save stores records uncompressed and Pea reads only those — re-save the file with torch.save")
        }
        let data = UnsafeRawBufferPointer(rebasing: archive[dataOffset..<(dataOffset + size)])
        if verify && !(crc == 0 && size > 0) {
            var value = crc32(0, nil, 0)
            var offset = 0
            while offset < data.count {
                let chunk = min(data.count - offset, 1 << 30)
                value = crc32(value, data.baseAddress!.advanced(by: offset).assumingMemoryBound(to: Bytef.self), uInt(chunk))
                offset += chunk
            }
            guard UInt32(truncatingIfNeeded: value) == crc else {
                throw PEAError.invalidFile(path: path, reason: "zip record '\(name)' is damaged: CRC-32 \(hex(UInt32(truncatingIfNeeded: value))) does not match the archive's \(hex(crc))")
            }
        }
        return data
    }

    private func hex(_ value: UInt32) -> String { "0x" + String(value, radix: 16) }
}

/// The central directory of a zip archive (APPNOTE.TXT 4.3), zip64 included, as torch's writer (miniz) makes it.
enum ZipDirectory {
    static func read(_ bytes: UnsafeRawBufferPointer, fail: (String) -> PEAError) throws -> [String: ZipRecord] {
        let n = bytes.count
        func u16(_ at: Int) throws -> Int {
            guard at >= 0, at + 2 <= n else { throw fail("the zip archive is truncated (a field at byte \(at) lies past the end of the file)") }
            return Int(UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt16.self)))
        }
        func u32(_ at: Int) throws -> Int {
            guard at >= 0, at + 4 <= n else { throw fail("the zip archive is truncated (a field at byte \(at) lies past the end of the file)") }
            return Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self)))
        }
        func u64(_ at: Int) throws -> Int {
            guard at >= 0, at + 8 <= n else { throw fail("the zip archive is truncated (a field at byte \(at) lies past the end of the file)") }
            let value = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self))
            guard value <= UInt64(Int.max / 2) else { throw fail("the zip archive has an out-of-range 64-bit field at byte \(at)") }
            return Int(value)
        }

        // End of central directory: 22 bytes plus a comment of up to 65535, at the end of the file.
        var end = -1
        var candidate = n - 22
        while candidate >= max(0, n - 22 - 65535) {
            if try u32(candidate) == 0x0605_4B50, try candidate + 22 + u16(candidate + 20) == n { end = candidate; break }
            candidate -= 1
        }
        guard end >= 0 else {
            throw fail("no zip end-of-central-directory record: the file is truncated or not a zip archive")
        }
        guard try u16(end + 4) == 0, try u16(end + 6) == 0 else { throw fail("multi-disk zip archives are not supported") }
        var count = try u16(end + 10)
        var directorySize = try u32(end + 12)
        var directoryOffset = try u32(end + 16)
        if count == 0xFFFF || directorySize == 0xFFFF_FFFF || directoryOffset == 0xFFFF_FFFF {
            let locator = end - 20
            guard locator >= 0, try u32(locator) == 0x0706_4B50 else {
                throw fail("the zip archive declares zip64 sizes but has no zip64 end-of-central-directory locator")
            }
            let record = try u64(locator + 8)
            guard try u32(record) == 0x0606_4B50 else { throw fail("the zip64 end-of-central-directory record is missing") }
            count = try u64(record + 32)
            directorySize = try u64(record + 40)
            directoryOffset = try u64(record + 48)
        }
        guard directoryOffset <= n, directorySize <= n - directoryOffset else {
            throw fail("the zip central directory (\(directorySize) bytes at \(directoryOffset)) lies past the end of the file (\(n) bytes): the file is truncated")
        }
        guard count <= directorySize / 46 + 1 else {
            throw fail("the zip central directory declares \(count) records, more than its \(directorySize) bytes can hold")
        }

        var records: [String: ZipRecord] = [:]
        var at = directoryOffset
        for _ in 0..<count {
            guard at + 46 <= directoryOffset + directorySize, try u32(at) == 0x0201_4B50 else {
                throw fail("zip central directory entry at byte \(at) is malformed")
            }
            let flags = try u16(at + 8), method = try u16(at + 10)
            let crc = try u32(at + 16)
            var compressed = try u32(at + 20), uncompressed = try u32(at + 24)
            let nameLength = try u16(at + 28), extraLength = try u16(at + 30), commentLength = try u16(at + 32)
            var localOffset = try u32(at + 42)
            let nameStart = at + 46
            guard nameStart + nameLength + extraLength + commentLength <= n else {
                throw fail("zip central directory entry at byte \(at) runs past the end of the file")
            }
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[nameStart..<(nameStart + nameLength)]), as: UTF8.self)
            // Zip64 extended information: the 64-bit values of the fields saturated at 0xFFFFFFFF, in this order.
            var extra = nameStart + nameLength
            let extraEnd = extra + extraLength
            while extra + 4 <= extraEnd {
                let id = try u16(extra), length = try u16(extra + 2)
                guard extra + 4 + length <= extraEnd else { throw fail("zip record '\(name)' has a malformed extra field") }
                if id == 0x0001 {
                    var field = extra + 4
                    func next() throws -> Int {
                        guard field + 8 <= extra + 4 + length else { throw fail("zip record '\(name)' has a short zip64 extra field") }
                        defer { field += 8 }
                        return try u64(field)
                    }
                    if uncompressed == 0xFFFF_FFFF { uncompressed = try next() }
                    if compressed == 0xFFFF_FFFF { compressed = try next() }
                    if localOffset == 0xFFFF_FFFF { localOffset = try next() }
                }
                extra += 4 + length
            }
            at = extraEnd + commentLength

            guard try u32(localOffset) == 0x0403_4B50 else {
                throw fail("zip record '\(name)': no local header at byte \(localOffset)")
            }
            let dataOffset = localOffset + 30 + (try u16(localOffset + 26)) + (try u16(localOffset + 28))
            guard dataOffset <= n, compressed <= n - dataOffset else {
                throw fail("zip record '\(name)' (\(compressed) bytes at \(dataOffset)) runs past the end of the file (\(n) bytes): the file is truncated")
            }
            if method == 0 && compressed != uncompressed {
                throw fail("zip record '\(name)' is stored but declares \(compressed) stored and \(uncompressed) uncompressed bytes")
            }
            records[name] = ZipRecord(name: name, method: UInt16(method), flags: UInt16(flags), crc: UInt32(crc),
                                      size: method == 0 ? uncompressed : compressed, dataOffset: dataOffset)
        }
        return records
    }
}

// MARK: - The restricted unpickler

/// A storage as a tensor's persistent id names it.
struct TorchStorageRef {
    let dtype: DType
    let key: String
    let elementCount: Int
}

struct TorchTensorRef {
    let storage: TorchStorageRef
    let offset: Int
    let shape: [Int]
    let strides: [Int]
}

/// The callables and classes a torch state dict refers to — the whole allow-list.
enum PickleGlobal: String, CaseIterable {
    case orderedDict = "collections.OrderedDict"
    case rebuildTensor = "torch._utils._rebuild_tensor_v2"
    case rebuildParameter = "torch._utils._rebuild_parameter"
    case floatStorage = "torch.FloatStorage"
    case halfStorage = "torch.HalfStorage"
    case bfloat16Storage = "torch.BFloat16Storage"
    case longStorage = "torch.LongStorage"
    case intStorage = "torch.IntStorage"

    var storageDType: DType? {
        switch self {
        case .floatStorage: return .f32
        case .halfStorage: return .f16
        case .bfloat16Storage: return .bf16
        case .longStorage: return .i64
        case .intStorage: return .i32
        default: return nil
        }
    }

    /// Storage classes torch has that Pea recognises only to say why it cannot read them.
    static let otherStorages: Set<String> = [
        "torch.DoubleStorage", "torch.ByteStorage", "torch.CharStorage", "torch.ShortStorage", "torch.BoolStorage",
        "torch.ComplexFloatStorage", "torch.ComplexDoubleStorage", "torch.QInt8Storage", "torch.QUInt8Storage",
        "torch.QInt32Storage", "torch.QUInt4x2Storage", "torch.QUInt2x4Storage", "torch.UntypedStorage",
        "torch.storage.UntypedStorage", "torch.Float8_e4m3fnStorage", "torch.Float8_e5m2Storage",
    ]
}

/// A tuple, list or dict built by the pickle. A reference type, because the pickle fills a container after
/// creating (and memoising) it; `frozen` once it has been put inside another container or used as an argument.
final class PickleContainer {
    enum Kind { case tuple, list, dict }
    let kind: Kind
    var items: [PickleValue] = []            // tuple and list elements; dict values
    var keys: [PickleValue] = []             // dict keys, in insertion order
    var depth = 1
    var frozen = false

    init(_ kind: Kind, items: [PickleValue] = []) {
        self.kind = kind
        self.items = items
    }
}

enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case global(PickleGlobal)
    case container(PickleContainer)
    case storage(TorchStorageRef)
    case tensor(TorchTensorRef)

    var depth: Int {
        if case .container(let c) = self { return c.depth }
        return 0
    }

    /// What the value is, for messages ("a list", "an int", …).
    var kindDescription: String {
        switch self {
        case .none: return "None"
        case .bool: return "a bool"
        case .int: return "an int"
        case .float: return "a float"
        case .string: return "a string"
        case .global(let g): return "the callable \(g.rawValue)"
        case .container(let c):
            switch c.kind {
            case .tuple: return "a tuple"
            case .list: return "a list"
            case .dict: return "a dict"
            }
        case .storage: return "a storage"
        case .tensor: return "a tensor"
        }
    }
}

enum TorchUnpickler {
    /// The deepest nesting of containers accepted (a state dict's `_metadata` is 3 deep).
    static let maximumDepth = 32

    /// Runs the pickle program in `data` and returns the object it builds. Never executes code: the only
    /// "calls" are the allow-listed constructors, interpreted here.
    static func run(_ data: [UInt8], context: String, fail baseFail: @escaping (String) -> PEAError) throws -> PickleValue {
        var position = 0
        var opcodeStart = 0
        func fail(_ reason: String) -> PEAError {
            baseFail("\(context): \(reason) (at pickle byte \(opcodeStart)); nothing from the file was executed")
        }
        func take(_ count: Int) throws -> ArraySlice<UInt8> {
            guard count >= 0, count <= data.count - position else { throw fail("the pickle ends in the middle of an opcode's argument") }
            defer { position += count }
            return data[position..<(position + count)]
        }
        func byte() throws -> UInt8 { try take(1).first! }
        func littleEndian(_ count: Int) throws -> UInt64 {
            var value: UInt64 = 0
            for (i, b) in try take(count).enumerated() { value |= UInt64(b) << (8 * UInt64(i)) }
            return value
        }
        func line() throws -> String {
            guard let end = data[position...].firstIndex(of: 0x0A) else { throw fail("the pickle ends inside a GLOBAL name") }
            defer { position = end + 1 }
            return String(decoding: data[position..<end], as: UTF8.self)
        }
        func text(_ count: Int) throws -> String {
            let bytes = try take(count)
            guard let string = String(validating: bytes, as: UTF8.self) else { throw fail("a string is not valid UTF-8") }
            return string
        }

        var stack: [PickleValue] = []
        var marks: [Int] = []
        var memo: [Int: PickleValue] = [:]
        func base() -> Int { marks.last ?? 0 }
        func pop() throws -> PickleValue {
            guard stack.count > base() else { throw fail("stack underflow") }
            return stack.removeLast()
        }
        func top() throws -> PickleValue {
            guard stack.count > base(), let value = stack.last else { throw fail("stack underflow") }
            return value
        }
        func popMark() throws -> [PickleValue] {
            guard let mark = marks.popLast() else { throw fail("no MARK to pop to") }
            defer { stack.removeSubrange(mark...) }
            return Array(stack[mark...])
        }
        /// Marks values as being put inside something; containers can no longer change after that.
        func freeze(_ values: [PickleValue]) { for case .container(let c) in values { c.frozen = true } }
        func container(_ kind: PickleContainer.Kind, _ items: [PickleValue]) throws -> PickleValue {
            freeze(items)
            let box = PickleContainer(kind, items: items)
            box.depth = 1 + (items.map(\.depth).max() ?? 0)
            guard box.depth <= maximumDepth else { throw fail("objects nested more than \(maximumDepth) deep") }
            return .container(box)
        }
        func mutable(_ value: PickleValue, _ kind: PickleContainer.Kind, _ opcode: String) throws -> PickleContainer {
            guard case .container(let box) = value, box.kind == kind else {
                throw fail("\(opcode) on \(value.kindDescription) is not allowed")
            }
            guard !box.frozen else { throw fail("\(opcode) on a container already inside another object is not allowed") }
            return box
        }
        /// Puts `values` into the container `target` (SETITEM(S), APPEND(S)). The values are frozen first, so a
        /// container cannot be put inside itself.
        func insert(_ values: [PickleValue], into target: PickleValue, _ kind: PickleContainer.Kind, _ opcode: String, asPairs: Bool) throws {
            freeze(values)
            let box = try mutable(target, kind, opcode)
            let newDepth = 1 + (values.map(\.depth).max() ?? 0)
            guard newDepth <= maximumDepth else { throw fail("objects nested more than \(maximumDepth) deep") }
            box.depth = max(box.depth, newDepth)
            if !asPairs { box.items += values; return }
            guard values.count % 2 == 0 else { throw fail("SETITEMS with an odd number of items") }
            for i in stride(from: 0, to: values.count, by: 2) {
                let (key, value) = (values[i], values[i + 1])
                if case .string(let name) = key,
                   let existing = box.keys.firstIndex(where: { if case .string(name) = $0 { return true }; return false }) {
                    box.items[existing] = value
                } else {
                    box.keys.append(key)
                    box.items.append(value)
                }
            }
        }
        func global(_ module: String, _ name: String, opcode: String) throws -> PickleValue {
            let qualified = "\(module).\(name)"
            if let allowed = PickleGlobal(rawValue: qualified) { return .global(allowed) }
            if PickleGlobal.otherStorages.contains(qualified) {
                throw fail("tensor storage type \(qualified) is not supported (Pea reads float32, float16, bfloat16, int64 and int32 tensors)")
            }
            throw fail("\(opcode) '\(module) \(name)' is not allowed: Pea's unpickler accepts only tensor state dicts (\(PickleGlobal.allCases.map(\.rawValue).joined(separator: ", ")))")
        }

        while true {
            opcodeStart = position
            let opcode = try byte()
            switch opcode {
            case 0x80:  // PROTO
                let version = try byte()
                guard version >= 2 && version <= 5 else { throw fail("pickle protocol \(version) is not supported (torch.save writes protocol 2)") }
            case 0x95:  // FRAME: a length hint only
                _ = try take(8)
            case 0x2E:  // STOP
                let result = try pop()
                return result
            case 0x28:  // MARK
                marks.append(stack.count)
            case 0x7D:  // EMPTY_DICT
                stack.append(.container(PickleContainer(.dict)))
            case 0x5D:  // EMPTY_LIST
                stack.append(.container(PickleContainer(.list)))
            case 0x29:  // EMPTY_TUPLE
                stack.append(try container(.tuple, []))
            case 0x74:  // TUPLE
                stack.append(try container(.tuple, try popMark()))
            case 0x85:  // TUPLE1
                let a = try pop()
                stack.append(try container(.tuple, [a]))
            case 0x86:  // TUPLE2
                let b = try pop(), a = try pop()
                stack.append(try container(.tuple, [a, b]))
            case 0x87:  // TUPLE3
                let c = try pop(), b = try pop(), a = try pop()
                stack.append(try container(.tuple, [a, b, c]))
            case 0x4E:  // NONE
                stack.append(.none)
            case 0x88:  // NEWTRUE
                stack.append(.bool(true))
            case 0x89:  // NEWFALSE
                stack.append(.bool(false))
            case 0x4A:  // BININT: 4-byte signed
                stack.append(.int(Int(Int32(bitPattern: UInt32(try littleEndian(4))))))
            case 0x4B:  // BININT1
                stack.append(.int(Int(try byte())))
            case 0x4D:  // BININT2
                stack.append(.int(Int(try littleEndian(2))))
            case 0x8A:  // LONG1: n-byte two's complement
                let count = Int(try byte())
                guard count <= 8 else { throw fail("LONG1 integer of \(count) bytes is too large") }
                var value = try littleEndian(count)
                if count > 0 && count < 8 && value & (UInt64(1) << UInt64(8 * count - 1)) != 0 {
                    value |= ~UInt64(0) << UInt64(8 * count)  // sign-extend
                }
                stack.append(.int(Int(Int64(bitPattern: value))))
            case 0x47:  // BINFLOAT: 8-byte big-endian double
                let raw = try take(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                stack.append(.float(Double(bitPattern: raw)))
            case 0x58:  // BINUNICODE
                stack.append(.string(try text(Int(try littleEndian(4)))))
            case 0x8C:  // SHORT_BINUNICODE
                stack.append(.string(try text(Int(try byte()))))
            case 0x8D:  // BINUNICODE8
                let length = try littleEndian(8)
                guard length <= UInt64(data.count) else { throw fail("the pickle ends in the middle of an opcode's argument") }
                stack.append(.string(try text(Int(length))))
            case 0x63:  // GLOBAL "module\nname\n"
                let module = try line(), name = try line()
                stack.append(try global(module, name, opcode: "GLOBAL"))
            case 0x93:  // STACK_GLOBAL
                let nameValue = try pop(), moduleValue = try pop()
                guard case .string(let module) = moduleValue, case .string(let name) = nameValue else {
                    throw fail("STACK_GLOBAL needs two strings")
                }
                stack.append(try global(module, name, opcode: "STACK_GLOBAL"))
            case 0x71:  // BINPUT
                memo[Int(try byte())] = try top()
            case 0x72:  // LONG_BINPUT
                memo[Int(try littleEndian(4))] = try top()
            case 0x94:  // MEMOIZE
                memo[memo.count] = try top()
            case 0x68, 0x6A:  // BINGET, LONG_BINGET
                let index = Int(opcode == 0x68 ? UInt64(try byte()) : try littleEndian(4))
                guard let value = memo[index] else { throw fail("memo entry \(index) was never stored") }
                stack.append(value)
            case 0x73:  // SETITEM
                let value = try pop(), key = try pop()
                try insert([key, value], into: try top(), .dict, "SETITEM", asPairs: true)
            case 0x75:  // SETITEMS
                let items = try popMark()
                try insert(items, into: try top(), .dict, "SETITEMS", asPairs: true)
            case 0x61:  // APPEND
                let value = try pop()
                try insert([value], into: try top(), .list, "APPEND", asPairs: false)
            case 0x65:  // APPENDS
                let items = try popMark()
                try insert(items, into: try top(), .list, "APPENDS", asPairs: false)
            case 0x51:  // BINPERSID
                stack.append(try persistentLoad(try pop(), fail: fail))
            case 0x52:  // REDUCE
                let arguments = try pop(), callable = try pop()
                freeze([arguments])
                stack.append(try reduce(callable, arguments, fail: fail))
            case 0x81:  // NEWOBJ: cls.__new__(cls, *args); only an empty OrderedDict
                let arguments = try pop(), cls = try pop()
                guard case .global(.orderedDict) = cls, case .container(let args) = arguments, args.items.isEmpty else {
                    throw fail("NEWOBJ of \(cls.kindDescription) is not allowed (only collections.OrderedDict)")
                }
                stack.append(.container(PickleContainer(.dict)))
            case 0x62:  // BUILD: obj.__setstate__(state) or obj.__dict__.update(state); only a dict's attributes
                let state = try pop()
                let object = try top()
                _ = try mutable(object, .dict, "BUILD (setting object state)")
                guard case .container(let box) = state, box.kind == .dict else {
                    throw fail("BUILD with \(state.kindDescription) as the state is not allowed (only the attribute dict of an OrderedDict)")
                }
                freeze([state])  // an OrderedDict's `_metadata`: kept out of the state dict, ignored
            case 0x69:  // INST "module\nname\n": instantiates a class — name it in the refusal
                let module = try line(), name = try line()
                throw fail("pickle opcode INST '\(module) \(name)' is not allowed: Pea's unpickler accepts only tensor state dicts")
            default:
                throw fail("pickle opcode \(describe(opcode)) is not allowed: Pea's unpickler accepts only the opcodes of torch state dicts")
            }
        }
    }

    /// `('storage', torch.FloatStorage, key, location, element count)`.
    private static func persistentLoad(_ pid: PickleValue, fail: (String) -> PEAError) throws -> PickleValue {
        guard case .container(let tuple) = pid, tuple.kind == .tuple, tuple.items.count == 5,
              case .string("storage") = tuple.items[0] else {
            throw fail("a persistent id must be ('storage', type, key, location, size), found \(pid.kindDescription)")
        }
        guard case .global(let type) = tuple.items[1], let dtype = type.storageDType else {
            throw fail("a persistent id names \(tuple.items[1].kindDescription) as its storage type")
        }
        guard case .string(let key) = tuple.items[2], case .string = tuple.items[3],
              case .int(let count) = tuple.items[4], count >= 0 else {
            throw fail("a persistent id must be ('storage', type, key: str, location: str, size: int ≥ 0)")
        }
        return .storage(TorchStorageRef(dtype: dtype, key: key, elementCount: count))
    }

    private static func reduce(_ callable: PickleValue, _ arguments: PickleValue, fail: (String) -> PEAError) throws -> PickleValue {
        guard case .global(let function) = callable else {
            throw fail("REDUCE calls \(callable.kindDescription), which is not an allowed callable")
        }
        guard case .container(let argumentTuple) = arguments, argumentTuple.kind == .tuple else {
            throw fail("REDUCE of \(function.rawValue) with \(arguments.kindDescription) as its arguments")
        }
        let args = argumentTuple.items
        switch function {
        case .orderedDict:
            guard args.isEmpty else { throw fail("collections.OrderedDict with arguments is not allowed") }
            return .container(PickleContainer(.dict))
        case .rebuildTensor:
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            guard args.count == 6 || args.count == 7 else {
                throw fail("torch._utils._rebuild_tensor_v2 takes 6 or 7 arguments, found \(args.count)")
            }
            guard case .storage(let storage) = args[0] else {
                throw fail("torch._utils._rebuild_tensor_v2: the first argument is \(args[0].kindDescription), not a storage")
            }
            guard case .int(let offset) = args[1], offset >= 0 else {
                throw fail("torch._utils._rebuild_tensor_v2: the storage offset must be an int ≥ 0")
            }
            let shape = try integers(args[2], "size", fail: fail), strides = try integers(args[3], "stride", fail: fail)
            guard shape.count == strides.count else {
                throw fail("torch._utils._rebuild_tensor_v2: size \(shape) and stride \(strides) differ in rank")
            }
            guard case .bool = args[4] else { throw fail("torch._utils._rebuild_tensor_v2: requires_grad must be a bool") }
            guard case .container(let hooks) = args[5], hooks.kind == .dict, hooks.items.isEmpty else {
                throw fail("torch._utils._rebuild_tensor_v2: backward hooks must be an empty OrderedDict")
            }
            if args.count == 7 {
                guard case .container(let metadata) = args[6], metadata.kind == .dict else {
                    throw fail("torch._utils._rebuild_tensor_v2: metadata must be a dict")
                }
            }
            // Every element the view reaches must lie inside the storage.
            var count = 1, last = offset, overflow = false
            for (size, step) in zip(shape, strides) {
                let (c, o1) = count.multipliedReportingOverflow(by: size)
                let (span, o2) = max(size - 1, 0).multipliedReportingOverflow(by: step)
                let (l, o3) = last.addingReportingOverflow(span)
                count = c; last = l
                overflow = overflow || o1 || o2 || o3
            }
            guard !overflow else { throw fail("torch._utils._rebuild_tensor_v2: size \(shape) with stride \(strides) overflows") }
            // A view may repeat its storage (stride 0, `expand`), but not without bound.
            guard count <= 64 * storage.elementCount + 4096 else {
                throw fail("torch._utils._rebuild_tensor_v2: a tensor of size \(shape) repeats its storage '\(storage.key)' of \(storage.elementCount) elements more than 64 times")
            }
            guard count == 0 ? offset <= storage.elementCount : last < storage.elementCount else {
                throw fail("torch._utils._rebuild_tensor_v2: a tensor of size \(shape), stride \(strides) at offset \(offset) reaches past its storage '\(storage.key)' of \(storage.elementCount) elements")
            }
            return .tensor(TorchTensorRef(storage: storage, offset: offset, shape: shape, strides: strides))
        case .rebuildParameter:
            // (data, requires_grad, backward_hooks)
            guard args.count == 3, case .tensor = args[0], case .bool = args[1],
                  case .container(let hooks) = args[2], hooks.kind == .dict, hooks.items.isEmpty else {
                throw fail("torch._utils._rebuild_parameter takes (tensor, requires_grad, empty hooks)")
            }
            return args[0]
        default:
            throw fail("calling \(function.rawValue) is not allowed (storage types appear only inside persistent ids)")
        }
    }

    private static func integers(_ value: PickleValue, _ what: String, fail: (String) -> PEAError) throws -> [Int] {
        guard case .container(let tuple) = value, tuple.kind == .tuple else {
            throw fail("torch._utils._rebuild_tensor_v2: \(what) must be a tuple of ints, found \(value.kindDescription)")
        }
        return try tuple.items.map {
            guard case .int(let n) = $0, n >= 0 else {
                throw fail("torch._utils._rebuild_tensor_v2: \(what) must be a tuple of ints ≥ 0")
            }
            return n
        }
    }

    /// The tensors of the unpickled object: a dict of tensors, or a checkpoint dict's "state_dict" entry.
    static func stateDict(from root: PickleValue, fail: (String) -> PEAError) throws -> [(String, TorchTensorRef)] {
        guard case .container(let dict) = root, dict.kind == .dict else {
            throw fail("the file holds \(root.kindDescription), not a state dict (a dict of tensors)")
        }
        var entries = dict
        if let index = dict.keys.firstIndex(where: { if case .string("state_dict") = $0 { return true }; return false }),
           case .container(let inner) = dict.items[index], inner.kind == .dict {
            entries = inner
        }
        var tensors: [(String, TorchTensorRef)] = []
        for (key, value) in zip(entries.keys, entries.items) {
            guard case .string(let name) = key else {
                throw fail("the state dict has \(key.kindDescription) as a key; tensor names must be strings")
            }
            guard case .tensor(let tensor) = value else {
                throw fail("entry '\(name)' of the state dict is \(value.kindDescription), not a tensor")
            }
            tensors.append((name, tensor))
        }
        return tensors
    }

    /// An opcode byte with its pickle name, for messages.
    static func describe(_ opcode: UInt8) -> String {
        let names: [UInt8: String] = [
            0x69: "INST", 0x6F: "OBJ", 0x92: "NEWOBJ_EX", 0x50: "PERSID", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
            0x49: "INT", 0x4C: "LONG", 0x46: "FLOAT", 0x53: "STRING", 0x54: "BINSTRING", 0x55: "SHORT_BINSTRING",
            0x56: "UNICODE", 0x70: "PUT", 0x67: "GET", 0x6C: "LIST", 0x64: "DICT", 0x30: "POP", 0x31: "POP_MARK",
            0x32: "DUP", 0x42: "BINBYTES", 0x43: "SHORT_BINBYTES", 0x8B: "LONG4", 0x8E: "BINBYTES8",
            0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER",
            0x98: "READONLY_BUFFER",
        ]
        let hex = "0x" + (opcode < 16 ? "0" : "") + String(opcode, radix: 16)
        return names[opcode].map { "\($0) (\(hex))" } ?? hex
    }
}
