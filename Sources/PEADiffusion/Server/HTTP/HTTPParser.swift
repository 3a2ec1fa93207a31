// Reading HTTP/1.1 requests (RFC 9112) from a byte stream that arrives in pieces of any size.

/// How much of a request the server reads before refusing it.
public struct HTTPLimits: Equatable, Sendable {
    /// The request line and the header fields, line ends and the final empty line included (431 beyond).
    public var headerBytes: Int
    /// The body's Content-Length (413 beyond, decided from the header before the body is read).
    public var bodyBytes: Int
    /// Header fields per request (431 beyond).
    public var headerCount: Int

    public init(headerBytes: Int = 16 << 10, bodyBytes: Int = 4 << 20, headerCount: Int = 100) {
        self.headerBytes = headerBytes
        self.bodyBytes = bodyBytes
        self.headerCount = headerCount
    }
}

/// An incremental request parser for one connection: `append` the bytes as they arrive, then call `next` until
/// it returns nil (more bytes needed). Pipelined requests come out one by one, in order.
///
/// What it accepts, strictly enough that a proxy in front cannot read a request differently:
/// - lines end in CRLF or in a bare LF (RFC 9112 §2.2 allows recognising LF alone; `printf … | nc` sends it);
///   a CR anywhere else is a 400, as is obsolete line folding (a field line starting with a space or tab);
/// - empty lines before a request line are skipped (some clients send CRLF after a body);
/// - bodies only by Content-Length: Transfer-Encoding (chunked or any other) is refused with 411, and with
///   Content-Length as well with 400, since the two together are how requests are smuggled; several
///   Content-Length values must all be the same number;
/// - HTTP/1.1 requests need exactly one Host field (RFC 9112 §3.2).
/// Header values are decoded as UTF-8, invalid sequences replaced. After an error the parser stays failed:
/// the connection cannot be read further and must be answered with the error and closed.
public struct HTTPRequestParser {
    public let limits: HTTPLimits
    private var buffer: [UInt8] = []
    /// Where the unread bytes of `buffer` start.
    private var start = 0
    /// How far the search for the end of the current header section got, so that a request fed byte by byte
    /// is scanned once, not once per byte.
    private var scanned = 0
    /// A request whose header section has been read, waiting for `bodyLength` bytes of body.
    private var awaitingBody: (request: HTTPRequest, bodyLength: Int)?
    private var failure: HTTPError?
    private var continueDue = false

    public init(limits: HTTPLimits = HTTPLimits()) { self.limits = limits }

    public mutating func append<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        buffer.append(contentsOf: bytes)
    }

    /// Whether part of a request has been received but not all of it (a client that stops here is slow, not idle).
    public var hasPartialRequest: Bool { awaitingBody != nil || start < buffer.count }

    /// True, once, while the client of the request being read waits for an interim `100 Continue` before it
    /// sends the body (`Expect: 100-continue`, which curl sends with bodies over 1 KB).
    public mutating func takeContinueExpectation() -> Bool {
        defer { continueDue = false }
        return continueDue && awaitingBody != nil
    }

    /// The next complete request, or nil until more bytes arrive.
    /// - Throws: the `HTTPError` to answer the connection with; every later call throws it again.
    public mutating func next() throws(HTTPError) -> HTTPRequest? {
        if let failure { throw failure }
        do {
            return try parseNext()
        } catch {
            failure = error
            throw error
        }
    }

    private mutating func parseNext() throws(HTTPError) -> HTTPRequest? {
        if awaitingBody == nil {
            skipEmptyLines()
            guard let end = headerSectionEnd() else {
                if buffer.count - start >= limits.headerBytes {
                    throw HTTPError(431, "the request line and headers are longer than \(limits.headerBytes) bytes")
                }
                return nil
            }
            if end - start > limits.headerBytes {
                throw HTTPError(431, "the request line and headers are longer than \(limits.headerBytes) bytes")
            }
            let (request, bodyLength) = try parseHead(buffer[start..<end])
            awaitingBody = (request, bodyLength)
            continueDue = bodyLength > 0 && request.version == .http11 && request.headers.tokens("Expect").contains("100-continue")
            start = end
            scanned = end
        }
        guard let pending = awaitingBody, buffer.count - start >= pending.bodyLength else { return nil }
        var complete = pending.request
        complete.body = Array(buffer[start..<(start + pending.bodyLength)])
        start += pending.bodyLength
        scanned = start
        awaitingBody = nil
        compact()
        return complete
    }

    /// Drops the empty lines (CRLF or LF) in front of a request line.
    private mutating func skipEmptyLines() {
        while start < buffer.count {
            if buffer[start] == lf {
                start += 1
            } else if buffer[start] == cr, start + 1 < buffer.count, buffer[start + 1] == lf {
                start += 2
            } else {
                break
            }
        }
        scanned = max(scanned, start)
    }

    /// The index just past the empty line that ends the header section, if it has arrived: an LF followed by
    /// LF or by CRLF.
    private mutating func headerSectionEnd() -> Int? {
        var index = scanned
        while index < buffer.count {
            if buffer[index] == lf {
                if index + 1 < buffer.count, buffer[index + 1] == lf { return index + 2 }
                if index + 2 < buffer.count, buffer[index + 1] == cr, buffer[index + 2] == lf { return index + 3 }
                if index + 2 >= buffer.count { break }  // the empty line may still be arriving: look here again
            }
            index += 1
        }
        scanned = index
        return nil
    }

    /// Frees the bytes already parsed once they are most of the buffer.
    private mutating func compact() {
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
            scanned = 0
        } else if start > 4096, start * 2 > buffer.count {
            buffer.removeFirst(start)
            scanned -= start
            start = 0
        }
    }

    /// The request line and header fields (ending in the empty line), and the body length they declare.
    private func parseHead(_ head: ArraySlice<UInt8>) throws(HTTPError) -> (HTTPRequest, Int) {
        var lines: [ArraySlice<UInt8>] = []
        var lineStart = head.startIndex
        for index in head.indices where head[index] == lf {
            var line = head[lineStart..<index]
            if line.last == cr { line = line.dropLast() }
            if line.contains(cr) { throw HTTPError(400, "a carriage return inside a line (lines end in CRLF)") }
            lines.append(line)
            lineStart = index + 1
        }
        lines.removeLast()  // the empty line that ends the section
        var request = try parseRequestLine(lines[0])
        let fieldLines = lines.dropFirst()
        if fieldLines.count > limits.headerCount {
            throw HTTPError(431, "\(fieldLines.count) header fields, more than the \(limits.headerCount) accepted")
        }
        for line in fieldLines {
            let field = try parseField(line)
            request.headers.add(field.name, field.value)
        }
        return (request, try bodyLength(request))
    }

    private func parseRequestLine(_ line: ArraySlice<UInt8>) throws(HTTPError) -> HTTPRequest {
        let parts = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, parts[0].allSatisfy(isTokenByte),
              !parts[1].isEmpty, parts[1].allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw HTTPError(400, "malformed request line '\(printable(line))' (expected METHOD TARGET HTTP/1.1)")
        }
        let versionText = String(decoding: parts[2], as: UTF8.self)
        guard let version = HTTPVersion(rawValue: versionText) else {
            let digits = versionText.utf8.dropFirst(5)
            if versionText.hasPrefix("HTTP/"), digits.count == 3, digits.dropFirst().first == UInt8(ascii: "."),
               digits.first.map(isDigit) == true, digits.last.map(isDigit) == true {
                throw HTTPError(505, "\(versionText) is not supported; use HTTP/1.1 or HTTP/1.0")
            }
            throw HTTPError(400, "malformed request line '\(printable(line))' (expected METHOD TARGET HTTP/1.1)")
        }
        let target = String(decoding: parts[1], as: UTF8.self)
        return HTTPRequest(method: String(decoding: parts[0], as: UTF8.self), target: target, version: version)
    }

    private func parseField(_ line: ArraySlice<UInt8>) throws(HTTPError) -> HTTPField {
        if line.first == UInt8(ascii: " ") || line.first == UInt8(ascii: "\t") {
            throw HTTPError(400, "obsolete line folding (a header line starting with whitespace) is not accepted")
        }
        guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > line.startIndex,
              line[..<colon].allSatisfy(isTokenByte) else {
            throw HTTPError(400, "malformed header line '\(printable(line))' (expected Name: value)")
        }
        let value = line[(colon + 1)...]
        if value.contains(where: { ($0 < 0x20 && $0 != UInt8(ascii: "\t")) || $0 == 0x7F }) {
            throw HTTPError(400, "a control character in the value of header '\(printable(line[..<colon]))'")
        }
        let isWhitespace = { (byte: UInt8) in byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") }
        let trimmed = value.drop(while: isWhitespace).reversed().drop(while: isWhitespace).reversed()
        return HTTPField(name: String(decoding: line[..<colon], as: UTF8.self), value: String(decoding: trimmed, as: UTF8.self))
    }

    /// The body length the header fields declare, refusing what the server does not read.
    private func bodyLength(_ request: HTTPRequest) throws(HTTPError) -> Int {
        let hosts = request.headers.values("Host")
        if request.version == .http11, hosts.count != 1 {
            throw HTTPError(400, hosts.isEmpty ? "an HTTP/1.1 request needs a Host header" : "\(hosts.count) Host headers")
        }
        let lengths = request.headers.values("Content-Length")
        if !request.headers.values("Transfer-Encoding").isEmpty {
            if !lengths.isEmpty {
                throw HTTPError(400, "a request with both Transfer-Encoding and Content-Length is refused")
            }
            throw HTTPError(411, "chunked (Transfer-Encoding) request bodies are not accepted; send the body with a Content-Length")
        }
        guard !lengths.isEmpty else { return 0 }
        let elements = lengths.flatMap { $0.split(separator: ",", omittingEmptySubsequences: false) }
            .map { HTTPHeaders.trimmed($0) }
        guard let first = elements.first, !first.isEmpty, first.utf8.allSatisfy(isDigit), elements.allSatisfy({ $0 == first }) else {
            throw HTTPError(400, "invalid Content-Length '\(lengths.joined(separator: ", "))'")
        }
        // All digits: a number too large for Int is too large for the limit as well.
        guard let length = Int(first), length <= limits.bodyBytes else {
            throw HTTPError(413, "the body (Content-Length \(first)) is larger than the \(limits.bodyBytes) bytes accepted")
        }
        return length
    }
}

private let cr = UInt8(ascii: "\r")
private let lf = UInt8(ascii: "\n")

private func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }

/// A `tchar` of RFC 9110 §5.6.2, the bytes of methods and header names.
private func isTokenByte(_ byte: UInt8) -> Bool {
    switch byte {
    case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
        return true
    default:
        return Array("!#$%&'*+-.^_`|~".utf8).contains(byte)
    }
}

/// Received bytes for an error message: at most 80 of them, control and non-ASCII bytes as `?`.
private func printable(_ bytes: ArraySlice<UInt8>) -> String {
    let shown = bytes.prefix(80).map { $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: "?") }
    return String(decoding: shown, as: UTF8.self) + (bytes.count > 80 ? "…" : "")
}
