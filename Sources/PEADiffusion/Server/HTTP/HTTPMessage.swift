// The HTTP/1.1 messages `pea serve` reads and writes (RFC 9112): requests as the parser hands them over,
// responses as handlers build them, and the errors a malformed request is answered with.

/// The protocol versions the server speaks; any other version is answered with 505.
public enum HTTPVersion: String, Equatable, Sendable {
    case http10 = "HTTP/1.0"
    case http11 = "HTTP/1.1"
}

/// One header field, name and value as received (the value without surrounding whitespace).
public struct HTTPField: Equatable, Sendable {
    public var name: String
    public var value: String

    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// A message's header fields in the order they came, repeated names kept. Names are looked up ignoring
/// ASCII case, as HTTP requires.
public struct HTTPHeaders: Equatable, Sendable {
    public private(set) var fields: [HTTPField] = []

    public init(_ fields: [HTTPField] = []) { self.fields = fields }

    public mutating func add(_ name: String, _ value: String) { fields.append(HTTPField(name: name, value: value)) }

    /// Every value of the fields called `name`, in order.
    public func values(_ name: String) -> [String] {
        fields.filter { HTTPHeaders.sameName($0.name, name) }.map(\.value)
    }

    /// The first value of the field called `name`.
    public subscript(name: String) -> String? { fields.first { HTTPHeaders.sameName($0.name, name) }?.value }

    /// The comma-separated elements of every `name` field, trimmed and lowercased (`Connection: Keep-Alive, x`
    /// gives ["keep-alive", "x"]), for the list-valued fields whose elements are case-insensitive tokens.
    func tokens(_ name: String) -> [String] {
        values(name).flatMap { $0.split(separator: ",") }.map { HTTPHeaders.trimmed($0).lowercased() }.filter { !$0.isEmpty }
    }

    static func sameName(_ a: String, _ b: String) -> Bool {
        a.utf8.count == b.utf8.count && zip(a.utf8, b.utf8).allSatisfy { asciiLower($0) == asciiLower($1) }
    }

    static func asciiLower(_ byte: UInt8) -> UInt8 { byte >= 0x41 && byte <= 0x5A ? byte | 0x20 : byte }

    static func trimmed(_ text: Substring) -> String {
        String(text.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}

/// A complete request: its line, its header fields and its body (Content-Length bytes, empty without one).
public struct HTTPRequest: Equatable, Sendable {
    public var method: String
    /// The request target as sent: `/sdapi/v1/txt2img?x=1`, `*`, or an absolute URL.
    public var target: String
    /// The target's path, not percent-decoded (`/` for `*` and for an absolute URL without one).
    public var path: String
    /// What follows the first `?` of the target, not decoded; nil without a `?`.
    public var query: String?
    public var version: HTTPVersion
    public var headers: HTTPHeaders
    public var body: [UInt8]

    public init(method: String, target: String, version: HTTPVersion = .http11, headers: HTTPHeaders = HTTPHeaders(),
                body: [UInt8] = []) {
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        (path, query) = HTTPRequest.split(target)
    }

    /// Whether the client wants the connection kept open after the response: HTTP/1.1 keeps it unless
    /// `Connection: close`; HTTP/1.0 closes it unless `Connection: keep-alive`.
    public var keepAlive: Bool {
        let connection = headers.tokens("Connection")
        if connection.contains("close") { return false }
        return version == .http11 || connection.contains("keep-alive")
    }

    /// Path and query of a target in origin form (`/a?b`), asterisk form (`*`) or absolute form
    /// (`http://host:7860/a?b`, whose authority is dropped).
    static func split(_ target: String) -> (path: String, query: String?) {
        var rest = Substring(target)
        if let scheme = rest.firstRange(of: "://"), !rest.hasPrefix("/") {
            let authorityAndPath = rest[scheme.upperBound...]
            rest = authorityAndPath.firstIndex { $0 == "/" || $0 == "?" }.map { authorityAndPath[$0...] } ?? ""
        }
        let question = rest.firstIndex(of: "?")
        var path = String(rest[..<(question ?? rest.endIndex)])
        if path.isEmpty || path == "*" { path = "/" }
        return (path, question.map { String(rest[rest.index(after: $0)...]) })
    }
}

/// A response a handler builds. Serializing adds `Content-Length` (always: the server never sends chunked
/// bodies) and `Connection`, so a handler sets neither.
public struct HTTPResponse: Equatable, Sendable {
    public var status: Int
    public var headers: HTTPHeaders
    public var body: [UInt8]

    public init(status: Int, headers: HTTPHeaders = HTTPHeaders(), body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A JSON body (the compact serialization of `value`), `Content-Type: application/json`.
    public static func json(_ value: JSONValue, status: Int = 200) -> HTTPResponse {
        var body: [UInt8] = []
        value.serialize(into: &body)
        return HTTPResponse(status: status, headers: HTTPHeaders([HTTPField(name: "Content-Type", value: "application/json")]),
                            body: body)
    }

    /// A plain-text body, UTF-8; a final newline is added so that the text reads well in a terminal (curl).
    public static func text(_ text: String, status: Int = 200) -> HTTPResponse {
        HTTPResponse(status: status, headers: HTTPHeaders([HTTPField(name: "Content-Type", value: "text/plain; charset=utf-8")]),
                     body: Array((text.hasSuffix("\n") ? text : text + "\n").utf8))
    }

    /// The bytes on the wire. `keepAlive` false adds `Connection: close` (the server closes after it); true to an
    /// HTTP/1.0 client adds `Connection: keep-alive`. `includeBody` false (the answer to HEAD) keeps the
    /// Content-Length of the body but leaves the body out. The handler's own Content-Length, Transfer-Encoding
    /// and Connection fields are dropped, and CR and LF inside names and values are removed, so that no
    /// header can split the response.
    public func serialized(keepAlive: Bool, version: HTTPVersion = .http11, includeBody: Bool = true) -> [UInt8] {
        var head = "HTTP/1.1 \(status) \(HTTPResponse.reasonPhrase(status))\r\n"
        for field in headers.fields where !["content-length", "transfer-encoding", "connection"].contains(field.name.lowercased()) {
            head += "\(HTTPResponse.singleLine(field.name)): \(HTTPResponse.singleLine(field.value))\r\n"
        }
        head += "Content-Length: \(body.count)\r\n"
        if !keepAlive {
            head += "Connection: close\r\n"
        } else if version == .http10 {
            head += "Connection: keep-alive\r\n"
        }
        head += "\r\n"
        return Array(head.utf8) + (includeBody ? body : [])
    }

    static func singleLine(_ text: String) -> String { String(text.unicodeScalars.filter { $0 != "\r" && $0 != "\n" }) }

    /// The standard reason phrase of `status` (RFC 9110 §15), empty for a code without one (clients ignore it).
    public static func reasonPhrase(_ status: Int) -> String {
        switch status {
        case 200: return "OK"
        case 201: return "Created"
        case 202: return "Accepted"
        case 204: return "No Content"
        case 301: return "Moved Permanently"
        case 302: return "Found"
        case 304: return "Not Modified"
        case 400: return "Bad Request"
        case 401: return "Unauthorized"
        case 403: return "Forbidden"
        case 404: return "Not Found"
        case 405: return "Method Not Allowed"
        case 408: return "Request Timeout"
        case 409: return "Conflict"
        case 411: return "Length Required"
        case 413: return "Content Too Large"
        case 415: return "Unsupported Media Type"
        case 422: return "Unprocessable Content"
        case 429: return "Too Many Requests"
        case 431: return "Request Header Fields Too Large"
        case 500: return "Internal Server Error"
        case 501: return "Not Implemented"
        case 503: return "Service Unavailable"
        case 505: return "HTTP Version Not Supported"
        default: return ""
        }
    }
}

/// Why a request cannot be served, as the status to answer it with and a message for the client. The server
/// answers a parser error with `response` and closes the connection.
public struct HTTPError: Error, Equatable, CustomStringConvertible {
    public let status: Int
    public let message: String

    public init(_ status: Int, _ message: String) {
        self.status = status
        self.message = message
    }

    public var description: String { "\(status) \(HTTPResponse.reasonPhrase(status)): \(message)" }

    /// The status with the message as a plain-text body.
    public var response: HTTPResponse { .text(message, status: status) }
}
