/// A tar file read in place from a memory map: entries are visited in order and their data are views into
/// the map, so a shard of any size costs no copies until a member is decoded.
///
/// Formats: POSIX ustar (name + prefix), GNU (long names in 'L' entries, base-256 sizes) and POSIX.1-2001
/// pax ('x' extended headers: `path` and `size` override the header's; 'g' global headers are skipped), which
/// covers what Python's `tarfile` (any format), GNU tar, bsdtar and webdataset's writers produce. Header
/// checksums are verified. Compressed tars (gzip, bzip2, xz, zstd) are refused with an error that says so.
public final class TarArchive: @unchecked Sendable {
    public let path: String
    let file: MappedBytes

    /// Maps the file at `path`.
    /// - Throws: `PEAError.invalidFile` naming the path when it cannot be mapped or is compressed.
    public init(path: String) throws {
        self.path = path
        file = try MappedBytes(path: path)
        try checkNotCompressed()
    }

    /// A tar held in memory (tests); `path` names it in errors.
    init(bytes: [UInt8], path: String) throws {
        self.path = path
        file = MappedBytes(copying: bytes)
        try checkNotCompressed()
    }

    private func checkNotCompressed() throws {
        let bytes = file.buffer
        let signatures: [(String, [UInt8])] = [("gzip", [0x1F, 0x8B]), ("bzip2", [0x42, 0x5A, 0x68]),
                                               ("xz", [0xFD, 0x37, 0x7A, 0x58, 0x5A]), ("zstd", [0x28, 0xB5, 0x2F, 0xFD])]
        for (name, signature) in signatures where bytes.count >= signature.count && bytes.prefix(signature.count).elementsEqual(signature) {
            throw PEAError.invalidFile(path: path, reason: "a \(name)-compressed file; only uncompressed tar shards are read")
        }
    }

    /// One member of the archive. `data` is valid while the archive (which the entry keeps alive) exists.
    public struct Entry: @unchecked Sendable {
        public enum Kind: Equatable, Sendable { case file, directory, other(UInt8) }
        public let name: String
        public let kind: Kind
        /// The data's offset in the tar file and its size.
        public let offset: Int
        public let size: Int
        let archive: TarArchive

        /// The member's bytes, a view into the mapped file.
        public var data: UnsafeRawBufferPointer {
            UnsafeRawBufferPointer(rebasing: archive.file.buffer[offset..<(offset + size)])
        }

        public var bytes: [UInt8] { Array(data) }
    }

    public func makeIterator() -> Iterator { Iterator(archive: self) }

    /// Every entry (tests and small archives; streaming readers use `makeIterator`).
    public func entries() throws -> [Entry] {
        var iterator = makeIterator()
        var entries: [Entry] = []
        while let entry = try iterator.next() { entries.append(entry) }
        return entries
    }

    /// Walks the headers. `next()` returns nil at the end-of-archive marker (a zero block) or at the end of
    /// the file, and throws `PEAError.invalidFile` naming the archive and the byte offset for a bad checksum,
    /// a malformed size or pax record, or a member that runs past the end of the file.
    public struct Iterator {
        let archive: TarArchive
        var offset = 0
        var finished = false

        public mutating func next() throws -> Entry? {
            guard !finished else { return nil }
            let bytes = archive.file.buffer
            var longName: String?
            var paxPath: String?
            var paxSize: Int?
            while true {
                guard offset + 512 <= bytes.count else {
                    // A file that ends without the two zero blocks (or after a partial block) is accepted only
                    // when it ends exactly at a header boundary; a partial header is truncation.
                    finished = true
                    if offset == bytes.count { return nil }
                    throw fail("truncated: \(bytes.count - offset) bytes at byte \(offset) are not a whole 512-byte header")
                }
                let header = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + 512)])
                if header.allSatisfy({ $0 == 0 }) {
                    finished = true
                    return nil
                }
                try verifyChecksum(header)
                let type = header[156]
                let headerSize = try parseNumber(header, 124, 12, field: "size")
                let size = paxSize ?? headerSize
                let dataStart = offset + 512
                // `size` may be anything up to Int.max: compare against what is left rather than adding to it.
                guard size >= 0, size <= bytes.count - dataStart else {
                    finished = true
                    throw fail("truncated: the member at byte \(offset) declares \(size) bytes, but the file ends \(bytes.count - dataStart) bytes later")
                }
                offset = dataStart + (size + 511) / 512 * 512
                let data = UnsafeRawBufferPointer(rebasing: bytes[dataStart..<(dataStart + size)])
                switch type {
                case UInt8(ascii: "L"):  // GNU: the next member's name
                    longName = Self.string(data.prefix { $0 != 0 })
                    continue
                case UInt8(ascii: "K"):  // GNU: the next member's link name (not needed)
                    continue
                case UInt8(ascii: "x"):
                    let records = try parsePax(data, at: dataStart)
                    if let path = records["path"] { paxPath = path }
                    if let sizeText = records["size"] {
                        guard let value = Int(sizeText), value >= 0 else {
                            throw fail("corrupt: pax size '\(sizeText)' at byte \(dataStart)")
                        }
                        paxSize = value
                    }
                    continue
                case UInt8(ascii: "g"):  // pax global header: no per-member fields we use
                    continue
                default:
                    break
                }
                let name = paxPath ?? longName ?? headerName(header)
                let kind: Entry.Kind
                switch type {
                case 0, UInt8(ascii: "0"), UInt8(ascii: "7"): kind = name.hasSuffix("/") ? .directory : .file
                case UInt8(ascii: "5"): kind = .directory
                default: kind = .other(type)
                }
                return Entry(name: name, kind: kind, offset: dataStart, size: kind == .file ? size : 0, archive: archive)
            }
        }

        private func fail(_ reason: String) -> PEAError { .invalidFile(path: archive.path, reason: reason) }

        /// ustar: `prefix/name` when the magic is POSIX's "ustar\0" and the prefix is not empty; GNU's
        /// "ustar  \0" headers use that area for other fields.
        private func headerName(_ header: UnsafeRawBufferPointer) -> String {
            let name = Self.string(header[0..<100].prefix { $0 != 0 })
            let posix = header[257..<263].elementsEqual([0x75, 0x73, 0x74, 0x61, 0x72, 0x00])
            if posix {
                let prefix = Self.string(header[345..<500].prefix { $0 != 0 })
                if !prefix.isEmpty { return prefix + "/" + name }
            }
            return name
        }

        /// The unsigned sum of the header's bytes with the checksum field read as spaces (also accepted: the
        /// signed sum some old tars wrote).
        private func verifyChecksum(_ header: UnsafeRawBufferPointer) throws {
            let stored = try parseNumber(header, 148, 8, field: "checksum")
            var unsigned = 0, signed = 0
            for index in 0..<512 {
                let byte = (148..<156).contains(index) ? 0x20 : header[index]
                unsigned += Int(byte)
                signed += Int(Int8(bitPattern: byte))
            }
            guard stored == unsigned || stored == signed else {
                throw fail("corrupt: header checksum mismatch at byte \(offset) (stored \(stored), computed \(unsigned))")
            }
        }

        /// An octal field (NUL- or space-terminated, leading spaces allowed), or GNU's base-256 form (first
        /// byte's high bit set).
        private func parseNumber(_ header: UnsafeRawBufferPointer, _ start: Int, _ length: Int, field: String) throws -> Int {
            let bytes = header[start..<(start + length)]
            if let first = bytes.first, first & 0x80 != 0 {
                guard first == 0x80 else { throw fail("corrupt: negative or oversized base-256 \(field) at byte \(offset + start)") }
                var value = 0
                for byte in bytes.dropFirst() {
                    guard value < Int.max >> 8 else { throw fail("corrupt: oversized \(field) at byte \(offset + start)") }
                    value = value << 8 | Int(byte)
                }
                return value
            }
            var value = 0, sawDigit = false
            for byte in bytes {
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "7"):
                    guard value < Int.max >> 3 else { throw fail("corrupt: oversized \(field) at byte \(offset + start)") }
                    value = value << 3 | Int(byte - UInt8(ascii: "0"))
                    sawDigit = true
                case UInt8(ascii: " ") where !sawDigit:
                    continue
                case 0, UInt8(ascii: " "):
                    return value
                default:
                    throw fail("corrupt: the \(field) field at byte \(offset + start) is not an octal number")
                }
            }
            return value
        }

        /// pax records: "<length> <key>=<value>\n", length counting the whole record in bytes.
        private func parsePax(_ data: UnsafeRawBufferPointer, at position: Int) throws -> [String: String] {
            var records: [String: String] = [:]
            var index = 0
            while index < data.count {
                if data[index] == 0 { break }  // padding some writers leave
                var length = 0, cursor = index
                while cursor < data.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(data[cursor]) {
                    length = length * 10 + Int(data[cursor] - UInt8(ascii: "0"))
                    cursor += 1
                    guard length <= data.count else { break }
                }
                guard cursor < data.count, data[cursor] == UInt8(ascii: " "), length > cursor - index + 1,
                      index + length <= data.count, data[index + length - 1] == UInt8(ascii: "\n") else {
                    throw fail("corrupt: malformed pax record at byte \(position + index)")
                }
                let record = data[(cursor + 1)..<(index + length - 1)]
                guard let equals = record.firstIndex(of: UInt8(ascii: "=")) else {
                    throw fail("corrupt: pax record without '=' at byte \(position + index)")
                }
                records[Self.string(record[record.startIndex..<equals])] = Self.string(record[(equals + 1)...])
                index += length
            }
            return records
        }

        private static func string<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
            String(decoding: Array(bytes), as: UTF8.self)
        }
    }
}
