#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import CZlib

// The zip container of torch.save files (TorchCheckpoint.swift): stored entries located through the central
// directory, zip64 included; an entry's declared CRC-32 checked on request (zlib).

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
