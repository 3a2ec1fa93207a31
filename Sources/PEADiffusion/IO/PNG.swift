#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CZlib

// PNG files (ISO/IEC 15948, the W3C PNG specification): 8-bit RGB out; in, 8-bit RGB/RGBA through PNGReader
// and every kind through PNGDecoder (PNGDecoder.swift), which parses, inflates and unfilters for both.
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

    /// The bytes of the PNG file `write` would write, for a PNG kept in memory (a server's response).
    public static func encode(rgb: [UInt8], width: Int, height: Int, textChunks: [(key: String, value: String)] = []) throws -> [UInt8] {
        try encode(rgb: rgb, width: width, height: height, textChunks: textChunks, path: "<PNG in memory>")
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
/// image tools commonly produce for such images, with their text chunks. Other color types, bit depths and
/// interlacing are refused with an error saying which. The decoding itself is `PNGDecoder`'s; this keeps the
/// 8-bit RGB(A) contract on top of it.
public enum PNGReader {
    /// - Throws: `PEAError.invalidFile` naming `path` for unreadable, truncated or corrupt files (bad
    ///   signature, CRC, zlib data, filter type, missing chunks) and unsupported formats.
    public static func read(path: String) throws -> PNGImage {
        try decode(readWholeFile(path), path: path)
    }

    /// Decodes the bytes of a PNG file; `path` names it in errors.
    public static func decode(_ bytes: [UInt8], path: String) throws -> PNGImage {
        let decoded = try bytes.withUnsafeBytes { buffer in
            try PNGDecoder.decode(buffer, path: path, readText: true) { try requireRGB8(header: $0, path: path) }
        }
        return PNGImage(width: decoded.width, height: decoded.height, channels: decoded.channels,
                        pixels: decoded.samples.map { UInt8(truncatingIfNeeded: $0) }, textChunks: decoded.textChunks)
    }

    /// Refuses, as soon as IHDR is read, what is not 8-bit RGB or RGBA without interlacing.
    private static func requireRGB8(header: PNGDecoder.Header, path: String) throws {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        guard header.colorType == 2 || header.colorType == 6 else {
            let names = [0: "grayscale", 3: "palette", 4: "grayscale with alpha"]
            throw fail("unsupported color type \(header.colorType) (\(names[header.colorType] ?? "invalid")); only RGB (2) and RGBA (6) are read")
        }
        guard header.bitDepth == 8 else { throw fail("unsupported bit depth \(header.bitDepth); only 8-bit images are read") }
        guard !header.interlaced else { throw fail("unsupported: interlaced (Adam7) images are not read") }
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

    static func readUInt32<Bytes: RandomAccessCollection>(_ bytes: Bytes, at offset: Int) -> UInt32
    where Bytes.Element == UInt8, Bytes.Index == Int {
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
}

