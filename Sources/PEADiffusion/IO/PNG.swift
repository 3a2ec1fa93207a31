#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CZlib

// PNG files (ISO/IEC 15948, the W3C PNG specification): 8-bit RGB out, 8-bit RGB/RGBA in.
// Layout: the 8-byte signature, then chunks of [length: u32 BE][type: 4 ASCII][data][CRC-32 of type+data].
// Image data: each row is one filter-type byte followed by the row's bytes, filtered against the row above;
// all rows together form one zlib stream, split over IDAT chunks. zlib does (de)compression and the CRCs.

/// Writes generated images as 8-bit RGB PNG files with their generation parameters in text chunks, the way
/// A1111's web UI stores them (key `parameters`), so existing tools show them.
public enum PNGWriter {
    /// Writes `rgb` (row-major, 3 bytes per pixel, `width · height · 3` bytes) to `path` atomically: into a
    /// temporary file in the same folder, then `rename`d over `path`; on any failure the temporary file is
    /// removed. Each text chunk is a tEXt chunk when its value is Latin-1, else an uncompressed iTXt chunk
    /// (UTF-8), as Pillow's `PngInfo.add_text` chooses.
    /// - Throws: `PEAError.invalidFile` naming `path`: bad dimensions or pixel count, a keyword PNG does not
    ///   allow (1–79 Latin-1 characters, no NUL, no leading, trailing or double spaces), a value containing
    ///   NUL, and I/O errors.
    public static func write(rgb: [UInt8], width: Int, height: Int, textChunks: [(key: String, value: String)] = [],
                             to path: String) throws {
        let bytes = try encode(rgb: rgb, width: width, height: height, textChunks: textChunks, path: path)
        try writeFileAtomically(to: path) { append in try append(bytes) }
    }

    /// The bytes of the PNG file `write` would write (`path` only names it in errors).
    static func encode(rgb: [UInt8], width: Int, height: Int, textChunks: [(key: String, value: String)],
                       path: String) throws -> [UInt8] {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        guard width > 0, height > 0, width <= PNGFormat.maximumDimension, height <= PNGFormat.maximumDimension else {
            throw fail("cannot write a PNG of \(width)×\(height) pixels")
        }
        let (pixelBytes, overflow) = width.multipliedReportingOverflow(by: height * 3)
        guard !overflow, rgb.count == pixelBytes else {
            throw fail("\(rgb.count) RGB bytes do not make a \(width)×\(height) image (\(width)·\(height)·3 bytes)")
        }

        var file = PNGFormat.signature
        var header: [UInt8] = []
        PNGFormat.appendUInt32(UInt32(width), to: &header)
        PNGFormat.appendUInt32(UInt32(height), to: &header)
        // bit depth 8, color type 2 (RGB), compression 0 (deflate), filter method 0, no interlace
        header += [8, 2, 0, 0, 0]
        PNGFormat.appendChunk("IHDR", header, to: &file)

        // Text before the image data, where Pillow and A1111 put it (readers that stop at IDAT still see it).
        for (key, value) in textChunks {
            try PNGFormat.appendTextChunk(key: key, value: value, to: &file, path: path)
        }

        let filtered = PNGFormat.filterRows(rgb, width: width, height: height, channels: 3)
        let compressed = try PNGFormat.deflate(filtered, path: path)
        // IDAT chunks of at most 1 MiB, so no single chunk approaches PNG's 2³¹−1 limit on huge images.
        var start = 0
        repeat {
            let end = min(start + (1 << 20), compressed.count)
            PNGFormat.appendChunk("IDAT", Array(compressed[start..<end]), to: &file)
            start = end
        } while start < compressed.count
        PNGFormat.appendChunk("IEND", [], to: &file)
        return file
    }
}

/// A decoded PNG image: 8-bit samples, row-major, interleaved (`channels` bytes per pixel).
public struct PNGImage {
    public let width: Int
    public let height: Int
    /// 3 for RGB, 4 for RGBA.
    public let channels: Int
    public let pixels: [UInt8]
    /// tEXt, zTXt and iTXt chunks in file order (iTXt language tags and translated keywords are dropped).
    public let textChunks: [(key: String, value: String)]

    /// The value of the first text chunk named `key`.
    public func text(_ key: String) -> String? { textChunks.first { $0.key == key }?.value }
}

/// Reads 8-bit RGB and RGBA non-interlaced PNG files (every filter type), which is what Pea writes and what
/// image tools commonly produce for such images. Other color types, bit depths and interlacing are refused
/// with an error saying which.
public enum PNGReader {
    /// - Throws: `PEAError.invalidFile` naming `path` for unreadable, truncated or corrupt files (bad
    ///   signature, CRC, zlib data, filter type, missing chunks) and unsupported formats.
    public static func read(path: String) throws -> PNGImage {
        try decode(readWholeFile(path), path: path)
    }

    /// Decodes the bytes of a PNG file; `path` names it in errors.
    public static func decode(_ bytes: [UInt8], path: String) throws -> PNGImage {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        guard bytes.count >= 8 else { throw fail("not a PNG file: only \(bytes.count) bytes") }
        guard Array(bytes[0..<8]) == PNGFormat.signature else { throw fail("not a PNG file: wrong signature") }

        var header: (width: Int, height: Int, channels: Int)?
        var imageData: [UInt8] = []
        var textChunks: [(key: String, value: String)] = []
        var sawEnd = false
        var offset = 8
        while !sawEnd {
            guard offset + 8 <= bytes.count else {
                throw fail("truncated: the file ends at byte \(bytes.count) before the IEND chunk")
            }
            let length = Int(PNGFormat.readUInt32(bytes, at: offset))
            let typeBytes = Array(bytes[(offset + 4)..<(offset + 8)])
            guard typeBytes.allSatisfy({ (65...90).contains($0) || (97...122).contains($0) }) else {
                throw fail("corrupt: invalid chunk type at byte \(offset + 4)")
            }
            let type = String(decoding: typeBytes, as: UTF8.self)
            guard length <= PNGFormat.maximumChunkLength, offset + 12 + length <= bytes.count else {
                throw fail("truncated or corrupt: chunk \(type) at byte \(offset) declares \(length) data bytes, but only \(bytes.count - offset) bytes are left")
            }
            let dataStart = offset + 8, dataEnd = dataStart + length
            let storedCRC = PNGFormat.readUInt32(bytes, at: dataEnd)
            let data = Array(bytes[dataStart..<dataEnd])
            guard PNGFormat.crc(type: typeBytes, data: data) == storedCRC else {
                throw fail("corrupt: CRC mismatch in chunk \(type) at byte \(offset)")
            }
            offset = dataEnd + 4

            if header == nil && type != "IHDR" { throw fail("corrupt: the first chunk is \(type), not IHDR") }
            switch type {
            case "IHDR":
                guard header == nil else { throw fail("corrupt: a second IHDR chunk") }
                header = try parseHeader(data, fail: fail)
            case "IDAT":
                imageData += data
            case "IEND":
                sawEnd = true
            case "tEXt", "zTXt", "iTXt":
                textChunks.append(try parseText(type: type, data, fail: fail))
            default:
                // Lowercase first letter: ancillary, safe to skip. PLTE is only a suggestion for RGB images.
                guard typeBytes[0] >= 97 || type == "PLTE" else {
                    throw fail("unsupported: critical chunk \(type)")
                }
            }
        }
        guard let (width, height, channels) = header else { throw fail("corrupt: no IHDR chunk") }
        guard !imageData.isEmpty else { throw fail("corrupt: no IDAT chunk") }

        let rowBytes = width * channels
        let filteredSize = height * (1 + rowBytes)
        let filtered = try PNGFormat.inflate(imageData, limit: filteredSize, what: "image data", fail: fail)
        guard filtered.count == filteredSize else {
            throw fail("corrupt: the image data inflate to \(filtered.count) bytes, \(width)×\(height) needs \(filteredSize)")
        }
        let pixels = try PNGFormat.unfilterRows(filtered, width: width, height: height, channels: channels, fail: fail)
        return PNGImage(width: width, height: height, channels: channels, pixels: pixels, textChunks: textChunks)
    }

    private static func parseHeader(_ data: [UInt8], fail: (String) -> PEAError) throws -> (Int, Int, Int) {
        guard data.count == 13 else { throw fail("corrupt: IHDR has \(data.count) bytes, not 13") }
        let width = Int(PNGFormat.readUInt32(data, at: 0)), height = Int(PNGFormat.readUInt32(data, at: 4))
        let bitDepth = data[8], colorType = data[9]
        guard width > 0, height > 0, width <= PNGFormat.maximumDimension, height <= PNGFormat.maximumDimension else {
            throw fail("corrupt: image size \(width)×\(height)")
        }
        let channels: Int
        switch colorType {
        case 2: channels = 3
        case 6: channels = 4
        default:
            let names: [UInt8: String] = [0: "grayscale", 3: "palette", 4: "grayscale with alpha"]
            throw fail("unsupported color type \(colorType) (\(names[colorType] ?? "invalid")); only RGB (2) and RGBA (6) are read")
        }
        guard bitDepth == 8 else { throw fail("unsupported bit depth \(bitDepth); only 8-bit images are read") }
        guard data[10] == 0 else { throw fail("unsupported compression method \(data[10])") }
        guard data[11] == 0 else { throw fail("unsupported filter method \(data[11])") }
        guard data[12] == 0 else {
            throw fail(data[12] == 1 ? "unsupported: interlaced (Adam7) images are not read" : "corrupt: interlace method \(data[12])")
        }
        // Refuse sizes whose decoded data would not fit comfortably in memory (and guard the arithmetic).
        guard width * channels < 1 << 30, height * (1 + width * channels) <= 1 << 31 else {
            throw fail("unsupported: a \(width)×\(height) image is too large")
        }
        return (width, height, channels)
    }

    private static func parseText(type: String, _ data: [UInt8], fail: (String) -> PEAError) throws -> (key: String, value: String) {
        guard let keywordEnd = data.firstIndex(of: 0), keywordEnd > 0 else {
            throw fail("corrupt: \(type) chunk without a keyword")
        }
        let key = PNGFormat.latin1String(data[0..<keywordEnd])
        var rest = data[(keywordEnd + 1)...]
        switch type {
        case "tEXt":
            return (key, PNGFormat.latin1String(rest))
        case "zTXt":
            guard rest.first == 0 else { throw fail("corrupt: zTXt '\(key)' with compression method \(rest.first.map(String.init) ?? "missing")") }
            let text = try PNGFormat.inflate(Array(rest.dropFirst()), limit: PNGFormat.maximumTextLength, what: "zTXt '\(key)'", fail: fail)
            return (key, PNGFormat.latin1String(text[...]))
        default:  // iTXt: compression flag, method, language tag NUL, translated keyword NUL, UTF-8 text
            guard rest.count >= 2 else { throw fail("corrupt: iTXt '\(key)' is truncated") }
            let compressed = rest[rest.startIndex] == 1
            guard rest[rest.startIndex + 1] == 0 else { throw fail("corrupt: iTXt '\(key)' with compression method \(rest[rest.startIndex + 1])") }
            rest = rest.dropFirst(2)
            for _ in 0..<2 {
                guard let end = rest.firstIndex(of: 0) else { throw fail("corrupt: iTXt '\(key)' is truncated") }
                rest = rest[(end + 1)...]
            }
            var text = Array(rest)
            if compressed {
                text = try PNGFormat.inflate(text, limit: PNGFormat.maximumTextLength, what: "iTXt '\(key)'", fail: fail)
            }
            guard let value = String(validating: text, as: UTF8.self) else {
                throw fail("corrupt: iTXt '\(key)' is not valid UTF-8")
            }
            return (key, value)
        }
    }
}

/// The pieces of the format both directions share.
enum PNGFormat {
    static let signature: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
    /// Widths, heights and chunk lengths are at most 2³¹−1 (the specification's limit).
    static let maximumDimension = Int(Int32.max)
    static let maximumChunkLength = Int(Int32.max)
    /// The most a compressed text chunk may inflate to (a generous bound for prompts and parameters).
    static let maximumTextLength = 64 << 20

    static func readUInt32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16 | UInt32(bytes[offset + 2]) << 8 | UInt32(bytes[offset + 3])
    }

    static func appendUInt32(_ value: UInt32, to bytes: inout [UInt8]) {
        bytes += [UInt8(value >> 24), UInt8(truncatingIfNeeded: value >> 16), UInt8(truncatingIfNeeded: value >> 8),
                  UInt8(truncatingIfNeeded: value)]
    }

    /// The CRC-32 a chunk stores: over its type and data, not its length.
    static func crc(type: [UInt8], data: [UInt8]) -> UInt32 {
        var value = crc32(0, nil, 0)
        value = type.withUnsafeBufferPointer { crc32(value, $0.baseAddress, uInt($0.count)) }
        value = data.withUnsafeBufferPointer { crc32(value, $0.baseAddress, uInt($0.count)) }
        return UInt32(truncatingIfNeeded: value)
    }

    static func appendChunk(_ type: String, _ data: [UInt8], to file: inout [UInt8]) {
        let typeBytes = Array(type.utf8)
        appendUInt32(UInt32(data.count), to: &file)
        file += typeBytes
        file += data
        appendUInt32(crc(type: typeBytes, data: data), to: &file)
    }

    static func appendTextChunk(key: String, value: String, to file: inout [UInt8], path: String) throws {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        guard let keyword = latin1Bytes(key), (1...79).contains(keyword.count),
              keyword.allSatisfy({ (32...126).contains($0) || $0 >= 161 }),
              keyword.first != 32, keyword.last != 32, !key.contains("  ") else {
            throw fail("'\(key)' cannot be a PNG text keyword (1–79 printable Latin-1 characters, single inner spaces)")
        }
        guard !value.unicodeScalars.contains("\0") else { throw fail("the text of '\(key)' contains a NUL character") }
        if let latin1 = latin1Bytes(value) {
            appendChunk("tEXt", keyword + [0] + latin1, to: &file)
        } else {
            // keyword, NUL, compression flag 0 and method 0, empty language tag and translated keyword, UTF-8 text
            appendChunk("iTXt", keyword + [0, 0, 0, 0, 0] + Array(value.utf8), to: &file)
        }
    }

    /// The string's bytes in ISO 8859-1, or nil when a character is outside it.
    static func latin1Bytes(_ text: String) -> [UInt8]? {
        var bytes: [UInt8] = []
        for scalar in text.unicodeScalars {
            guard scalar.value <= 0xFF else { return nil }
            bytes.append(UInt8(scalar.value))
        }
        return bytes
    }

    static func latin1String(_ bytes: ArraySlice<UInt8>) -> String {
        var text = ""
        text.unicodeScalars.append(contentsOf: bytes.map { Unicode.Scalar($0) })
        return text
    }

    // MARK: zlib

    static func deflate(_ input: [UInt8], path: String) throws -> [UInt8] {
        var output = [UInt8](repeating: 0, count: Int(compressBound(uLong(input.count))))
        var outputCount = uLongf(output.count)
        let status = output.withUnsafeMutableBufferPointer { out in
            input.withUnsafeBufferPointer { source in
                compress2(out.baseAddress, &outputCount, source.baseAddress, uLong(source.count), Z_DEFAULT_COMPRESSION)
            }
        }
        guard status == Z_OK else {
            throw PEAError.invalidFile(path: path, reason: "zlib could not compress the image data (status \(status))")
        }
        output.removeSubrange(Int(outputCount)...)
        return output
    }

    /// Inflates one zlib stream; more than `limit` bytes of output is an error (a corrupt file or a
    /// decompression bomb), raised before anything beyond the limit is kept. `what` names the data in errors.
    static func inflate(_ input: [UInt8], limit: Int, what: String, fail: (String) -> PEAError) throws -> [UInt8] {
        var stream = z_stream()
        guard inflateInit_(&stream, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw fail("zlib could not start inflating the \(what)")
        }
        defer { inflateEnd(&stream) }

        var output: [UInt8] = []
        output.reserveCapacity(min(limit, max(4096, input.count * 8)))
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        var input = input
        var status: Int32 = Z_OK
        try input.withUnsafeMutableBufferPointer { source in
            stream.next_in = source.baseAddress
            stream.avail_in = uInt(source.count)
            repeat {
                let produced = chunk.withUnsafeMutableBufferPointer { buffer -> Int in
                    stream.next_out = buffer.baseAddress
                    stream.avail_out = uInt(buffer.count)
                    status = CZlib.inflate(&stream, Z_NO_FLUSH)
                    return buffer.count - Int(stream.avail_out)
                }
                guard status == Z_OK || status == Z_STREAM_END else {
                    if status == Z_BUF_ERROR { throw fail("truncated: the \(what) end before their zlib stream does") }
                    throw fail("corrupt: the \(what) are not a valid zlib stream (\(zlibMessage(stream, status)))")
                }
                guard output.count + produced <= limit else {
                    throw fail("corrupt: the \(what) inflate to more than the \(limit) bytes expected")
                }
                output += chunk[0..<produced]
            } while status != Z_STREAM_END
        }
        return output
    }

    private static func zlibMessage(_ stream: z_stream, _ status: Int32) -> String {
        if let message = stream.msg { return String(cString: message) }
        return "status \(status)"
    }

    // MARK: filters (PNG filter method 0)

    /// The five filter types: 0 None, 1 Sub (left), 2 Up (above), 3 Average (of left and above), 4 Paeth.
    static func predictor(_ type: UInt8, left: UInt8, up: UInt8, upLeft: UInt8) -> UInt8 {
        switch type {
        case 1: return left
        case 2: return up
        case 3: return UInt8((Int(left) + Int(up)) / 2)
        case 4: return paeth(left: left, up: up, upLeft: upLeft)
        default: return 0
        }
    }

    /// The neighbour closest to left + up − upLeft, ties broken in the order left, up, upLeft.
    static func paeth(left: UInt8, up: UInt8, upLeft: UInt8) -> UInt8 {
        let estimate = Int(left) + Int(up) - Int(upLeft)
        let toLeft = abs(estimate - Int(left)), toUp = abs(estimate - Int(up)), toUpLeft = abs(estimate - Int(upLeft))
        if toLeft <= toUp && toLeft <= toUpLeft { return left }
        if toUp <= toUpLeft { return up }
        return upLeft
    }

    /// Rows prefixed with their filter type, each row filtered with the type that gives the smallest sum of
    /// absolute (signed) residuals — libpng's heuristic, which compresses photographs well.
    static func filterRows(_ pixels: [UInt8], width: Int, height: Int, channels: Int) -> [UInt8] {
        let rowBytes = width * channels
        var output = [UInt8](repeating: 0, count: height * (1 + rowBytes))
        var candidate = [UInt8](repeating: 0, count: rowBytes)
        var best = [UInt8](repeating: 0, count: rowBytes)
        for row in 0..<height {
            let start = row * rowBytes
            var bestType: UInt8 = 0, bestCost = Int.max
            for type: UInt8 in 0...4 {
                var cost = 0
                for index in 0..<rowBytes {
                    let left = index >= channels ? pixels[start + index - channels] : 0
                    let up = row > 0 ? pixels[start - rowBytes + index] : 0
                    let upLeft = row > 0 && index >= channels ? pixels[start - rowBytes + index - channels] : 0
                    let residual = pixels[start + index] &- predictor(type, left: left, up: up, upLeft: upLeft)
                    candidate[index] = residual
                    cost += abs(Int(Int8(bitPattern: residual)))
                }
                if cost < bestCost {
                    bestCost = cost
                    bestType = type
                    swap(&best, &candidate)
                }
            }
            let outputStart = row * (1 + rowBytes)
            output[outputStart] = bestType
            output.replaceSubrange((outputStart + 1)...(outputStart + rowBytes), with: best)
        }
        return output
    }

    static func unfilterRows(_ filtered: [UInt8], width: Int, height: Int, channels: Int,
                             fail: (String) -> PEAError) throws -> [UInt8] {
        let rowBytes = width * channels
        var pixels = [UInt8](repeating: 0, count: height * rowBytes)
        for row in 0..<height {
            let type = filtered[row * (1 + rowBytes)]
            guard type <= 4 else { throw fail("corrupt: row \(row) has filter type \(type)") }
            let source = row * (1 + rowBytes) + 1, start = row * rowBytes
            for index in 0..<rowBytes {
                let left = index >= channels ? pixels[start + index - channels] : 0
                let up = row > 0 ? pixels[start - rowBytes + index] : 0
                let upLeft = row > 0 && index >= channels ? pixels[start - rowBytes + index - channels] : 0
                pixels[start + index] = filtered[source + index] &+ predictor(type, left: left, up: up, upLeft: upLeft)
            }
        }
        return pixels
    }
}

