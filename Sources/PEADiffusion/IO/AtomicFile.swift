#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes a file so that readers see the old file or the whole new one, never a part: the content goes to a new
/// file next to `path` (same folder, so `rename` is atomic), is flushed, and is renamed over `path`. `body`
/// receives a function that appends bytes. On any failure the temporary file is removed and `path` is left as it
/// was. Errors are `PEAError.invalidFile` naming the path and the system's reason.
func writeFileAtomically(to path: String, _ body: (_ append: ([UInt8]) throws -> Void) throws -> Void) throws {
    let (temporaryPath, descriptor) = try createTemporaryFile(besides: path)
    var closed = false
    do {
        try body { bytes in try writeAll(descriptor, bytes, path: temporaryPath) }
        guard fsync(descriptor) == 0 else {
            throw PEAError.invalidFile(path: temporaryPath, reason: "cannot flush to disk: \(systemErrorMessage())")
        }
        closed = true
        guard close(descriptor) == 0 else {
            throw PEAError.invalidFile(path: temporaryPath, reason: "cannot close: \(systemErrorMessage())")
        }
        guard rename(temporaryPath, path) == 0 else {
            throw PEAError.invalidFile(path: path, reason: "cannot rename \(temporaryPath) to it: \(systemErrorMessage())")
        }
    } catch {
        if !closed { close(descriptor) }
        unlink(temporaryPath)
        throw error
    }
}

/// Creates a new file next to `path` with a unique name.
private func createTemporaryFile(besides path: String) throws -> (String, Int32) {
    var time = timespec()
    clock_gettime(CLOCK_REALTIME, &time)
    var random = SplitMix64(seed: UInt64(UInt32(bitPattern: getpid())) << 32 ^ UInt64(time.tv_nsec) ^ UInt64(time.tv_sec) << 20)
    for _ in 0..<100 {
        let candidate = "\(path).tmp-\(getpid())-\(String(random.next() & 0xFFFF_FFFF, radix: 16))"
        let descriptor = open(candidate, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
        if descriptor >= 0 { return (candidate, descriptor) }
        if errno != EEXIST {
            throw PEAError.invalidFile(path: path, reason: "cannot create temporary file \(candidate): \(systemErrorMessage())")
        }
    }
    throw PEAError.invalidFile(path: path, reason: "cannot create a temporary file next to it: too many name collisions")
}

/// Writes every byte, retrying after partial writes and interruptions.
private func writeAll(_ descriptor: Int32, _ bytes: [UInt8], path: String) throws {
    try bytes.withUnsafeBytes { buffer in
        var written = 0
        while written < buffer.count {
            let count = write(descriptor, buffer.baseAddress! + written, buffer.count - written)
            if count < 0 {
                if errno == EINTR { continue }
                throw PEAError.invalidFile(path: path, reason: "cannot write: \(systemErrorMessage())")
            }
            written += count
        }
    }
}
