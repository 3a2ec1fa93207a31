// Standard base64 (RFC 4648 §4: `+` `/`, `=` padding), for images in JSON bodies.

private let base64Alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

public func base64Encoded(_ bytes: [UInt8]) -> String {
    var out: [UInt8] = []
    out.reserveCapacity((bytes.count + 2) / 3 * 4)
    var index = 0
    while index < bytes.count {
        let b0 = UInt32(bytes[index])
        let b1 = index + 1 < bytes.count ? UInt32(bytes[index + 1]) : 0
        let b2 = index + 2 < bytes.count ? UInt32(bytes[index + 2]) : 0
        let triple = b0 << 16 | b1 << 8 | b2
        out.append(base64Alphabet[Int(triple >> 18 & 63)])
        out.append(base64Alphabet[Int(triple >> 12 & 63)])
        out.append(index + 1 < bytes.count ? base64Alphabet[Int(triple >> 6 & 63)] : UInt8(ascii: "="))
        out.append(index + 2 < bytes.count ? base64Alphabet[Int(triple & 63)] : UInt8(ascii: "="))
        index += 3
    }
    return String(decoding: out, as: UTF8.self)
}

/// The bytes of base64 `text`, or nil when it is not base64. Whitespace (line breaks of MIME-style encoders) is
/// skipped; the padding may be left out, as some clients do; anything else outside the alphabet is refused.
public func base64Decoded(_ text: String) -> [UInt8]? {
    var values: [UInt8] = []
    values.reserveCapacity(text.utf8.count)
    var padding = 0
    for byte in text.utf8 {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): values.append(byte - UInt8(ascii: "A"))
        case UInt8(ascii: "a")...UInt8(ascii: "z"): values.append(byte - UInt8(ascii: "a") + 26)
        case UInt8(ascii: "0")...UInt8(ascii: "9"): values.append(byte - UInt8(ascii: "0") + 52)
        case UInt8(ascii: "+"): values.append(62)
        case UInt8(ascii: "/"): values.append(63)
        case UInt8(ascii: "="): padding += 1; continue
        case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): continue
        default: return nil
        }
        if padding > 0 { return nil }   // data after padding
    }
    guard padding <= 2, values.count % 4 != 1 else { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(values.count * 3 / 4)
    var index = 0
    while index < values.count {
        let count = min(4, values.count - index)
        var group: UInt32 = 0
        for k in 0..<4 { group = group << 6 | UInt32(k < count ? values[index + k] : 0) }
        out.append(UInt8(group >> 16 & 0xFF))
        if count > 2 { out.append(UInt8(group >> 8 & 0xFF)) }
        if count > 3 { out.append(UInt8(group & 0xFF)) }
        index += 4
    }
    return out
}
