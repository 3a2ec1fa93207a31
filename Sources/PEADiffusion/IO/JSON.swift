/// A JSON value, as read from safetensors headers and diffusers/transformers configuration files.
///
/// Parsing follows RFC 8259 and additionally accepts the non-standard literals `NaN`, `Infinity` and
/// `-Infinity` that Python's `json` module writes (its default `allow_nan=True`), so that every config a
/// Python tool saved can be read back. Numbers are held as `Double`, like JavaScript and like Python's
/// `json` for floats; integers are exact up to 2^53, which covers every shape, offset and config value.
/// Objects keep the last value of a repeated key, as Python's `json` and serde_json's maps do.
///
/// This file uses no Foundation, so that the library can be built into FoundationEssentials-only binaries.
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// The deepest nesting of arrays and objects the parser accepts, so that hostile input cannot overflow
    /// the stack: serde_json's default recursion limit, so the reference safetensors parser accepts the same.
    /// The parser is recursive and a debug build takes 1–2 KB of stack per level, so 128 levels fit in a
    /// 256 KB thread stack (512 levels did not fit in 512 KB). Real headers and configs nest 2–4 levels.
    public static let maximumDepth = 128

    /// Parses a complete JSON text: one value, optionally surrounded by whitespace.
    /// - Throws: `JSONParseError` with the byte offset, line and column of the problem.
    public static func parse(_ text: String) throws -> JSONValue {
        var text = text
        return try text.withUTF8 { try parse(bytes: UnsafeRawBufferPointer($0)) }
    }

    /// Parses a complete JSON text given as UTF-8 bytes. Invalid UTF-8 inside strings is an error.
    public static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        try bytes.withUnsafeBytes { try parse(bytes: $0) }
    }

    /// Parses a complete JSON text in memory that the caller owns for the duration of the call
    /// (a memory-mapped safetensors header, for instance); nothing is copied except the strings.
    public static func parse(bytes: UnsafeRawBufferPointer) throws -> JSONValue {
        var parser = JSONParser(bytes)
        return try parser.parseDocument()
    }

    // MARK: - Convenient views

    /// The number as an `Int` when it is integral and in range (320.0 is 320; 1.5, NaN and 1e300 are nil).
    public var intValue: Int? {
        guard case .number(let value) = self else { return nil }
        return Int(exactly: value)
    }

    public var doubleValue: Double? {
        guard case .number(let value) = self else { return nil }
        return value
    }

    public var stringValue: String? {
        guard case .string(let value) = self else { return nil }
        return value
    }

    public var boolValue: Bool? {
        guard case .bool(let value) = self else { return nil }
        return value
    }

    public var arrayValue: [JSONValue]? {
        guard case .array(let value) = self else { return nil }
        return value
    }

    public var objectValue: [String: JSONValue]? {
        guard case .object(let value) = self else { return nil }
        return value
    }

    public var isNull: Bool { self == .null }

    /// A short human description for error messages: `an integer 3`, `a string "abc"`, `an array of 2`, …
    public var kindDescription: String {
        switch self {
        case .null: return "null"
        case .bool(let value): return "a boolean \(value)"
        case .number(let value):
            return Int(exactly: value) != nil ? "an integer \(JSONValue.format(value))" : "a number \(JSONValue.format(value))"
        case .string(let value):
            let shown = value.count > 40 ? String(value.prefix(40)) + "…" : value
            return "a string \(JSONValue.string(shown).serialized())"
        case .array(let values): return "an array of \(values.count)"
        case .object(let values): return "an object with \(values.count) keys"
        }
    }

    // MARK: - Serializing

    /// Compact JSON text (no whitespace), object keys sorted by their UTF-8 bytes so the output is
    /// deterministic. Integral numbers are written without ".0" (up to 2^53, beyond which they use exponent
    /// notation); non-finite numbers are written as Python's `json` writes them (`NaN`, `Infinity`, `-Infinity`).
    /// Strings are escaped as serde_json escapes them: `\"`, `\\`, `\b \f \n \r \t`, other control characters
    /// as `\u00XX`; everything else, non-ASCII included, is written as UTF-8.
    public func serialized() -> String {
        var output: [UInt8] = []
        output.reserveCapacity(64)
        serialize(into: &output)
        return String(decoding: output, as: UTF8.self)
    }

    /// Appends the compact serialization's UTF-8 bytes to `output`.
    public func serialize(into output: inout [UInt8]) {
        switch self {
        case .null: output.append(contentsOf: "null".utf8)
        case .bool(let value): output.append(contentsOf: (value ? "true" : "false").utf8)
        case .number(let value): output.append(contentsOf: JSONValue.format(value).utf8)
        case .string(let value): JSONValue.appendEscaped(value, to: &output)
        case .array(let values):
            output.append(UInt8(ascii: "["))
            for (index, value) in values.enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                value.serialize(into: &output)
            }
            output.append(UInt8(ascii: "]"))
        case .object(let members):
            output.append(UInt8(ascii: "{"))
            let keys = members.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
            for (index, key) in keys.enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                JSONValue.appendEscaped(key, to: &output)
                output.append(UInt8(ascii: ":"))
                members[key]!.serialize(into: &output)
            }
            output.append(UInt8(ascii: "}"))
        }
    }

    /// A number as JSON text: integers without a fraction, other values in Swift's shortest round-trip form.
    static func format(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value < 0 ? "-Infinity" : "Infinity" }
        if value == value.rounded(), abs(value) <= 9_007_199_254_740_992 {
            return String(Int64(value))  // also turns -0.0 into 0, as Python's json.dumps(int) would
        }
        return String(value)  // e.g. "0.1", "1e-05", "1e+20": all valid JSON number syntax
    }

    /// Appends `string` as a quoted, escaped JSON string.
    static func appendEscaped(_ string: String, to output: inout [UInt8]) {
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        output.append(UInt8(ascii: "\""))
        for byte in string.utf8 {
            switch byte {
            case UInt8(ascii: "\""): output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\"")])
            case UInt8(ascii: "\\"): output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "\\")])
            case 0x08: output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "b")])
            case 0x0C: output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "f")])
            case 0x0A: output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "n")])
            case 0x0D: output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "r")])
            case 0x09: output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "t")])
            case 0x00..<0x20:
                output.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"),
                                           hex[Int(byte >> 4)], hex[Int(byte & 0xF)]])
            default: output.append(byte)
            }
        }
        output.append(UInt8(ascii: "\""))
    }
}

/// A JSON syntax error: what was wrong and where (0-based byte offset, 1-based line and column in bytes).
public struct JSONParseError: Error, Equatable, CustomStringConvertible {
    public let message: String
    public let offset: Int
    public let line: Int
    public let column: Int

    public var description: String { "\(message) at byte offset \(offset) (line \(line), column \(column))" }
}

/// A recursive-descent parser over bytes in memory. Internal: use `JSONValue.parse`.
struct JSONParser {
    private let bytes: UnsafeRawBufferPointer
    private var position = 0
    private var depth = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    mutating func parseDocument() throws -> JSONValue {
        // A UTF-8 byte order mark is not JSON (RFC 8259 §8.1 says parsers MAY ignore it; Python's json
        // refuses it in str input) — refuse with a message that says what it is.
        if bytes.count >= 3, bytes[0] == 0xEF, bytes[1] == 0xBB, bytes[2] == 0xBF {
            throw error("unexpected UTF-8 byte order mark")
        }
        skipWhitespace()
        let value = try parseValue()
        skipWhitespace()
        if position < bytes.count { throw error("unexpected \(describe(bytes[position])) after the JSON value") }
        return value
    }

    // MARK: Values

    private mutating func parseValue() throws -> JSONValue {
        guard position < bytes.count else { throw error("unexpected end of input, expected a value") }
        switch bytes[position] {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try expectLiteral("true"); return .bool(true)
        case UInt8(ascii: "f"): try expectLiteral("false"); return .bool(false)
        case UInt8(ascii: "n"): try expectLiteral("null"); return .null
        case UInt8(ascii: "N"): try expectLiteral("NaN"); return .number(.nan)
        case UInt8(ascii: "I"): try expectLiteral("Infinity"); return .number(.infinity)
        case UInt8(ascii: "-"):
            if position + 1 < bytes.count, bytes[position + 1] == UInt8(ascii: "I") {
                position += 1
                try expectLiteral("Infinity")
                return .number(-.infinity)
            }
            return .number(try parseNumber())
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try parseNumber())
        case let byte: throw error("unexpected \(describe(byte)), expected a value")
        }
    }

    private mutating func enterContainer() throws {
        depth += 1
        if depth > JSONValue.maximumDepth {
            throw error("nesting deeper than \(JSONValue.maximumDepth) levels")
        }
    }

    private mutating func parseObject() throws -> JSONValue {
        try enterContainer()
        position += 1  // {
        var members: [String: JSONValue] = [:]
        skipWhitespace()
        if peek() == UInt8(ascii: "}") {
            position += 1
            depth -= 1
            return .object(members)
        }
        while true {
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of input inside an object") }
            guard bytes[position] == UInt8(ascii: "\"") else {
                throw error("unexpected \(describe(bytes[position])), expected a string key")
            }
            let key = try parseString()
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of input, expected ':'") }
            guard bytes[position] == UInt8(ascii: ":") else {
                throw error("unexpected \(describe(bytes[position])), expected ':' after key \"\(key)\"")
            }
            position += 1
            skipWhitespace()
            members[key] = try parseValue()
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of input inside an object") }
            switch bytes[position] {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "}"):
                position += 1
                depth -= 1
                return .object(members)
            case let byte: throw error("unexpected \(describe(byte)), expected ',' or '}'")
            }
        }
    }

    private mutating func parseArray() throws -> JSONValue {
        try enterContainer()
        position += 1  // [
        var elements: [JSONValue] = []
        skipWhitespace()
        if peek() == UInt8(ascii: "]") {
            position += 1
            depth -= 1
            return .array(elements)
        }
        while true {
            skipWhitespace()
            elements.append(try parseValue())
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of input inside an array") }
            switch bytes[position] {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "]"):
                position += 1
                depth -= 1
                return .array(elements)
            case let byte: throw error("unexpected \(describe(byte)), expected ',' or ']'")
            }
        }
    }

    private mutating func expectLiteral(_ literal: StaticString) throws {
        let start = position
        let count = literal.utf8CodeUnitCount
        let matches = literal.withUTF8Buffer { expected -> Bool in
            guard start + count <= bytes.count else { return false }
            for i in 0..<count where bytes[start + i] != expected[i] { return false }
            return true
        }
        guard matches else { throw error("invalid literal, expected '\(literal)'") }
        position += count
    }

    // MARK: Numbers

    /// RFC 8259 number syntax: `-? (0 | [1-9][0-9]*) (\.[0-9]+)? ([eE][+-]?[0-9]+)?`. Values too large for a
    /// Double become ±infinity, as in Python's json.
    private mutating func parseNumber() throws -> Double {
        let start = position
        if peek() == UInt8(ascii: "-") { position += 1 }
        guard let first = peek(), isDigit(first) else { throw error("invalid number: expected a digit") }
        if first == UInt8(ascii: "0") {
            position += 1
            if let next = peek(), isDigit(next) { throw error("invalid number: leading zero") }
        } else {
            skipDigits()
        }
        if peek() == UInt8(ascii: ".") {
            position += 1
            guard let next = peek(), isDigit(next) else { throw error("invalid number: expected a digit after '.'") }
            skipDigits()
        }
        if let e = peek(), e == UInt8(ascii: "e") || e == UInt8(ascii: "E") {
            position += 1
            if let sign = peek(), sign == UInt8(ascii: "+") || sign == UInt8(ascii: "-") { position += 1 }
            guard let next = peek(), isDigit(next) else { throw error("invalid number: expected a digit in the exponent") }
            skipDigits()
        }
        let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<position]), as: UTF8.self)
        guard let value = Double(text) else {
            position = start
            throw error("invalid number '\(text)'")
        }
        return value
    }

    private func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

    private mutating func skipDigits() {
        while position < bytes.count, isDigit(bytes[position]) { position += 1 }
    }

    // MARK: Strings

    /// A string starting at the opening quote. Unescaped control characters are errors (as in Python's
    /// json with its default strict=True, and serde_json); `\uXXXX` surrogate pairs combine into one
    /// scalar, a lone surrogate is an error (as in serde_json: a Swift String cannot hold one).
    private mutating func parseString() throws -> String {
        let openingQuote = position
        position += 1
        let start = position
        // Fast path: no escapes, the bytes become the string after UTF-8 validation.
        while position < bytes.count {
            let byte = bytes[position]
            if byte == UInt8(ascii: "\"") {
                let slice = UnsafeRawBufferPointer(rebasing: bytes[start..<position])
                guard let string = String(validating: slice, as: UTF8.self) else {
                    throw invalidUTF8(in: start..<position)
                }
                position += 1
                return string
            }
            if byte == UInt8(ascii: "\\") { break }
            if byte < 0x20 { throw error("unescaped control character \(describe(byte)) in a string") }
            position += 1
        }
        guard position < bytes.count else {
            position = openingQuote
            throw error("unterminated string")
        }
        // Slow path: escapes present.
        var decoded = Array(UnsafeRawBufferPointer(rebasing: bytes[start..<position]))
        while position < bytes.count {
            let byte = bytes[position]
            switch byte {
            case UInt8(ascii: "\""):
                guard let string = String(validating: decoded, as: UTF8.self) else {
                    throw invalidUTF8(in: start..<position)
                }
                position += 1
                return string
            case UInt8(ascii: "\\"):
                try parseEscape(into: &decoded)
            case 0..<0x20:
                throw error("unescaped control character \(describe(byte)) in a string")
            default:
                decoded.append(byte)
                position += 1
            }
        }
        position = openingQuote
        throw error("unterminated string")
    }

    private mutating func parseEscape(into decoded: inout [UInt8]) throws {
        let escapeStart = position
        position += 1  // backslash
        guard let kind = peek() else { throw error("unterminated escape sequence") }
        position += 1
        switch kind {
        case UInt8(ascii: "\""): decoded.append(UInt8(ascii: "\""))
        case UInt8(ascii: "\\"): decoded.append(UInt8(ascii: "\\"))
        case UInt8(ascii: "/"): decoded.append(UInt8(ascii: "/"))
        case UInt8(ascii: "b"): decoded.append(0x08)
        case UInt8(ascii: "f"): decoded.append(0x0C)
        case UInt8(ascii: "n"): decoded.append(0x0A)
        case UInt8(ascii: "r"): decoded.append(0x0D)
        case UInt8(ascii: "t"): decoded.append(0x09)
        case UInt8(ascii: "u"):
            var scalar = try parseHex4()
            if (0xD800...0xDBFF).contains(scalar) {
                // A high surrogate must be followed by an escaped low surrogate.
                guard position + 1 < bytes.count, bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u") else {
                    position = escapeStart
                    throw error("lone high surrogate \\u\(hex4(scalar)) not followed by a low surrogate")
                }
                position += 2
                let low = try parseHex4()
                guard (0xDC00...0xDFFF).contains(low) else {
                    position = escapeStart
                    throw error("high surrogate \\u\(hex4(scalar)) followed by \\u\(hex4(low)), not a low surrogate")
                }
                scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
            } else if (0xDC00...0xDFFF).contains(scalar) {
                position = escapeStart
                throw error("lone low surrogate \\u\(hex4(scalar))")
            }
            appendUTF8(Unicode.Scalar(scalar)!, to: &decoded)
        default:
            position = escapeStart
            throw error("invalid escape sequence '\\\(Unicode.Scalar(kind))'")
        }
    }

    private mutating func parseHex4() throws -> UInt32 {
        guard position + 4 <= bytes.count else { throw error("truncated \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[position]
            let digit: UInt32
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(byte - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(byte - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(byte - UInt8(ascii: "A") + 10)
            default: throw error("invalid hex digit \(describe(byte)) in a \\u escape")
            }
            value = value << 4 | digit
            position += 1
        }
        return value
    }

    private func hex4(_ value: UInt32) -> String {
        let digits = String(value, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    private func appendUTF8(_ scalar: Unicode.Scalar, to output: inout [UInt8]) {
        UTF8.encode(scalar) { output.append($0) }
    }

    /// An error for invalid UTF-8 in a string, located at the first byte that does not decode.
    private mutating func invalidUTF8(in range: Range<Int>) -> JSONParseError {
        var offset = range.lowerBound
        var iterator = UnsafeRawBufferPointer(rebasing: bytes[range]).makeIterator()
        var decoder = UTF8()
        var consumed = 0
        loop: while true {
            switch decoder.decode(&iterator) {
            case .scalarValue(let scalar): consumed += UTF8.width(scalar)
            case .emptyInput: break loop
            case .error: offset = range.lowerBound + consumed; break loop
            }
        }
        position = offset
        return error("invalid UTF-8 in a string")
    }

    // MARK: Helpers

    private func peek() -> UInt8? { position < bytes.count ? bytes[position] : nil }

    private mutating func skipWhitespace() {
        while position < bytes.count {
            switch bytes[position] {
            case 0x20, 0x09, 0x0A, 0x0D: position += 1
            default: return
            }
        }
    }

    private func describe(_ byte: UInt8) -> String {
        if byte >= 0x21 && byte < 0x7F { return "'\(Character(Unicode.Scalar(byte)))'" }
        let hex = String(byte, radix: 16, uppercase: true)
        return "byte 0x\(hex.count == 1 ? "0" + hex : hex)"
    }

    /// An error at the current position, with its line and column counted from the start.
    private func error(_ message: String) -> JSONParseError {
        let offset = min(position, bytes.count)
        var line = 1
        var lineStart = 0
        for i in 0..<offset where bytes[i] == 0x0A {
            line += 1
            lineStart = i + 1
        }
        return JSONParseError(message: message, offset: offset, line: line, column: offset - lineStart + 1)
    }
}
