/// Tar members in the POSIX ustar format, as webdataset shards hold them: a 512-byte header (name, mode 0644,
/// size and mtime in octal, checksum), the data padded to 512 bytes; an archive ends with two zero blocks.
/// Python's `tarfile`, GNU tar and `TarArchive` read what this writes.
public enum TarWriter {
    /// The most bytes a member name may have here (ustar's `name` field; the `prefix` field is not used).
    public static let maximumNameLength = 100

    /// One regular-file member: header and padded data. `modified` is the mtime in seconds since 1970.
    public static func member(name: String, data: [UInt8], modified: Int = 0) throws -> [UInt8] {
        let nameBytes = Array(name.utf8)
        guard !nameBytes.isEmpty, nameBytes.count <= maximumNameLength, !nameBytes.contains(0) else {
            throw PEAError.usage("tar member name '\(name)' must be 1 to \(maximumNameLength) bytes without NUL")
        }
        var header = [UInt8](repeating: 0, count: 512)
        func put(_ bytes: [UInt8], at offset: Int) { header.replaceSubrange(offset..<offset + bytes.count, with: bytes) }
        func octal(_ value: Int, width: Int) -> [UInt8] {   // zero-padded, NUL-terminated: width - 1 digits
            let digits = String(value, radix: 8)
            return Array((String(repeating: "0", count: max(0, width - 1 - digits.count)) + digits).utf8) + [0]
        }
        put(nameBytes, at: 0)
        put(octal(0o644, width: 8), at: 100)              // mode
        put(octal(0, width: 8), at: 108)                  // uid
        put(octal(0, width: 8), at: 116)                  // gid
        put(octal(data.count, width: 12), at: 124)        // size
        put(octal(max(0, modified), width: 12), at: 136)  // mtime
        put(Array(repeating: 0x20, count: 8), at: 148)    // checksum field counts as spaces while summing
        header[156] = UInt8(ascii: "0")                   // regular file
        put(Array("ustar".utf8) + [0], at: 257)
        put(Array("00".utf8), at: 263)
        let checksum = header.reduce(0) { $0 + Int($1) }
        put(octal(checksum, width: 7) + [0x20], at: 148)  // six digits, NUL, space
        let padding = (512 - data.count % 512) % 512
        return header + data + [UInt8](repeating: 0, count: padding)
    }

    /// The end of an archive: two zero blocks.
    public static let endOfArchive = [UInt8](repeating: 0, count: 1024)
}
