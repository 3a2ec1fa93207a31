#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import XCTest
@testable import PEADiffusion

/// The HTTP layer of `pea serve`: the request parser on whole, pipelined and byte-by-byte input and on every
/// refusal it makes, response serialization, and real connections to a server on 127.0.0.1 from a small
/// socket client.
final class HTTPTests: XCTestCase {
    // MARK: parser

    /// Every request `bytes` holds, fed at once (or in pieces of `piece` bytes), or the error that ended them.
    private func parse(_ bytes: [UInt8], limits: HTTPLimits = HTTPLimits(), piece: Int? = nil) -> (requests: [HTTPRequest], error: HTTPError?) {
        var parser = HTTPRequestParser(limits: limits)
        var requests: [HTTPRequest] = []
        var offset = 0
        repeat {
            let end = min(bytes.count, offset + (piece ?? bytes.count))
            parser.append(bytes[offset..<end])
            offset = end
            do {
                while let request = try parser.next() { requests.append(request) }
            } catch {
                return (requests, error)
            }
        } while offset < bytes.count
        return (requests, nil)
    }

    private func parse(_ text: String, limits: HTTPLimits = HTTPLimits()) -> (requests: [HTTPRequest], error: HTTPError?) {
        parse(Array(text.utf8), limits: limits)
    }

    /// The status `text` is refused with (nil when it parses).
    private func refusal(_ text: String, limits: HTTPLimits = HTTPLimits()) -> Int? { parse(text, limits: limits).error?.status }

    func testParsesRequestLineHeadersAndBody() throws {
        let (requests, error) = parse("POST /sdapi/v1/txt2img?steps=2&x=%20 HTTP/1.1\r\nHost: localhost:7860\r\n"
                                      + "Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"prompt\":\"a\"}")
        XCTAssertNil(error)
        let request = try XCTUnwrap(requests.first)
        XCTAssertEqual(requests.count, 1)
        XCTAssertEqual(request.method, "POST")
        XCTAssertEqual(request.target, "/sdapi/v1/txt2img?steps=2&x=%20")
        XCTAssertEqual(request.path, "/sdapi/v1/txt2img")
        XCTAssertEqual(request.query, "steps=2&x=%20")
        XCTAssertEqual(request.version, .http11)
        XCTAssertEqual(request.headers.fields.map(\.name), ["Host", "Content-Type", "Content-Length"])
        XCTAssertEqual(request.headers["host"], "localhost:7860")
        XCTAssertEqual(String(decoding: request.body, as: UTF8.self), "{\"prompt\":\"a\"")
        XCTAssertEqual(request.body.count, 13, "the body is exactly Content-Length bytes; the rest waits for the next request")
    }

    func testTargetsSplitIntoPathAndQuery() {
        let cases: [(String, String, String?)] = [
            ("/", "/", nil), ("/health?", "/health", ""), ("/a/b?c=1?d", "/a/b", "c=1?d"), ("*", "/", nil),
            ("http://127.0.0.1:7860/v1/images?x=1", "/v1/images", "x=1"), ("http://host", "/", nil),
        ]
        for (target, path, query) in cases {
            let request = HTTPRequest(method: "GET", target: target)
            XCTAssertEqual(request.path, path, target)
            XCTAssertEqual(request.query, query, target)
        }
    }

    func testHeaderNamesIgnoreCaseAndRepeatsAreKeptInOrder() throws {
        let request = try XCTUnwrap(parse("GET / HTTP/1.1\r\nhost: h\r\nX-Tag: a\r\nCONTENT-TYPE: text/plain\r\nx-tag:b  \r\n"
                                          + "X-Empty:\r\n\r\n").requests.first)
        XCTAssertEqual(request.headers.values("X-TAG"), ["a", "b"], "values without surrounding whitespace, in order")
        XCTAssertEqual(request.headers["x-tag"], "a")
        XCTAssertEqual(request.headers["Content-Type"], "text/plain")
        XCTAssertEqual(request.headers["Host"], "h")
        XCTAssertEqual(request.headers["X-Empty"], "")
        XCTAssertNil(request.headers["X-Missing"])
        XCTAssertEqual(request.headers.fields.map(\.name), ["host", "X-Tag", "CONTENT-TYPE", "x-tag", "X-Empty"])
    }

    func testKeepAliveFollowsVersionAndConnectionHeader() {
        let cases: [(String, Bool)] = [
            ("GET / HTTP/1.1\r\nHost: h\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", false),
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, CLOSE\r\n\r\n", false),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", false),
        ]
        for (text, keepAlive) in cases {
            XCTAssertEqual(parse(text).requests.first?.keepAlive, keepAlive, text)
        }
    }

    /// Three requests, the second with a body; pipelined in one read, byte by byte, and in pieces of 7 bytes.
    func testPipelinedRequestsComeOutInOrderHoweverTheBytesArrive() {
        let text = "GET /one HTTP/1.1\r\nHost: h\r\n\r\nPOST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody"
            + "\r\nGET /three?x HTTP/1.0\r\n\r\n"  // a stray CRLF after a body is skipped
        let whole = parse(text)
        XCTAssertNil(whole.error)
        XCTAssertEqual(whole.requests.map(\.target), ["/one", "/two", "/three?x"])
        XCTAssertEqual(whole.requests.map { String(decoding: $0.body, as: UTF8.self) }, ["", "body", ""])
        for piece in [1, 7] {
            let pieces = parse(Array(text.utf8), piece: piece)
            XCTAssertNil(pieces.error)
            XCTAssertEqual(pieces.requests, whole.requests, "pieces of \(piece)")
        }
    }

    func testIncompleteRequestWaitsForMoreBytes() throws {
        var parser = HTTPRequestParser()
        XCTAssertFalse(parser.hasPartialRequest)
        parser.append(Array("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nab".utf8))
        XCTAssertNil(try parser.next())
        XCTAssertTrue(parser.hasPartialRequest)
        parser.append([UInt8(ascii: "c")])
        XCTAssertEqual(try parser.next()?.body, Array("abc".utf8))
        XCTAssertFalse(parser.hasPartialRequest)
        XCTAssertNil(try parser.next())
    }

    func testExpectContinueIsReportedOnceWhileTheBodyIsAwaited() throws {
        var parser = HTTPRequestParser()
        parser.append(Array("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n".utf8))
        XCTAssertNil(try parser.next())
        XCTAssertTrue(parser.takeContinueExpectation())
        XCTAssertFalse(parser.takeContinueExpectation())
        parser.append(Array("ok".utf8))
        XCTAssertEqual(try parser.next()?.body, Array("ok".utf8))
        parser.append(Array("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok".utf8))
        XCTAssertNotNil(try parser.next())
        XCTAssertFalse(parser.takeContinueExpectation(), "the body came with the head: nothing to answer")
    }

    /// Decision: bare LF line ends are accepted (RFC 9112 §2.2 allows it; `printf … | nc` sends them), mixed with
    /// CRLF too; a CR that does not end a line is refused.
    func testBareLineFeedsAreAcceptedAndBareCarriageReturnsRefused() {
        let lf = parse("GET /lf HTTP/1.1\nHost: h\nContent-Length: 2\n\nok")
        XCTAssertNil(lf.error)
        XCTAssertEqual(lf.requests.first?.headers["Host"], "h")
        XCTAssertEqual(lf.requests.first?.body, Array("ok".utf8))
        XCTAssertEqual(parse("GET / HTTP/1.1\r\nHost: h\n\r\n").requests.count, 1)
        XCTAssertEqual(parse("\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n").requests.count, 1, "empty lines before a request are skipped")
        XCTAssertEqual(refusal("GET / HTTP/1.1\rHost: h\r\n\r\n"), 400)
        XCTAssertEqual(refusal("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n"), 400)
    }

    func testMalformedRequestsAre400() {
        let cases = [
            "GET /\r\n\r\n", "GET  / HTTP/1.1\r\nHost: h\r\n\r\n", "GET / HTTP/1.1 x\r\nHost: h\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: h\r\n\r\n", "GET / http/1.1\r\nHost: h\r\n\r\n", "GET / HTTP/1\r\nHost: h\r\n\r\n",
            "GET /\u{7F} HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost h\r\n\r\n", "GET / HTTP/1.1\r\n: v\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : h\r\n\r\n", "GET / HTTP/1.1\r\nHost: h\r\nX: a\u{1}b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nx",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\nxy",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]
        for text in cases { XCTAssertEqual(refusal(text), 400, text.debugDescription) }
    }

    func testObsoleteLineFoldingIs400() {
        let error = parse("GET / HTTP/1.1\r\nHost: h\r\nX-Long: a\r\n  continued\r\n\r\n").error
        XCTAssertEqual(error?.status, 400)
        XCTAssertTrue(error?.message.contains("folding") == true, "\(String(describing: error))")
        XCTAssertEqual(refusal("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n"), 400)
    }

    func testRepeatedEqualContentLengthsAndBodiesOnAnyMethodAreAccepted() {
        XCTAssertEqual(parse("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc").requests.first?.body,
                       Array("abc".utf8))
        XCTAssertEqual(parse("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi").requests.first?.body, Array("hi".utf8))
        XCTAssertEqual(parse("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").requests.first?.body, [])
    }

    func testTransferEncodingIs411() {
        for encoding in ["chunked", "gzip, chunked", "gzip"] {
            let error = parse("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \(encoding)\r\n\r\n5\r\nhello\r\n0\r\n\r\n").error
            XCTAssertEqual(error?.status, 411, encoding)
            XCTAssertTrue(error?.message.contains("chunked") == true && error?.message.contains("Content-Length") == true)
        }
        XCTAssertEqual(refusal("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 411)
    }

    func testVersionsOtherThan10And11Are505() {
        for version in ["HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTP/3.0"] {
            XCTAssertEqual(refusal("GET / \(version)\r\nHost: h\r\n\r\n"), 505, version)
        }
        XCTAssertEqual(parse("GET / HTTP/1.0\r\n\r\n").requests.first?.version, .http10, "HTTP/1.0 needs no Host")
    }

    /// The body limit is decided from Content-Length before any of the body arrives.
    func testBodyLimitAtAndPastTheBoundary() {
        let limits = HTTPLimits(bodyBytes: 10)
        let atLimit = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789"
        XCTAssertEqual(parse(atLimit, limits: limits).requests.first?.body.count, 10)
        XCTAssertEqual(refusal("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n", limits: limits), 413)
        XCTAssertEqual(refusal("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n", limits: limits), 413)
    }

    /// The header limit counts the request line, the fields and the empty line, line ends included.
    func testHeaderLimitAtAndPastTheBoundary() {
        let text = "GET / HTTP/1.1\r\nHost: h\r\nX-Padding: " + String(repeating: "p", count: 100) + "\r\n\r\n"
        let size = text.utf8.count
        XCTAssertEqual(parse(text, limits: HTTPLimits(headerBytes: size)).requests.count, 1)
        XCTAssertEqual(refusal(text, limits: HTTPLimits(headerBytes: size - 1)), 431)
        // Without the final empty line: refused as soon as the limit is reached, before the rest arrives.
        let unfinished = Array(text.utf8.dropLast(2))
        XCTAssertEqual(parse(unfinished, limits: HTTPLimits(headerBytes: size - 2)).error?.status, 431)
        XCTAssertNil(parse(unfinished, limits: HTTPLimits(headerBytes: size - 1)).error, "could still end within the limit (in a bare LF)")
        XCTAssertEqual(parse(Array(text.utf8), limits: HTTPLimits(headerBytes: size - 1), piece: 1).error?.status, 431)
    }

    func testHeaderCountLimitAtAndPastTheBoundary() {
        let three = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n"
        XCTAssertEqual(parse(three, limits: HTTPLimits(headerCount: 3)).requests.count, 1)
        XCTAssertEqual(refusal(three, limits: HTTPLimits(headerCount: 2)), 431)
    }

    func testAFailedParserStaysFailed() {
        var parser = HTTPRequestParser()
        parser.append(Array("BAD\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n".utf8))
        for _ in 0..<2 {
            XCTAssertThrowsError(try parser.next()) { XCTAssertEqual(($0 as? HTTPError)?.status, 400) }
        }
    }

    // MARK: responses

    func testResponseSerialization() {
        XCTAssertEqual(String(decoding: HTTPResponse.text("hi").serialized(keepAlive: true), as: UTF8.self),
                       "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n\r\nhi\n")
        XCTAssertEqual(String(decoding: HTTPResponse.json(.object(["b": .number(1), "a": .string("x")]), status: 201)
                                .serialized(keepAlive: false), as: UTF8.self),
                       "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 15\r\nConnection: close\r\n\r\n"
                       + "{\"a\":\"x\",\"b\":1}")
        XCTAssertEqual(String(decoding: HTTPResponse(status: 204).serialized(keepAlive: true, version: .http10), as: UTF8.self),
                       "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n")
        XCTAssertEqual(String(decoding: HTTPResponse.text("hi").serialized(keepAlive: true, includeBody: false), as: UTF8.self),
                       "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n\r\n", "HEAD")
        // The handler's framing fields are replaced and no value can split the response.
        let handlerFields = HTTPHeaders([HTTPField(name: "content-length", value: "99"), HTTPField(name: "Connection", value: "x"),
                                         HTTPField(name: "Transfer-Encoding", value: "chunked"),
                                         HTTPField(name: "X-Note", value: "a\r\nSet-Cookie: b")])
        XCTAssertEqual(String(decoding: HTTPResponse(status: 599, headers: handlerFields, body: [1]).serialized(keepAlive: true),
                              as: UTF8.self),
                       "HTTP/1.1 599 \r\nX-Note: aSet-Cookie: b\r\nContent-Length: 1\r\n\r\n\u{1}")
    }

    func testErrorResponseCarriesStatusAndMessage() {
        let response = HTTPError(413, "too large").response
        XCTAssertEqual(response.status, 413)
        XCTAssertEqual(String(decoding: response.body, as: UTF8.self), "too large\n")
        XCTAssertEqual(HTTPError(431, "x").description, "431 Request Header Fields Too Large: x")
    }

    // MARK: server

    private func startServer(_ configuration: HTTPServer.Configuration = HTTPServer.Configuration(requestTimeout: 5),
                             handler: @escaping HTTPServer.Handler = HTTPTests.echo) throws -> HTTPServer {
        let server = try HTTPServer(host: "127.0.0.1", port: 0, configuration: configuration, handler: handler)
        addTeardownBlock { server.stop() }
        return server
    }

    /// Answers with the method, path and body it received.
    private static let echo: HTTPServer.Handler = { request in
        .text("\(request.method) \(request.path) \(String(decoding: request.body, as: UTF8.self))")
    }

    func testKeepAliveConnectionServesSeveralRequestsInOrder() throws {
        let server = try startServer()
        XCTAssertGreaterThan(server.port, 0)
        let client = try TestClient(port: server.port)
        client.send("GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
        let first = try XCTUnwrap(client.readResponse())
        XCTAssertEqual(first.status, 200)
        XCTAssertEqual(first.body, "GET /one \n")
        XCTAssertNil(first.headers["Connection"])
        client.send("POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        XCTAssertEqual(client.readResponse()?.body, "POST /two abc\n")
        client.send("GET /3 HTTP/1.1\r\nHost: h\r\n\r\nGET /4 HTTP/1.1\r\nHost: h\r\n\r\nHEAD /5 HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(client.readResponse()?.body, "GET /3 \n")
        XCTAssertEqual(client.readResponse()?.body, "GET /4 \n")
        let head = try XCTUnwrap(client.readResponse(bodyExpected: false))
        XCTAssertEqual(head.headers["Content-Length"], "9", "the length of the body a GET would get")
        XCTAssertEqual(head.body, "")
    }

    func testExpectContinueGetsAnInterim100BeforeTheBody() throws {
        let server = try startServer()
        let client = try TestClient(port: server.port)
        client.send("POST /upload HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        XCTAssertEqual(client.readResponse()?.status, 100)
        client.send("data")
        XCTAssertEqual(client.readResponse()?.body, "POST /upload data\n")
    }

    func testConnectionCloseClosesAfterTheResponse() throws {
        let server = try startServer()
        let client = try TestClient(port: server.port)
        client.send("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        let response = try XCTUnwrap(client.readResponse())
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.headers["Connection"], "close")
        XCTAssertTrue(client.isClosedByServer())
    }

    func testChunkedRequestGets411AndTheConnectionCloses() throws {
        let server = try startServer(handler: { _ in XCTFail("the handler must not see a chunked request"); return .text("") })
        let client = try TestClient(port: server.port)
        client.send("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        let response = try XCTUnwrap(client.readResponse())
        XCTAssertEqual(response.status, 411)
        XCTAssertTrue(response.body.contains("chunked"))
        XCTAssertEqual(response.headers["Connection"], "close")
        XCTAssertTrue(client.isClosedByServer())
    }

    /// The client announces 100 MB and sends 64 KB: the answer comes without the server waiting for the rest.
    func testOversizedBodyGets413WithoutBeingRead() throws {
        let server = try startServer(HTTPServer.Configuration(limits: HTTPLimits(bodyBytes: 1024), requestTimeout: 5),
                                     handler: { _ in XCTFail("the handler must not see an oversized request"); return .text("") })
        let client = try TestClient(port: server.port)
        client.send("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000000\r\n\r\n")
        client.send([UInt8](repeating: 0x61, count: 64 << 10))
        let response = try XCTUnwrap(client.readResponse())
        XCTAssertEqual(response.status, 413)
        XCTAssertTrue(client.isClosedByServer())
    }

    func testMalformedRequestIsAnsweredWithItsStatusAndClosed() throws {
        let server = try startServer()
        let client = try TestClient(port: server.port)
        client.send("GET / HTTP/2.0\r\nHost: h\r\n\r\n")
        XCTAssertEqual(client.readResponse()?.status, 505)
        XCTAssertTrue(client.isClosedByServer())
    }

    func testIdleConnectionIsClosedAndSlowRequestAnswered408() throws {
        let server = try startServer(HTTPServer.Configuration(requestTimeout: 0.3))
        let idle = try TestClient(port: server.port)
        let slow = try TestClient(port: server.port)
        slow.send("GET / HTTP/1.1\r\nHost: h\r\n")
        XCTAssertTrue(idle.isClosedByServer(), "an idle connection is closed after the timeout")
        XCTAssertEqual(idle.received, [], "without a response")
        XCTAssertEqual(slow.readResponse()?.status, 408, "a request that stops half-way is answered 408")
        XCTAssertTrue(slow.isClosedByServer())
    }

    /// After a response the connection again has `requestTimeout` for its next request, then is closed.
    func testKeepAliveConnectionIsClosedWhenIdleAfterAResponse() throws {
        let server = try startServer(HTTPServer.Configuration(requestTimeout: 0.3))
        let client = try TestClient(port: server.port)
        client.send("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(client.readResponse()?.status, 200)
        XCTAssertTrue(client.isClosedByServer())
    }

    func testConnectionsBeyondTheLimitAre503() throws {
        let server = try startServer(HTTPServer.Configuration(requestTimeout: 5, maxConnections: 1))
        let first = try TestClient(port: server.port)
        first.send("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(first.readResponse()?.status, 200, "the first connection is open and counted")
        let second = try TestClient(port: server.port)
        second.send("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        let refused = try XCTUnwrap(second.readResponse())
        XCTAssertEqual(refused.status, 503)
        XCTAssertEqual(refused.headers["Retry-After"], "1")
        XCTAssertTrue(second.isClosedByServer())
        first.send("GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(first.readResponse()?.status, 200, "the open connection is still served")
    }

    func testThrowingHandlerIsAnswered500AndTheConnectionStaysUsable() throws {
        let server = try startServer(handler: { request in
            if request.path == "/fail" { throw PEAError.usage("steps must be positive") }
            return .text("fine")
        })
        let client = try TestClient(port: server.port)
        client.send("GET /fail HTTP/1.1\r\nHost: h\r\n\r\n")
        let failed = try XCTUnwrap(client.readResponse())
        XCTAssertEqual(failed.status, 500)
        XCTAssertTrue(failed.body.contains("steps must be positive"), failed.body)
        client.send("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        XCTAssertEqual(client.readResponse()?.body, "fine\n")
    }

    /// `stop()` lets a handler that is running finish and sends its response (with `Connection: close`).
    func testStopWaitsForTheResponseInProgress() throws {
        final class Flag: @unchecked Sendable {
            let lock = PThreadLock()
            var isSet = false
        }
        let handlerStarted = Flag()
        let server = try HTTPServer(host: "localhost", port: 0, configuration: HTTPServer.Configuration(requestTimeout: 5)) { _ in
            handlerStarted.lock.withLock { handlerStarted.isSet = true }
            usleep(100_000)
            return .text("done")
        }
        let client = try TestClient(port: server.port)
        client.send("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        while !handlerStarted.lock.withLock({ handlerStarted.isSet }) { usleep(1000) }
        server.stop()
        let response = try XCTUnwrap(client.readResponse())
        XCTAssertEqual(response.body, "done\n")
        XCTAssertEqual(response.headers["Connection"], "close")
        XCTAssertTrue(client.isClosedByServer())
        XCTAssertThrowsError(try TestClient(port: server.port), "the listener is closed")
    }

    func testAddressInUseAndBadHostsArePEAErrorsNamingTheAddress() throws {
        let server = try startServer()
        XCTAssertThrowsError(try HTTPServer(host: "127.0.0.1", port: server.port, handler: Self.echo)) { error in
            XCTAssertTrue(String(describing: error).contains("127.0.0.1:\(server.port)"), "\(error)")
            XCTAssertTrue(String(describing: error).contains("in use"), "\(error)")
            XCTAssertTrue(error is PEAError)
        }
        XCTAssertThrowsError(try HTTPServer(host: "example.com", port: 0, handler: Self.echo)) { error in
            XCTAssertTrue(String(describing: error).contains("example.com:0"), "\(error)")
        }
        XCTAssertThrowsError(try HTTPServer(host: "127.0.0.1", port: 70000, handler: Self.echo))
    }
}

/// A blocking HTTP client over a plain socket, enough to read the server's Content-Length responses.
/// Every read gives up after 5 seconds, so that a server bug fails the test instead of hanging it.
final class TestClient {
    private let socket: Int32
    /// Bytes received and not yet taken by `readResponse`.
    private(set) var received: [UInt8] = []

    struct Response {
        var status: Int
        var headers: HTTPHeaders
        var body: String
    }

    /// A connection to 127.0.0.1:`port` whose reads give up after `timeout` seconds.
    init(port: Int, timeout seconds: Int = 5) throws {
        socket = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(port).bigEndian
        address.sin_addr.s_addr = in_addr_t(0x7F00_0001).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(socket, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else {
            close(socket)
            throw PEAError.usage("cannot connect to 127.0.0.1:\(port): \(systemErrorMessage())")
        }
    }

    deinit { close(socket) }

    func send(_ text: String) { send(Array(text.utf8)) }

    func send(_ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes.withUnsafeBytes { Glibc.send(socket, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            guard sent > 0 else { return }
            offset += sent
        }
    }

    /// Reads more bytes into `received`; false at end of stream, on an error or after the timeout.
    private func receive() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        let count = chunk.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
        guard count > 0 else { return false }
        received += chunk[0..<count]
        return true
    }

    /// The next response; `bodyExpected` false for the answer to HEAD. Nil if the connection ends first.
    func readResponse(bodyExpected: Bool = true) -> Response? {
        let terminator = Array("\r\n\r\n".utf8)
        var headEnd: Int?
        while headEnd == nil {
            headEnd = received.count < 4 ? nil : (0...(received.count - 4)).first { Array(received[$0..<($0 + 4)]) == terminator }
            if headEnd == nil, !receive() { return nil }
        }
        let lines = String(decoding: received[..<headEnd!], as: UTF8.self).split(separator: "\r\n", omittingEmptySubsequences: false)
        let statusParts = lines[0].split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard statusParts.count >= 2, statusParts[0] == "HTTP/1.1", let status = Int(statusParts[1]) else { return nil }
        var headers = HTTPHeaders()
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { return nil }
            headers.add(String(line[..<colon]), String(line[line.index(after: colon)...].drop { $0 == " " }))
        }
        let bodyLength = bodyExpected ? Int(headers["Content-Length"] ?? "") ?? 0 : 0
        let bodyStart = headEnd! + 4
        while received.count < bodyStart + bodyLength {
            if !receive() { return nil }
        }
        let body = String(decoding: received[bodyStart..<(bodyStart + bodyLength)], as: UTF8.self)
        received.removeFirst(bodyStart + bodyLength)
        return Response(status: status, headers: headers, body: body)
    }

    /// Whether the server closes the connection (end of stream or reset) within 5 seconds; bytes that come
    /// first are kept in `received`.
    func isClosedByServer() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = chunk.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
            if count > 0 {
                received += chunk[0..<count]
                continue
            }
            return count == 0 || errno == ECONNRESET
        }
    }
}
