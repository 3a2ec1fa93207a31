/// Shard lists written the way webdataset users write them (its `braceexpand` convention, like the shell's):
///
/// - `data/shard-{000000..000009}.tar` — a numeric range; when either end is written with a leading zero the
///   numbers are zero-padded to the wider end's width. `{0..10..2}` steps by 2; `{9..0}` counts down.
/// - `{a..e}` — a range of single ASCII letters.
/// - `{train,extra/more}` — alternatives, which may themselves contain braces (nested, expanded left to right).
/// - `a::b` — several patterns in one string (webdataset's separator); `expand([String])` takes a list too.
/// - `\{`, `\}`, `\,`, `\\` — the character itself. A `{…}` that is neither a range nor has a comma is kept
///   literally (as the shell keeps `{abc}`), but an unmatched `{` or `}` is an error: in a shard list it is a
///   typo, and an error naming it beats "file not found" for a path nobody meant.
public enum ShardPattern {
    /// The most paths one specification may expand to (a guard against `{0..999999999}` typos).
    public static let maximumExpansion = 10_000_000

    /// Expands every pattern of `specification` (split at `::`), in order.
    /// - Throws: `PEAError.usage` naming the pattern for unbalanced braces, a malformed range, or an expansion
    ///   larger than `maximumExpansion`.
    public static func expand(_ specification: String) throws -> [String] {
        try expand(splitPatterns(specification))
    }

    /// Expands each pattern (each may itself contain `::`), concatenating the results in order.
    public static func expand(_ patterns: [String]) throws -> [String] {
        var paths: [String] = []
        for pattern in patterns.flatMap(splitPatterns) {
            var parser = Parser(pattern)
            let parsed = try parser.parseSequence(topLevel: true)
            let expanded = try expandSequence(parsed, pattern: pattern)
            paths += expanded
            guard paths.count <= maximumExpansion else {
                throw PEAError.usage("shard pattern '\(pattern)' expands to more than \(maximumExpansion) paths")
            }
        }
        return paths
    }

    static func splitPatterns(_ specification: String) -> [String] {
        split(specification, at: "::").filter { !$0.isEmpty }
    }

    /// `text` cut at every occurrence of `separator` (empty pieces kept).
    static func split(_ text: String, at separator: String) -> [String] {
        let characters = Array(text), marker = Array(separator)
        var parts: [String] = [], current = "", index = 0
        while index < characters.count {
            if index + marker.count <= characters.count && Array(characters[index..<(index + marker.count)]) == marker {
                parts.append(current)
                current = ""
                index += marker.count
            } else {
                current.append(characters[index])
                index += 1
            }
        }
        parts.append(current)
        return parts
    }

    // MARK: - Parsing

    indirect enum Piece {
        case literal(String)
        case alternatives([[Piece]])
        case range([String])
    }

    struct Parser {
        let characters: [Character]
        let pattern: String
        var position = 0

        init(_ pattern: String) {
            self.pattern = pattern
            characters = Array(pattern)
        }

        func error(_ message: String) -> PEAError { .usage("shard pattern '\(pattern)': \(message)") }

        /// Pieces up to the end (top level) or up to a ',' or '}' of the enclosing group.
        mutating func parseSequence(topLevel: Bool) throws -> [Piece] {
            var pieces: [Piece] = []
            var literal = ""
            func flush() {
                if !literal.isEmpty { pieces.append(.literal(literal)); literal = "" }
            }
            while position < characters.count {
                let character = characters[position]
                switch character {
                case "\\":
                    guard position + 1 < characters.count else { throw error("a trailing backslash") }
                    literal.append(characters[position + 1])
                    position += 2
                case "{":
                    guard let close = matchingBrace(from: position) else {
                        throw error("the '{' at character \(position + 1) is never closed")
                    }
                    if let range = try rangeGroup(from: position + 1, to: close) {
                        flush()
                        pieces.append(.range(range))
                        position = close + 1
                    } else if hasTopLevelComma(from: position + 1, to: close) {
                        flush()
                        position += 1
                        var options: [[Piece]] = []
                        while true {
                            options.append(try parseSequence(topLevel: false))
                            let separator = characters[position]
                            position += 1
                            if separator == "}" { break }
                        }
                        pieces.append(.alternatives(options))
                    } else {
                        // Neither a range nor alternatives: '{' is an ordinary character; its '}' too.
                        literal.append("{")
                        position += 1
                        var inner = try parseUntil(close)
                        if !literal.isEmpty { inner.insert(.literal(literal), at: 0); literal = "" }
                        pieces += inner
                        literal = "}"
                        position = close + 1
                    }
                case ",", "}":
                    if topLevel {
                        guard character == "," else {
                            throw error("the '}' at character \(position + 1) has no '{'")
                        }
                        literal.append(character)
                        position += 1
                    } else {
                        flush()
                        return pieces
                    }
                default:
                    literal.append(character)
                    position += 1
                }
            }
            flush()
            return pieces
        }

        /// Parses the characters before `end` (a literal group's contents, which may hold groups of their own).
        mutating func parseUntil(_ end: Int) throws -> [Piece] {
            var sub = Parser(String(characters[position..<end]))
            let pieces = try sub.parseSequence(topLevel: true)
            position = end
            return pieces
        }

        /// The index of the '}' closing the '{' at `open`, skipping escapes and nested groups.
        func matchingBrace(from open: Int) -> Int? {
            var depth = 0, index = open
            while index < characters.count {
                switch characters[index] {
                case "\\": index += 1
                case "{": depth += 1
                case "}":
                    depth -= 1
                    if depth == 0 { return index }
                default: break
                }
                index += 1
            }
            return nil
        }

        func hasTopLevelComma(from start: Int, to end: Int) -> Bool {
            var depth = 0, index = start
            while index < end {
                switch characters[index] {
                case "\\": index += 1
                case "{": depth += 1
                case "}": depth -= 1
                case "," where depth == 0: return true
                default: break
                }
                index += 1
            }
            return false
        }

        /// `a..b` or `a..b..step`: integers, or single ASCII letters; nil when the body is not a range.
        func rangeGroup(from start: Int, to end: Int) throws -> [String]? {
            let body = String(characters[start..<end])
            let parts = ShardPattern.split(body, at: "..")
            guard parts.count == 2 || parts.count == 3 else { return nil }
            var step = 1
            if parts.count == 3 {
                guard let value = Int(parts[2]), value != 0 else { return nil }
                step = abs(value)
            }
            if let first = Int(parts[0]), let last = Int(parts[1]) {
                let width = [parts[0], parts[1]].contains(where: Parser.hasLeadingZero) ? max(parts[0].count, parts[1].count) : 0
                let count = abs(last - first) / step + 1
                guard count <= ShardPattern.maximumExpansion else {
                    throw error("the range {\(body)} has \(count) values, more than \(ShardPattern.maximumExpansion)")
                }
                let direction = last >= first ? 1 : -1
                return (0..<count).map { index in
                    Parser.padded(first + direction * index * step, width: width)
                }
            }
            if parts[0].count == 1, parts[1].count == 1, let a = parts[0].unicodeScalars.first, let b = parts[1].unicodeScalars.first,
               a.isASCII, b.isASCII, a.properties.isAlphabetic, b.properties.isAlphabetic {
                let direction = b.value >= a.value ? 1 : -1
                let count = Int(abs(Int(b.value) - Int(a.value))) / step + 1
                return (0..<count).map { String(Character(Unicode.Scalar(UInt32(Int(a.value) + direction * $0 * step))!)) }
            }
            return nil
        }

        static func hasLeadingZero(_ number: String) -> Bool {
            let digits = number.hasPrefix("-") ? number.dropFirst() : Substring(number)
            return digits.count > 1 && digits.first == "0"
        }

        static func padded(_ value: Int, width: Int) -> String {
            let digits = String(abs(value))
            let zeros = String(repeating: "0", count: max(0, width - digits.count - (value < 0 ? 1 : 0)))
            return (value < 0 ? "-" : "") + zeros + digits
        }
    }

    // MARK: - Expansion

    static func expandSequence(_ pieces: [Piece], pattern: String) throws -> [String] {
        var results = [""]
        for piece in pieces {
            let options: [String]
            switch piece {
            case .literal(let text): options = [text]
            case .range(let values): options = values
            case .alternatives(let alternatives):
                options = try alternatives.flatMap { try expandSequence($0, pattern: pattern) }
            }
            guard results.count * options.count <= maximumExpansion else {
                throw PEAError.usage("shard pattern '\(pattern)' expands to more than \(maximumExpansion) paths")
            }
            results = results.flatMap { prefix in options.map { prefix + $0 } }
        }
        return results
    }
}
