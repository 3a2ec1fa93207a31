// A complete PNG decoder for training images (ISO/IEC 15948): every colour type (0 greyscale, 2 RGB, 3 palette,
// 4 greyscale + alpha, 6 RGBA), every bit depth the specification allows for it (1, 2, 4, 8, 16), all five
// filter types, Adam7 interlacing, and the text chunks (tEXt, zTXt, iTXt) on request. It reads what datasets
// contain and converts it to RGB exactly as Pillow's `Image.open(f).convert("RGB")` does; PNGReader (PNG.swift)
// is a thin layer over it for the 8-bit RGB(A) files Pea writes. The chunk layout, CRCs, zlib and the filter
// predictors are PNGFormat's.

/// A PNG file's samples as stored, before any colour conversion.
public struct PNGDecodedImage: Equatable, Sendable {
    public let width: Int
    public let height: Int
    /// 0 greyscale, 2 RGB, 3 palette, 4 greyscale + alpha, 6 RGBA.
    public let colorType: Int
    /// 1, 2, 4, 8 or 16 bits per sample.
    public let bitDepth: Int
    public let interlaced: Bool
    /// Samples per pixel: 1 (grey, palette index), 2 (grey + alpha), 3 (RGB), 4 (RGBA).
    public let channels: Int
    /// `height · width · channels` samples, row-major, interleaved, each at the file's bit depth (palette
    /// indices for colour type 3).
    public let samples: [UInt16]
    /// The PLTE chunk as RGB triples (`3 · entries` bytes); empty when the file has none.
    public let palette: [UInt8]
    /// tEXt, zTXt and iTXt chunks in file order (iTXt language tags and translated keywords are dropped);
    /// empty unless the file was decoded with `readText`.
    public let textChunks: [(key: String, value: String)]

    public static func == (lhs: Self, rhs: Self) -> Bool {
        (lhs.width, lhs.height, lhs.colorType, lhs.bitDepth, lhs.interlaced, lhs.channels)
            == (rhs.width, rhs.height, rhs.colorType, rhs.bitDepth, rhs.interlaced, rhs.channels)
            && lhs.samples == rhs.samples && lhs.palette == rhs.palette
            && lhs.textChunks.elementsEqual(rhs.textChunks, by: ==)
    }

    /// The image as 8-bit RGB, as Pillow gives it for `Image.open(path).convert("RGB")`: Pillow's mode for
    /// each kind of file, then its conversion to RGB —
    /// - greyscale: 1-bit (mode "1") 0 → 0, 1 → 255; 2- and 4-bit scaled to 0…255 (×85, ×17); 8-bit as is;
    ///   16-bit (mode "I;16") clipped to 255 (Pillow's I;16 → RGB conversion saturates, it does not scale);
    ///   the grey value is repeated in R, G and B;
    /// - RGB, greyscale + alpha and RGBA: 16-bit samples keep their high byte (Pillow's "…;16B" raw modes);
    ///   alpha is dropped, not composited;
    /// - palette: the PLTE colour of each index (transparency dropped); an index past the palette's end is
    ///   black.
    public func rgb() -> RGBImage {
        let pixelCount = width * height
        var rgb = [UInt8](repeating: 0, count: pixelCount * 3)
        samples.withUnsafeBufferPointer { source in
            rgb.withUnsafeMutableBufferPointer { out in
                switch colorType {
                case 0:
                    let scale: (UInt16) -> UInt8
                    switch bitDepth {
                    case 1: scale = { $0 == 0 ? 0 : 255 }
                    case 2: scale = { UInt8($0 * 85) }
                    case 4: scale = { UInt8($0 * 17) }
                    case 8: scale = { UInt8($0) }
                    default: scale = { UInt8(min($0, 255)) }
                    }
                    for index in 0..<pixelCount {
                        let value = scale(source[index])
                        out[3 * index] = value; out[3 * index + 1] = value; out[3 * index + 2] = value
                    }
                case 3:
                    let entries = palette.count / 3
                    for index in 0..<pixelCount {
                        let entry = Int(source[index])
                        guard entry < entries else { continue }  // black
                        out[3 * index] = palette[3 * entry]
                        out[3 * index + 1] = palette[3 * entry + 1]
                        out[3 * index + 2] = palette[3 * entry + 2]
                    }
                default:
                    let shift: UInt16 = bitDepth == 16 ? 8 : 0
                    let grey = colorType == 4
                    for index in 0..<pixelCount {
                        let base = index * channels
                        if grey {
                            let value = UInt8(source[base] >> shift)
                            out[3 * index] = value; out[3 * index + 1] = value; out[3 * index + 2] = value
                        } else {
                            out[3 * index] = UInt8(source[base] >> shift)
                            out[3 * index + 1] = UInt8(source[base + 1] >> shift)
                            out[3 * index + 2] = UInt8(source[base + 2] >> shift)
                        }
                    }
                }
            }
        }
        return RGBImage(width: width, height: height, pixels: rgb)
    }
}

/// Decodes PNG files of every standard kind. Errors are `PEAError.invalidFile` naming the file: a wrong
/// signature, a CRC mismatch in any chunk, truncation, bad zlib data, an invalid filter type, a missing
/// IHDR/PLTE/IDAT, an unknown critical chunk, invalid header values, or an image larger than
/// `maximumPixels`; with `readText`, also a malformed text chunk.
public enum PNGDecoder {
    /// The most pixels a file may have (Pillow refuses images above twice its 89,478,485-pixel warning
    /// threshold as decompression bombs; this is the same bound).
    public static let maximumPixels = 2 * 89_478_485

    /// With `readText`, the text chunks are decoded into `textChunks` (and a malformed one is an error);
    /// without it they are skipped like any other ancillary chunk.
    public static func decode(path: String, readText: Bool = false) throws -> PNGDecodedImage {
        let file = try MappedBytes(path: path)
        return try withExtendedLifetime(file) { try decode(file.buffer, path: path, readText: readText) }
    }

    /// Decodes the PNG file in `bytes`; `path` names it in errors.
    public static func decode(_ bytes: UnsafeRawBufferPointer, path: String, readText: Bool = false) throws -> PNGDecodedImage {
        try decode(bytes, path: path, readText: readText) { _ in }
    }

    /// `decode`, with `accept` seeing the header as soon as IHDR is read, to refuse (by throwing) kinds of
    /// image the caller does not take before anything else is checked or inflated.
    static func decode(_ bytes: UnsafeRawBufferPointer, path: String, readText: Bool,
                       accept: (Header) throws -> Void) throws -> PNGDecodedImage {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: path, reason: reason) }
        guard bytes.count >= 8 else { throw fail("not a PNG file: only \(bytes.count) bytes") }
        guard bytes.prefix(8).elementsEqual(PNGFormat.signature) else { throw fail("not a PNG file: wrong signature") }

        var header: Header?
        var palette: [UInt8] = []
        var imageData: [UInt8] = []
        var textChunks: [(key: String, value: String)] = []
        var sawImageData = false, imageDataEnded = false, sawEnd = false
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
                throw fail("truncated or corrupt: chunk \(type) at byte \(offset) declares \(length) data bytes, but only \(bytes.count - offset - 12) are left")
            }
            let dataStart = offset + 8, dataEnd = dataStart + length
            let data = UnsafeRawBufferPointer(rebasing: bytes[dataStart..<dataEnd])
            guard PNGFormat.crc(type: typeBytes, data: Array(data)) == PNGFormat.readUInt32(bytes, at: dataEnd) else {
                throw fail("corrupt: CRC mismatch in chunk \(type) at byte \(offset)")
            }
            offset = dataEnd + 4

            if header == nil && type != "IHDR" { throw fail("corrupt: the first chunk is \(type), not IHDR") }
            if type != "IDAT" && sawImageData { imageDataEnded = true }
            switch type {
            case "IHDR":
                guard header == nil else { throw fail("corrupt: a second IHDR chunk") }
                let parsed = try Header(Array(data), fail: fail)
                try accept(parsed)
                header = parsed
            case "PLTE":
                guard !sawImageData else { throw fail("corrupt: PLTE after the image data") }
                guard length % 3 == 0, (3...768).contains(length) else { throw fail("corrupt: PLTE of \(length) bytes") }
                palette = Array(data)
            case "IDAT":
                guard !imageDataEnded else { throw fail("corrupt: IDAT chunks that are not consecutive") }
                sawImageData = true
                imageData.append(contentsOf: data)
            case "IEND":
                sawEnd = true
            case "tEXt", "zTXt", "iTXt":
                if readText { textChunks.append(try parseText(type: type, Array(data), fail: fail)) }
            default:
                // A lowercase first letter marks an ancillary chunk (tRNS, gAMA, …): safe to skip.
                guard typeBytes[0] >= 97 else { throw fail("unsupported: critical chunk \(type)") }
            }
        }
        guard let header else { throw fail("corrupt: no IHDR chunk") }
        guard sawImageData else { throw fail("corrupt: no IDAT chunk") }
        if header.colorType == 3 && palette.isEmpty { throw fail("corrupt: a palette image without a PLTE chunk") }

        let passes = header.passes()
        let filteredSize = passes.reduce(0) { $0 + $1.height * (1 + $1.rowBytes) }
        let filtered = try PNGFormat.inflate(imageData, limit: filteredSize, what: "image data", fail: fail)
        guard filtered.count == filteredSize else {
            throw fail("corrupt: the image data inflate to \(filtered.count) bytes, \(header.width)×\(header.height) needs \(filteredSize)")
        }
        let samples = try unfilter(filtered, header: header, passes: passes, fail: fail)
        return PNGDecodedImage(width: header.width, height: header.height, colorType: header.colorType,
                               bitDepth: header.bitDepth, interlaced: header.interlaced, channels: header.channels,
                               samples: samples, palette: palette, textChunks: textChunks)
    }

    /// A text chunk's keyword and text: tEXt Latin-1; zTXt Latin-1 zlib-compressed; iTXt UTF-8, compressed or
    /// not, its language tag and translated keyword dropped.
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

    /// IHDR's fields, validated.
    struct Header {
        let width: Int, height: Int, bitDepth: Int, colorType: Int, interlaced: Bool, channels: Int

        init(_ data: [UInt8], fail: (String) -> PEAError) throws {
            guard data.count == 13 else { throw fail("corrupt: IHDR has \(data.count) bytes, not 13") }
            width = Int(PNGFormat.readUInt32(data, at: 0))
            height = Int(PNGFormat.readUInt32(data, at: 4))
            bitDepth = Int(data[8])
            colorType = Int(data[9])
            guard width > 0, height > 0, width <= PNGFormat.maximumDimension, height <= PNGFormat.maximumDimension else {
                throw fail("corrupt: image size \(width)×\(height)")
            }
            let depths: [Int: [Int]] = [0: [1, 2, 4, 8, 16], 2: [8, 16], 3: [1, 2, 4, 8], 4: [8, 16], 6: [8, 16]]
            guard let allowed = depths[colorType] else { throw fail("corrupt: invalid colour type \(colorType)") }
            guard allowed.contains(bitDepth) else {
                throw fail("corrupt: bit depth \(bitDepth) is not allowed for colour type \(colorType)")
            }
            channels = [0: 1, 2: 3, 3: 1, 4: 2, 6: 4][colorType]!
            guard data[10] == 0 else { throw fail("unsupported compression method \(data[10])") }
            guard data[11] == 0 else { throw fail("unsupported filter method \(data[11])") }
            guard data[12] <= 1 else { throw fail("corrupt: interlace method \(data[12])") }
            interlaced = data[12] == 1
            guard width * height <= PNGDecoder.maximumPixels else {
                throw fail("unsupported: \(width)×\(height) pixels is more than the \(PNGDecoder.maximumPixels) allowed")
            }
        }

        /// Bytes per complete pixel for the filters' "left" neighbour (at least 1).
        var filterStride: Int { max(1, channels * bitDepth / 8) }

        /// The reduced images stored one after the other: one for a plain image, Adam7's seven (empty ones
        /// included with height or width 0; they take no bytes) for an interlaced one.
        func passes() -> [Pass] {
            let layout: [(x0: Int, y0: Int, dx: Int, dy: Int)] = interlaced
                ? [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
                : [(0, 0, 1, 1)]
            return layout.map { step in
                let passWidth = width > step.x0 ? (width - step.x0 + step.dx - 1) / step.dx : 0
                let passHeight = height > step.y0 ? (height - step.y0 + step.dy - 1) / step.dy : 0
                let rowBytes = (passWidth * channels * bitDepth + 7) / 8
                return Pass(x0: step.x0, y0: step.y0, dx: step.dx, dy: step.dy,
                            width: passWidth, height: passWidth == 0 ? 0 : passHeight, rowBytes: rowBytes)
            }
        }
    }

    struct Pass {
        let x0: Int, y0: Int, dx: Int, dy: Int, width: Int, height: Int, rowBytes: Int
    }

    /// Undoes the row filters of each pass and scatters the samples to their pixels.
    private static func unfilter(_ filtered: [UInt8], header: Header, passes: [Pass],
                                 fail: (String) -> PEAError) throws -> [UInt16] {
        let channels = header.channels, depth = header.bitDepth, stride = header.filterStride
        var samples = [UInt16](repeating: 0, count: header.width * header.height * channels)
        var previous = [UInt8](), current = [UInt8]()
        var position = 0
        for pass in passes where pass.height > 0 {
            previous = [UInt8](repeating: 0, count: pass.rowBytes)
            current = [UInt8](repeating: 0, count: pass.rowBytes)
            for row in 0..<pass.height {
                let type = filtered[position]
                guard type <= 4 else {
                    throw fail("corrupt: row \(row)\(header.interlaced ? " of an Adam7 pass" : "") has filter type \(type)")
                }
                filtered.withUnsafeBufferPointer { source in
                    current.withUnsafeMutableBufferPointer { out in
                        previous.withUnsafeBufferPointer { above in
                            let input = source.baseAddress! + position + 1
                            for index in 0..<pass.rowBytes {
                                let left = index >= stride ? out[index - stride] : 0
                                let upLeft = index >= stride ? above[index - stride] : 0
                                out[index] = input[index]
                                    &+ PNGFormat.predictor(type, left: left, up: above[index], upLeft: upLeft)
                            }
                        }
                    }
                }
                position += 1 + pass.rowBytes
                // Unpack the row's samples (big-endian for 16 bits, most significant bits first below 8).
                let y = pass.y0 + row * pass.dy
                current.withUnsafeBufferPointer { bytes in
                    samples.withUnsafeMutableBufferPointer { out in
                        for column in 0..<pass.width {
                            let pixel = (y * header.width + pass.x0 + column * pass.dx) * channels
                            for channel in 0..<channels {
                                let sampleIndex = column * channels + channel
                                let value: UInt16
                                switch depth {
                                case 8: value = UInt16(bytes[sampleIndex])
                                case 16: value = UInt16(bytes[2 * sampleIndex]) << 8 | UInt16(bytes[2 * sampleIndex + 1])
                                default:
                                    let bit = sampleIndex * depth
                                    let byte = bytes[bit / 8]
                                    value = UInt16((byte >> (8 - depth - bit % 8)) & UInt8((1 << depth) - 1))
                                }
                                out[pixel + channel] = value
                            }
                        }
                    }
                }
                swap(&previous, &current)
            }
        }
        return samples
    }
}
