import Glibc

/// An HTTP/1.1 server over POSIX sockets (IPv4): a thread accepts connections and gives each its own thread,
/// which reads requests with `HTTPRequestParser` and answers them in order with the handler's responses,
/// keeping the connection open between requests as the client asks. The handler may block for as long as
/// it needs (a generation takes seconds); other connections are served meanwhile.
///
/// Robustness: at most `maxConnections` connections at once (more are answered 503 and closed); each request
/// must arrive within `requestTimeout` of the connection opening or of its previous response (an idle
/// connection is closed, a slow one is answered 408); a malformed request is answered with its `HTTPError`
/// and the connection closed; a handler that throws is answered 500 with the error's message. Sends use
/// MSG_NOSIGNAL, so a client that disconnects cannot kill the process with SIGPIPE.
///
/// The threads hold the server until `stop()`, which every server must be given.
public final class HTTPServer: @unchecked Sendable {
    public struct Configuration: Sendable {
        public var limits: HTTPLimits
        /// Seconds a connection has to send its next request (header section and body).
        public var requestTimeout: Double
        /// Seconds a send may wait for a client that does not read its response.
        public var writeTimeout: Double
        public var maxConnections: Int

        public init(limits: HTTPLimits = HTTPLimits(), requestTimeout: Double = 30, writeTimeout: Double = 30,
                    maxConnections: Int = 64) {
            self.limits = limits
            self.requestTimeout = requestTimeout
            self.writeTimeout = writeTimeout
            self.maxConnections = maxConnections
        }
    }

    /// Answers one request; called on the connection's thread, concurrently for different connections.
    public typealias Handler = @Sendable (HTTPRequest) throws -> HTTPResponse

    public let host: String
    /// The port listened on: the one asked for, or the one the system chose for port 0.
    public let port: Int
    private let configuration: Configuration
    private let handler: Handler
    private let listener: Int32
    /// A pipe that `stop()` writes to and never drains, so that every thread waiting in poll wakes up.
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let connections = ConnectionGate()
    private var acceptThread = pthread_t()

    /// Binds `host:port` (an IPv4 address or `localhost`; port 0 for any free port) and starts serving.
    /// - Throws: `PEAError.usage` naming host and port when the address cannot be listened on (in use, not
    ///   this machine's, malformed).
    public init(host: String = "127.0.0.1", port: Int, configuration: Configuration = Configuration(),
                handler: @escaping Handler) throws {
        self.host = host
        self.configuration = configuration
        self.handler = handler
        (listener, self.port) = try HTTPServer.bindListener(host: host, port: port)
        var pipeEnds: [Int32] = [0, 0]
        guard pipe(&pipeEnds) == 0 else {
            close(listener)
            throw PEAError.unsupported("cannot create the server's wake-up pipe: \(systemErrorMessage())")
        }
        (wakeRead, wakeWrite) = (pipeEnds[0], pipeEnds[1])
        pipeEnds.forEach(closeOnExec)
        guard let thread = startThread({ self.acceptConnections() }) else {
            [listener, wakeRead, wakeWrite].forEach { _ = close($0) }
            throw PEAError.unsupported("cannot start the server's accept thread: \(systemErrorMessage())")
        }
        acceptThread = thread
    }

    /// Stops accepting, closes idle connections, waits for the responses being made to be sent, and closes
    /// the listening socket. Only the first call does anything.
    public func stop() {
        guard connections.beginStopping() else { return }
        var byte: UInt8 = 1
        _ = write(wakeWrite, &byte, 1)
        pthread_join(acceptThread, nil)
        close(listener)
        connections.waitUntilNoneOpen()
        close(wakeRead)
        close(wakeWrite)
    }

    // MARK: - Listening

    private static func bindListener(host: String, port: Int) throws -> (socket: Int32, port: Int) {
        let address = "\(host):\(port)"
        guard (0...65535).contains(port) else { throw PEAError.usage("cannot listen on \(address): the port must be 0...65535") }
        var inetAddress = in_addr()
        guard inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &inetAddress) == 1 else {
            throw PEAError.usage("cannot listen on \(address): the host must be an IPv4 address (127.0.0.1, 0.0.0.0) or localhost")
        }
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { throw PEAError.usage("cannot listen on \(address): \(systemErrorMessage())") }
        var reuse: Int32 = 1  // rebinding right after a restart, while old connections are in TIME_WAIT
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &reuse, socklen_t(MemoryLayout<Int32>.size))
        var socketAddress = sockaddr_in()
        socketAddress.sin_family = sa_family_t(AF_INET)
        socketAddress.sin_port = in_port_t(port).bigEndian
        socketAddress.sin_addr = inetAddress
        let bound = withUnsafePointer(to: &socketAddress) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(listener, 128) == 0 else {
            let reason = errno == EADDRINUSE ? "the address is already in use (another server?)" : systemErrorMessage()
            close(listener)
            throw PEAError.usage("cannot listen on \(address): \(reason)")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        withUnsafeMutablePointer(to: &socketAddress) {
            _ = $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) }
        }
        return (listener, Int(in_port_t(bigEndian: socketAddress.sin_port)))
    }

    private func acceptConnections() {
        while true {
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            if poll(&fds, 2, -1) < 0, errno != EINTR { return }
            if fds[1].revents != 0 { return }
            guard fds[0].revents != 0 else { continue }
            let client = accept(listener, nil, nil)
            guard client >= 0 else {
                if errno == EMFILE || errno == ENFILE { usleep(50_000) }  // out of descriptors: let connections end
                continue
            }
            closeOnExec(client)
            guard connections.admit(limit: configuration.maxConnections) else {
                refuse(client)
                continue
            }
            let thread = startThread {
                self.serve(client)
                self.connections.leave()
            }
            if let thread {
                pthread_detach(thread)  // stop() waits on the connection count, not on the threads
            } else {
                close(client)
                connections.leave()
            }
        }
    }

    /// Answers a connection beyond the limit with 503 without blocking the accept thread, and closes it.
    private func refuse(_ client: Int32) {
        var response = HTTPResponse.text("the server has \(configuration.maxConnections) connections open; try again shortly", status: 503)
        response.headers.add("Retry-After", "1")
        let bytes = response.serialized(keepAlive: false)
        _ = bytes.withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
        shutdown(client, Int32(SHUT_WR))
        discardReceived(client, until: 0)
        close(client)
    }

    // MARK: - Connections

    private func serve(_ client: Int32) {
        defer { close(client) }
        var timeout = timeval(tv_sec: Int(configuration.writeTimeout),
                              tv_usec: Int(configuration.writeTimeout.truncatingRemainder(dividingBy: 1) * 1e6))
        setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var parser = HTTPRequestParser(limits: configuration.limits)
        var deadline = monotonicSeconds() + configuration.requestTimeout
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            do {
                while let request = try parser.next() {
                    let response = respond(to: request, from: client)
                    let keepAlive = request.keepAlive && !connections.isStopping
                    let bytes = response.serialized(keepAlive: keepAlive, version: request.version, includeBody: request.method != "HEAD")
                    guard sendAll(client, bytes) else { return }
                    guard keepAlive else { return closeGracefully(client) }
                    deadline = monotonicSeconds() + configuration.requestTimeout
                }
            } catch {
                _ = sendAll(client, error.response.serialized(keepAlive: false))
                return closeGracefully(client)
            }
            if parser.takeContinueExpectation(), !sendAll(client, Array("HTTP/1.1 100 Continue\r\n\r\n".utf8)) { return }
            switch waitForInput(client, until: deadline) {
            case .readable: break
            case .stopping: return
            case .timedOut:
                if parser.hasPartialRequest {
                    let error = HTTPError(408, "the request did not arrive within \(configuration.requestTimeout) seconds")
                    _ = sendAll(client, error.response.serialized(keepAlive: false))
                    closeGracefully(client)
                }
                return
            }
            let count = chunk.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { return }
            parser.append(chunk[0..<count])
        }
    }

    private func respond(to request: HTTPRequest, from client: Int32) -> HTTPResponse {
        pthread_setspecific(currentClientKey, UnsafeRawPointer(bitPattern: Int(client) + 1))
        defer { pthread_setspecific(currentClientKey, nil) }
        do {
            return try handler(request)
        } catch {
            return .text("internal error: \(error)", status: 500)
        }
    }

    /// Closes the sending side and reads what the client still sends for a moment before the socket is closed:
    /// closing with unread bytes makes the system reset the connection, and a reset can destroy the response
    /// before the client reads it (the unread rest of a refused body, say).
    private func closeGracefully(_ client: Int32) {
        shutdown(client, Int32(SHUT_WR))
        discardReceived(client, until: monotonicSeconds() + min(1, configuration.requestTimeout))
    }

    /// Reads and drops what arrives until end of stream, `deadline` (0: only what has arrived), 1 MiB or `stop()`.
    private func discardReceived(_ client: Int32, until deadline: Double) {
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        var total = 0
        while total < 1 << 20 {
            if deadline > 0, waitForInput(client, until: deadline) != .readable { return }
            let count = chunk.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { return }
            total += count
        }
    }

    private enum Wait { case readable, timedOut, stopping }

    /// Waits until `client` has bytes (or end of stream), the monotonic `deadline` passes, or `stop()` is called.
    private func waitForInput(_ client: Int32, until deadline: Double) -> Wait {
        while true {
            let remaining = deadline - monotonicSeconds()
            guard remaining > 0 else { return .timedOut }
            var fds = [pollfd(fd: client, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            let ready = poll(&fds, 2, Int32(min((remaining * 1000).rounded(.up), 60_000)))
            if ready < 0, errno != EINTR { return .stopping }  // poll itself failed: end the connection as on stop
            if fds[1].revents != 0 { return .stopping }
            if fds[0].revents != 0 { return .readable }
        }
    }

    /// Sends all of `bytes`; false when the client has gone or stopped reading for `writeTimeout`.
    private func sendAll(_ client: Int32, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes.withUnsafeBytes { send(client, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if sent < 0 {
                if errno == EINTR { continue }
                return false
            }
            offset += sent
        }
        return true
    }
}

/// The connection whose request the handler on this thread answers: its descriptor + 1 (nil: none).
private let currentClientKey: pthread_key_t = {
    var key = pthread_key_t()
    precondition(pthread_key_create(&key, nil) == 0, "cannot create a thread-specific key")
    return key
}()

extension HTTPServer {
    /// Whether the client whose request the calling handler answers has closed its connection or reset it
    /// (false outside a handler), so that a long handler can drop work nobody will read. A client that only
    /// shuts down its sending side after the request counts as gone too. Bytes the client sent meanwhile (a
    /// pipelined request) are left unread.
    public static func clientHasHungUp() -> Bool {
        let value = Int(bitPattern: pthread_getspecific(currentClientKey))
        guard value > 0 else { return false }
        let client = Int32(value - 1)
        var descriptor = pollfd(fd: client, events: Int16(POLLIN), revents: 0)
        guard poll(&descriptor, 1, 0) > 0 else { return false }
        if descriptor.revents & Int16(POLLERR | POLLHUP) != 0 { return true }
        var byte: UInt8 = 0
        let count = recv(client, &byte, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT))
        return count == 0 || (count < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
    }
}

/// The count of open connections and whether the server is stopping, under one lock, with a condition that
/// `stop()` waits on until the last connection has ended.
private final class ConnectionGate: @unchecked Sendable {
    private let lock = PThreadLock()
    private var open = 0
    private var stopping = false

    var isStopping: Bool { lock.withLock { stopping } }

    /// Counts a new connection in, unless `limit` are open or the server is stopping.
    func admit(limit: Int) -> Bool {
        lock.withLock {
            guard !stopping, open < limit else { return false }
            open += 1
            return true
        }
    }

    func leave() {
        lock.withLock {
            open -= 1
            if open == 0 { lock.broadcast() }
        }
    }

    /// Marks the server stopping; false if it already was.
    func beginStopping() -> Bool {
        lock.withLock {
            defer { stopping = true }
            return !stopping
        }
    }

    func waitUntilNoneOpen() {
        lock.withLock {
            while open > 0 { lock.wait() }
        }
    }
}

/// Keeps `descriptor` out of processes the server's process starts (the server's sockets would stay open in them).
private func closeOnExec(_ descriptor: Int32) {
    _ = fcntl(descriptor, F_SETFD, fcntl(descriptor, F_GETFD) | FD_CLOEXEC)
}

/// Runs `body` on a new, joinable thread; nil if the system cannot start one.
func startThread(_ body: @escaping () -> Void) -> pthread_t? {
    final class Body {
        let run: () -> Void
        init(_ run: @escaping () -> Void) { self.run = run }
    }
    let context = Unmanaged.passRetained(Body(body)).toOpaque()
    var thread = pthread_t()
    guard pthread_create(&thread, nil, { context in
        Unmanaged<Body>.fromOpaque(context!).takeRetainedValue().run()
        return nil
    }, context) == 0 else {
        Unmanaged<Body>.fromOpaque(context).release()
        return nil
    }
    return thread
}
