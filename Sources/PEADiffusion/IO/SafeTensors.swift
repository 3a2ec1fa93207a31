#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// The safetensors format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
// N, N bytes of UTF-8 JSON mapping tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (plus an
// optional "__metadata__" object of strings), then the data section; offsets are relative to its start.
// Validation follows the reference Rust implementation (safetensors/src/tensor.rs, `read_metadata` and
// `Metadata::validate`), with messages that name the file and the tensor.

/// Where one tensor lies in a safetensors file and what it holds.
public struct SafeTensorInfo: Equatable, Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    /// The first byte's offset from the start of the data section: the header's `data_offsets[0]`.
    public let dataOffset: Int
    /// The first byte's offset from the start of the file (8 + header length + `dataOffset`), for readers
    /// that do their own I/O.
    public let fileOffset: Int
    public let byteCount: Int

    public var elementCount: Int { byteCount / dtype.byteSize }
}

/// The dtype strings of the safetensors format (version 0.8), with the bits one element takes. Pea reads
/// five of them (`DType`); the others are recognised, so a file holding them is still validated and its
/// other tensors can be read, but asking for such a tensor throws "unsupported dtype".
enum SafeTensorsDTypeTable {
    /// Declaration order of the reference `Dtype` enum, which the writer's sort uses (increasing alignment).
    static let all: [(name: String, bits: Int)] = [
        ("BOOL", 8), ("F4", 4), ("F6_E2M3", 6), ("F6_E3M2", 6), ("U8", 8), ("I8", 8), ("F8_E5M2", 8),
        ("F8_E4M3", 8), ("F8_E8M0", 8), ("F8_E4M3FNUZ", 8), ("F8_E5M2FNUZ", 8), ("I16", 16), ("U16", 16),
        ("F16", 16), ("BF16", 16), ("I32", 32), ("U32", 32), ("F32", 32), ("C64", 64), ("F64", 64),
        ("I64", 64), ("U64", 64),
    ]

    static func bits(of name: String) -> Int? { all.first { $0.name == name }?.bits }

    /// Position in the reference enum: the writer puts higher ranks first, as the reference does.
    static func rank(of dtype: DType) -> Int { all.firstIndex { $0.name == dtype.safetensorsName }! }

    static var supportedList: String { DType.allCases.map(\.safetensorsName).joined(separator: ", ") }
}

/// A memory-mapped safetensors file. Opening it maps the file read-only and validates the whole header;
/// tensor data are not touched until asked for (`withBytes` is a zero-copy view into the map, `tensor`
/// copies). Immutable after `init`, so it may be shared between threads.
///
/// Data views are only as aligned as the file makes them: files written by the reference library (and by
/// `SafeTensorsWriter`) align each tensor to its element size, others may not — use `loadUnaligned`
/// or copy when in doubt.
public final class SafeTensorsFile: @unchecked Sendable {
    /// The largest header accepted, as in the reference implementation (`MAX_HEADER_SIZE`).
    public static let maximumHeaderByteCount = 100_000_000

    public let path: String
    /// The header's `__metadata__` (empty when there is none).
    public let metadata: [String: String]
    /// Every tensor name, sorted.
    public let names: [String]
    /// The size of the JSON header in bytes (the 8-byte length prefix not included).
    public let headerByteCount: Int
    /// The size of the whole file.
    public let fileByteCount: Int

    /// Offset of the data section from the start of the file.
    public var dataSectionOffset: Int { 8 + headerByteCount }

    struct Entry {
        let name: String
        let dtypeName: String
        let dtype: DType?  // nil: a safetensors dtype Pea does not read
        let shape: [Int]
        let begin: Int
        let end: Int
    }

    private let file: MappedBytes
    private var mapping: UnsafeRawBufferPointer { file.buffer }
    private let entries: [String: Entry]

    /// Maps the file and validates its header (see the type's documentation for the rules).
    /// - Throws: `PEAError.invalidFile(path:reason:)` naming the file and, where there is one, the tensor.
    public init(path: String) throws {
        self.path = path
        let file = try MappedBytes(path: path)
        let mapping = file.buffer, size = mapping.count
        guard size >= 8 else {
            throw PEAError.invalidFile(path: path, reason: "file is \(size) bytes, too short for the 8-byte header length of a safetensors file")
        }
        let header = try SafeTensorsFile.parseHeader(mapping, path: path)
        self.file = file
        self.headerByteCount = header.headerByteCount
        self.fileByteCount = size
        self.metadata = header.metadata
        self.entries = header.entries
        self.names = header.entries.keys.sorted()
    }

    public func contains(_ name: String) -> Bool { entries[name] != nil }

    /// The tensor's dtype, shape and location. Throws for a missing name or a dtype Pea does not read.
    public func info(_ name: String) throws -> SafeTensorInfo {
        let entry = try lookup(name)
        guard let dtype = entry.dtype else {
            throw PEAError.invalidFile(path: path, reason: "tensor '\(name)' has unsupported dtype '\(entry.dtypeName)' (Pea reads \(SafeTensorsDTypeTable.supportedList))")
        }
        return SafeTensorInfo(name: name, dtype: dtype, shape: entry.shape, dataOffset: entry.begin,
                              fileOffset: dataSectionOffset + entry.begin, byteCount: entry.end - entry.begin)
    }

    /// The safetensors dtype string of any tensor in the file, those Pea does not read included ("F64", "U8", …).
    public func dtypeName(_ name: String) throws -> String { try lookup(name).dtypeName }

    /// Calls `body` with the tensor's bytes as they lie in the mapped file (no copy). The buffer is valid
    /// only during the call.
    public func withBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        let info = try info(name)
        return try withExtendedLifetime(self) {
            try body(UnsafeRawBufferPointer(start: mapping.baseAddress! + info.fileOffset, count: info.byteCount))
        }
    }

    /// Drops the tensor's pages from the process's resident set (`MappedBytes.releasePages`), once its bytes
    /// have been copied elsewhere; reading it again still works.
    public func releasePages(_ name: String) throws {
        let info = try info(name)
        file.releasePages(info.fileOffset..<(info.fileOffset + info.byteCount))
    }

    /// A copy of the tensor in host memory.
    public func tensor(_ name: String) throws -> HostTensor {
        let info = try info(name)
        let bytes = try withBytes(name) { Array($0) }
        return HostTensor(shape: info.shape, dtype: info.dtype, bytes: bytes)
    }

    /// A copy of the tensor, which must have exactly `shape`.
    /// - Throws: naming the file, the tensor, the expected and the actual shape.
    public func tensor(_ name: String, expecting shape: [Int]) throws -> HostTensor {
        let info = try info(name)
        guard info.shape == shape else {
            throw PEAError.invalidFile(path: path, reason: "tensor '\(name)' has shape \(info.shape), expected \(shape)")
        }
        return try tensor(name)
    }

    private func lookup(_ name: String) throws -> Entry {
        guard let entry = entries[name] else {
            throw PEAError.invalidFile(path: path, reason: "no tensor named '\(name)'")
        }
        return entry
    }

    // MARK: - Header validation

    struct Header {
        var headerByteCount: Int
        var metadata: [String: String]
        var entries: [String: Entry]
    }

    /// Parses and validates the header of a complete file image: the rules of the reference
    /// `SafeTensors::read_metadata` and `Metadata::validate`.
    static func parseHeader(_ file: UnsafeRawBufferPointer, path: String) throws -> Header {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        guard file.count >= 8 else {
            throw fail("file is \(file.count) bytes, too short for the 8-byte header length of a safetensors file")
        }
        let declaredLength = UInt64(littleEndian: file.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        guard declaredLength <= UInt64(maximumHeaderByteCount) else {
            throw fail("header length \(declaredLength) is larger than the limit of \(maximumHeaderByteCount) bytes (not a safetensors file?)")
        }
        let headerLength = Int(declaredLength)
        guard headerLength <= file.count - 8 else {
            throw fail("header length \(headerLength) runs past the end of the file (\(file.count) bytes)")
        }
        let headerBytes = UnsafeRawBufferPointer(rebasing: file[8..<(8 + headerLength)])
        let document: JSONValue
        do {
            document = try JSONValue.parse(bytes: headerBytes)
        } catch let error as JSONParseError {
            throw fail("header is not valid JSON: \(error)")
        }
        guard case .object(let members) = document else {
            throw fail("header is not a JSON object but \(document.kindDescription)")
        }
        let dataLength = file.count - 8 - headerLength

        var metadata: [String: String] = [:]
        var entries: [String: Entry] = [:]
        entries.reserveCapacity(members.count)
        for (name, value) in members {
            if name == "__metadata__" {
                metadata = try parseMetadata(value, fail: fail)
                continue
            }
            entries[name] = try parseEntry(name: name, value, dataLength: dataLength, fail: fail)
        }

        // Contiguity: sorted by offsets, each tensor starts where the previous one ended and the last one
        // ends at the end of the file (no overlaps, no holes, no trailing bytes).
        let ordered = entries.values.sorted {
            ($0.begin, $0.end) != ($1.begin, $1.end) ? ($0.begin, $0.end) < ($1.begin, $1.end) : $0.name < $1.name
        }
        var expectedBegin = 0
        var previous: Entry? = nil
        for entry in ordered {
            if entry.begin < expectedBegin, let previous {
                throw fail("tensor '\(entry.name)' data_offsets [\(entry.begin), \(entry.end)] overlap tensor '\(previous.name)' [\(previous.begin), \(previous.end)]")
            }
            if entry.begin > expectedBegin {
                throw fail("bytes \(expectedBegin)..<\(entry.begin) of the data section before tensor '\(entry.name)' belong to no tensor")
            }
            expectedBegin = entry.end
            previous = entry
        }
        guard expectedBegin == dataLength else {
            throw fail("the data section has \(dataLength) bytes but the tensors cover only \(expectedBegin): bytes \(expectedBegin)..<\(dataLength) belong to no tensor")
        }
        return Header(headerByteCount: headerLength, metadata: metadata, entries: entries)
    }

    private static func parseMetadata(_ value: JSONValue, fail: (String) -> PEAError) throws -> [String: String] {
        switch value {
        case .null: return [:]
        case .object(let members):
            var metadata: [String: String] = [:]
            for (key, value) in members {
                guard case .string(let text) = value else {
                    throw fail("__metadata__ entry '\(key)' must be a string, found \(value.kindDescription)")
                }
                metadata[key] = text
            }
            return metadata
        default:
            throw fail("__metadata__ must be an object of strings, found \(value.kindDescription)")
        }
    }

    private static func parseEntry(name: String, _ value: JSONValue, dataLength: Int, fail: (String) -> PEAError) throws -> Entry {
        guard case .object(let fields) = value else {
            throw fail("tensor '\(name)': expected an object with dtype, shape and data_offsets, found \(value.kindDescription)")
        }
        guard let dtypeValue = fields["dtype"] else { throw fail("tensor '\(name)' has no dtype") }
        guard let shapeValue = fields["shape"] else { throw fail("tensor '\(name)' has no shape") }
        guard let offsetsValue = fields["data_offsets"] else { throw fail("tensor '\(name)' has no data_offsets") }

        guard case .string(let dtypeName) = dtypeValue else {
            throw fail("tensor '\(name)': dtype must be a string, found \(dtypeValue.kindDescription)")
        }
        guard let bitsPerElement = SafeTensorsDTypeTable.bits(of: dtypeName) else {
            throw fail("tensor '\(name)' has unknown dtype '\(dtypeName)'")
        }

        guard case .array(let dimensionValues) = shapeValue else {
            throw fail("tensor '\(name)': shape must be a list of integers, found \(shapeValue.kindDescription)")
        }
        var shape: [Int] = []
        shape.reserveCapacity(dimensionValues.count)
        var elementCount = 1
        var overflow = false
        for dimensionValue in dimensionValues {
            guard let dimension = dimensionValue.intValue, dimension >= 0 else {
                throw fail("tensor '\(name)': shape \(shapeValue.serialized()) has a dimension that is not a non-negative integer (\(dimensionValue.serialized()))")
            }
            shape.append(dimension)
            let (product, overflowed) = elementCount.multipliedReportingOverflow(by: dimension)
            overflow = overflow || overflowed
            elementCount = product
        }
        // A zero dimension makes the product 0 whatever came before; only a non-empty tensor can overflow.
        if shape.contains(0) { elementCount = 0; overflow = false }
        let (bitCount, bitsOverflowed) = elementCount.multipliedReportingOverflow(by: bitsPerElement)
        guard !overflow, !bitsOverflowed else {
            throw fail("tensor '\(name)': shape \(shape) of \(dtypeName) has more elements than can be addressed")
        }
        guard bitCount % 8 == 0 else {
            throw fail("tensor '\(name)': \(elementCount) elements of \(dtypeName) do not fill whole bytes")
        }
        let byteCount = bitCount / 8

        guard case .array(let offsetValues) = offsetsValue, offsetValues.count == 2,
              let begin = offsetValues[0].intValue, let end = offsetValues[1].intValue, begin >= 0, end >= 0 else {
            throw fail("tensor '\(name)': data_offsets must be two non-negative integers [begin, end], found \(offsetsValue.serialized())")
        }
        guard begin <= end else {
            throw fail("tensor '\(name)': data_offsets [\(begin), \(end)] end before they begin")
        }
        guard end <= dataLength else {
            throw fail("tensor '\(name)': data_offsets [\(begin), \(end)] run past the end of the data section (\(dataLength) bytes)")
        }
        guard end - begin == byteCount else {
            throw fail("tensor '\(name)': data_offsets [\(begin), \(end)] span \(end - begin) bytes, but shape \(shape) of \(dtypeName) needs \(byteCount)")
        }
        return Entry(name: name, dtypeName: dtypeName, dtype: DType(safetensorsName: dtypeName), shape: shape, begin: begin, end: end)
    }
}

// MARK: - Sharded checkpoints

/// The weights of one model: either a single `.safetensors` file or a sharded checkpoint described by
/// an index (`*.safetensors.index.json`, as written by diffusers/transformers `save_pretrained`: a
/// `weight_map` from tensor name to shard file name, relative to the index's folder). Shards are opened
/// (mapped) the first time one of their tensors is asked for. Safe to use from several threads.
public final class SafeTensorsCollection: @unchecked Sendable {
    /// The file opened: the `.safetensors` file or the index.
    public let path: String
    /// Every tensor name, sorted.
    public let names: [String]
    /// A single file's `__metadata__`, or an index's `metadata` object (non-string values as JSON text,
    /// e.g. `total_size`).
    public let metadata: [String: String]

    private let single: SafeTensorsFile?
    private let weightMap: [String: String]  // tensor name → shard path
    private let lock = PThreadLock()
    private var openShards: [String: SafeTensorsFile] = [:]

    /// Opens `path`: an index when its name ends in `.json`, otherwise a single safetensors file.
    public init(path: String) throws {
        self.path = path
        if path.hasSuffix(".json") {
            let index = try SafeTensorsCollection.readIndex(path)
            single = nil
            weightMap = index.weightMap
            metadata = index.metadata
            names = index.weightMap.keys.sorted()
        } else {
            let file = try SafeTensorsFile(path: path)
            single = file
            weightMap = [:]
            metadata = file.metadata
            names = file.names
        }
    }

    /// Finds a model's weights in `folder` the way diffusers does, trying in order
    /// `baseName.variant.safetensors`, `baseName.variant.safetensors.index.json` (when `variant` is given),
    /// `baseName.safetensors`, `baseName.safetensors.index.json`; e.g. baseName "diffusion_pytorch_model",
    /// variant "fp16".
    /// - Throws: naming the folder and the names tried when none exists.
    public static func open(folder: String, baseName: String, variant: String? = nil) throws -> SafeTensorsCollection {
        let candidates = candidateFileNames(baseName: baseName, variant: variant)
        for name in candidates {
            let candidate = joinPath(folder, name)
            if isRegularFile(candidate) { return try SafeTensorsCollection(path: candidate) }
        }
        throw PEAError.invalidFile(path: folder, reason: "no safetensors weights found; tried \(candidates.joined(separator: ", "))")
    }

    static func candidateFileNames(baseName: String, variant: String?) -> [String] {
        var names: [String] = []
        if let variant {
            names += ["\(baseName).\(variant).safetensors", "\(baseName).\(variant).safetensors.index.json"]
        }
        names += ["\(baseName).safetensors", "\(baseName).safetensors.index.json"]
        return names
    }

    /// The paths of every file holding tensors (the one file, or the distinct shards, sorted).
    public var filePaths: [String] {
        if let single { return [single.path] }
        return Set(weightMap.values).sorted()
    }

    public func contains(_ name: String) -> Bool {
        single?.contains(name) ?? (weightMap[name] != nil)
    }

    public func info(_ name: String) throws -> SafeTensorInfo { try file(for: name).info(name) }

    public func withBytes<R>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        try file(for: name).withBytes(name, body)
    }

    public func tensor(_ name: String) throws -> HostTensor { try file(for: name).tensor(name) }

    public func releasePages(_ name: String) throws { try file(for: name).releasePages(name) }

    public func tensor(_ name: String, expecting shape: [Int]) throws -> HostTensor {
        try file(for: name).tensor(name, expecting: shape)
    }

    /// The file holding `name`, opening its shard on first use.
    public func file(for name: String) throws -> SafeTensorsFile {
        if let single { return single }
        guard let shardPath = weightMap[name] else {
            throw PEAError.invalidFile(path: path, reason: "no tensor named '\(name)' in the index's weight_map")
        }
        let shard: SafeTensorsFile = try lock.withLock {
            if let open = openShards[shardPath] { return open }
            let opened = try SafeTensorsFile(path: shardPath)
            openShards[shardPath] = opened
            return opened
        }
        guard shard.contains(name) else {
            throw PEAError.invalidFile(path: path, reason: "the index puts tensor '\(name)' in shard '\(shardPath)', which has no tensor of that name")
        }
        return shard
    }

    private static func readIndex(_ path: String) throws -> (weightMap: [String: String], metadata: [String: String]) {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        let document: JSONValue
        do {
            document = try JSONValue.parse(try readWholeFile(path))
        } catch let error as JSONParseError {
            throw fail("invalid JSON: \(error)")
        }
        guard case .object(let members) = document else {
            throw fail("a safetensors index must be a JSON object, found \(document.kindDescription)")
        }
        guard let mapValue = members["weight_map"] else { throw fail("missing 'weight_map'") }
        guard case .object(let map) = mapValue else {
            throw fail("'weight_map' must be an object of tensor name to shard file, found \(mapValue.kindDescription)")
        }
        let folder = parentFolder(path)
        var weightMap: [String: String] = [:]
        var checked: Set<String> = []
        for (name, value) in map {
            guard case .string(let shard) = value, !shard.isEmpty else {
                throw fail("weight_map entry '\(name)' must be a shard file name, found \(value.kindDescription)")
            }
            guard !shard.hasPrefix("/"), !shard.split(separator: "/").contains("..") else {
                throw fail("weight_map entry '\(name)' names shard '\(shard)' outside the index's folder")
            }
            let shardPath = joinPath(folder, shard)
            if checked.insert(shardPath).inserted, !isRegularFile(shardPath) {
                throw fail("shard '\(shard)' (for tensor '\(name)') does not exist: \(shardPath)")
            }
            weightMap[name] = shardPath
        }
        var metadata: [String: String] = [:]
        if case .object(let entries)? = members["metadata"] {
            for (key, value) in entries {
                if case .string(let text) = value { metadata[key] = text } else { metadata[key] = value.serialized() }
            }
        }
        return (weightMap, metadata)
    }
}

// MARK: - Writing

/// Writes safetensors files that the reference library reads, laid out as it lays them out
/// (`safetensors.serialize_to_file`): tensors sorted by dtype, larger alignment first
/// (I64, F32, I32, BF16, F16), then by name; header entries in that same order with `__metadata__` first
/// when there is any (metadata keys sorted); header padded with spaces to a multiple of 8 bytes, so each
/// tensor's data are aligned to its element size. For files without metadata, or with one key, the bytes are
/// identical to those the Python library writes for the same tensors.
public enum SafeTensorsWriter {
    /// Writes `tensors` to `path` atomically: into a temporary file in the same folder, then `rename`d over
    /// `path`. On any failure the temporary file is removed and `path` is left as it was.
    /// - Throws: `PEAError.invalidFile(path:reason:)` for duplicate or reserved names, tensors whose bytes
    ///   do not match their shape, and I/O errors.
    public static func write(_ tensors: [(name: String, tensor: HostTensor)], metadata: [String: String] = [:], to path: String) throws {
        let (header, order) = try layout(tensors, metadata: metadata, path: path)
        var prefix = [UInt8](repeating: 0, count: 8)
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { prefix = Array($0) }

        try writeFileAtomically(to: path) { append in
            try append(prefix)
            try append(header)
            for index in order { try append(tensors[index].tensor.bytes) }
        }
    }

    /// The JSON header (padded) and the order in which tensor data follow it.
    static func layout(_ tensors: [(name: String, tensor: HostTensor)], metadata: [String: String], path: String) throws -> (header: [UInt8], order: [Int]) {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        var seen: Set<String> = []
        for (name, tensor) in tensors {
            guard name != "__metadata__" else { throw fail("'__metadata__' is reserved and cannot name a tensor") }
            guard seen.insert(name).inserted else { throw fail("duplicate tensor name '\(name)'") }
            var elements = 1
            for dimension in tensor.shape {
                let (product, overflow) = elements.multipliedReportingOverflow(by: dimension)
                guard dimension >= 0, !overflow else { throw fail("tensor '\(name)' has an invalid shape \(tensor.shape)") }
                elements = product
            }
            let (byteCount, overflow) = elements.multipliedReportingOverflow(by: tensor.dtype.byteSize)
            guard !overflow, byteCount == tensor.bytes.count else {
                throw fail("tensor '\(name)' holds \(tensor.bytes.count) bytes, but shape \(tensor.shape) of \(tensor.dtype) needs \(byteCount)")
            }
        }
        let order = tensors.indices.sorted { a, b in
            let rankA = SafeTensorsDTypeTable.rank(of: tensors[a].tensor.dtype)
            let rankB = SafeTensorsDTypeTable.rank(of: tensors[b].tensor.dtype)
            if rankA != rankB { return rankA > rankB }
            return tensors[a].name.utf8.lexicographicallyPrecedes(tensors[b].name.utf8)
        }

        var header: [UInt8] = [UInt8(ascii: "{")]
        var first = true
        func separator() {
            if !first { header.append(UInt8(ascii: ",")) }
            first = false
        }
        if !metadata.isEmpty {
            separator()
            header.append(contentsOf: #""__metadata__":"#.utf8)
            JSONValue.object(metadata.mapValues { .string($0) }).serialize(into: &header)
        }
        var offset = 0
        for index in order {
            let (name, tensor) = tensors[index]
            separator()
            JSONValue.appendEscaped(name, to: &header)
            header.append(contentsOf: #":{"dtype":"#.utf8)
            JSONValue.appendEscaped(tensor.dtype.safetensorsName, to: &header)
            header.append(contentsOf: #","shape":"#.utf8)
            JSONValue.array(tensor.shape.map { .number(Double($0)) }).serialize(into: &header)
            header.append(contentsOf: ",\"data_offsets\":[\(offset),\(offset + tensor.bytes.count)]}".utf8)
            offset += tensor.bytes.count
        }
        header.append(UInt8(ascii: "}"))
        header.append(contentsOf: repeatElement(UInt8(ascii: " "), count: (8 - header.count % 8) % 8))
        return (header, order)
    }
}
