import CJPEG

/// Decodes training images to RGB the way the official training scripts' `Image.open(f).convert("RGB")`
/// does: the format is recognised by its first bytes (as Pillow does), not by the file name.
/// - JPEG through the system's libjpeg(-turbo) with its default settings, as Pillow's decoder uses them
///   (accurate integer IDCT, fancy upsampling): greyscale files repeat the grey value; 4-component
///   (CMYK/YCCK) files are read as Pillow reads them — Adobe's inverted CMYK — and converted with Pillow's
///   CMYK → RGB formula. EXIF orientation is ignored, as Pillow ignores it without `exif_transpose`.
/// - PNG through `PNGDecoder` (every colour type and bit depth, Adam7), converted as `PNGDecodedImage.rgb()`.
/// Anything else, and every truncated or corrupt file, throws `PEAError.invalidFile` naming `name`.
public enum ImageDecoder {
    /// The most pixels an image may have (Pillow's decompression-bomb limit).
    public static let maximumPixels = PNGDecoder.maximumPixels

    /// Decodes the image file at `path`.
    public static func decodeRGB(path: String) throws -> RGBImage {
        let file = try MappedBytes(path: path)
        return try withExtendedLifetime(file) { try decodeRGB(file.buffer, name: path) }
    }

    /// Decodes an image file held in memory; `name` (a path, or a tar member's name) names it in errors.
    public static func decodeRGB(_ bytes: UnsafeRawBufferPointer, name: String) throws -> RGBImage {
        if bytes.count >= 3, bytes[0] == 0xFF, bytes[1] == 0xD8, bytes[2] == 0xFF {
            return try decodeJPEG(bytes, name: name)
        }
        if bytes.count >= 8, bytes.prefix(8).elementsEqual(PNGFormat.signature) {
            return try PNGDecoder.decode(bytes, path: name).rgb()
        }
        throw PEAError.invalidFile(path: name, reason: bytes.isEmpty ? "empty image file" : "not a JPEG or PNG image")
    }

    static func decodeJPEG(_ bytes: UnsafeRawBufferPointer, name: String) throws -> RGBImage {
        var image = pea_jpeg_image()
        let status = pea_jpeg_decode(bytes.baseAddress!.assumingMemoryBound(to: UInt8.self), UInt(bytes.count),
                                     Int64(maximumPixels), &image)
        guard status == 0, let pixels = image.pixels else {
            let message = withUnsafeBytes(of: &image.message) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            throw PEAError.invalidFile(path: name, reason: "cannot decode JPEG: \(message.isEmpty ? "unknown error" : message)")
        }
        defer { pea_jpeg_free(&image) }
        let width = Int(image.width), height = Int(image.height), components = Int(image.components)
        let count = width * height
        let source = UnsafeBufferPointer(start: pixels, count: count * components)
        var rgb = [UInt8](repeating: 0, count: count * 3)
        rgb.withUnsafeMutableBufferPointer { out in
            switch components {
            case 3:
                _ = out.initialize(from: source)
            case 1:
                for index in 0..<count {
                    let value = source[index]
                    out[3 * index] = value; out[3 * index + 1] = value; out[3 * index + 2] = value
                }
            default:
                // Pillow reads 4-component JPEGs with raw mode "CMYK;I" (Adobe's inverted CMYK, assumed for
                // every such file), then converts: nk = 255 − k, R = nk − c·nk/255 (rounded as Pillow's
                // MULDIV255), the same for G with m and B with y.
                for index in 0..<count {
                    let c = 255 - Int(source[4 * index]), m = 255 - Int(source[4 * index + 1])
                    let y = 255 - Int(source[4 * index + 2]), k = 255 - Int(source[4 * index + 3])
                    let nk = 255 - k
                    out[3 * index] = clip8(nk - mulDiv255(c, nk))
                    out[3 * index + 1] = clip8(nk - mulDiv255(m, nk))
                    out[3 * index + 2] = clip8(nk - mulDiv255(y, nk))
                }
            }
        }
        return RGBImage(width: width, height: height, pixels: rgb)
    }

    /// a·b/255 rounded, in Pillow's integer form.
    private static func mulDiv255(_ a: Int, _ b: Int) -> Int {
        let t = a * b + 128
        return ((t >> 8) + t) >> 8
    }

    private static func clip8(_ value: Int) -> UInt8 { UInt8(max(0, min(255, value))) }
}
