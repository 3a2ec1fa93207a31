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
    let file = try AtomicFileWriter(path: path)
    do {
        try body(file.append)
        try file.commit()
    } catch {
        file.abandon()
        throw error
    }
}

/// A file written in pieces over time that appears at `path` whole or not at all: `append` writes to a temporary
/// next to `path` (`PATH.tmp-PID-HEX`, which `removeStaleTemporaries` removes if the process dies), `commit`
/// flushes it and renames it over `path`, `abandon` removes it. Errors name `path`, not the temporary.
public final class AtomicFileWriter {
    public let path: String
    private let temporaryPath: String
    private var descriptor: Int32
    /// Bytes appended so far.
    public private(set) var size = 0

    public init(path: String) throws {
        self.path = path
        (temporaryPath, descriptor) = try createTemporaryFile(besides: path)
    }

    deinit { abandon() }

    public func append(_ bytes: [UInt8]) throws {
        guard descriptor >= 0 else { throw PEAError.invalidFile(path: path, reason: "already committed or abandoned") }
        try writeAll(descriptor, bytes, path: path)
        size += bytes.count
    }

    /// Flushes the file to disk and renames it to `path`.
    public func commit() throws {
        guard descriptor >= 0 else { throw PEAError.invalidFile(path: path, reason: "already committed or abandoned") }
        guard fsync(descriptor) == 0 else {
            throw PEAError.invalidFile(path: path, reason: "cannot flush to disk: \(systemErrorMessage())")
        }
        let closed = close(descriptor)
        descriptor = -1
        guard closed == 0 else {
            unlink(temporaryPath)
            throw PEAError.invalidFile(path: path, reason: "cannot close: \(systemErrorMessage())")
        }
        guard rename(temporaryPath, path) == 0 else {
            let reason = "cannot rename \(temporaryPath) to it: \(systemErrorMessage())"
            unlink(temporaryPath)
            throw PEAError.invalidFile(path: path, reason: reason)
        }
    }

    /// Removes the temporary; `path` is left as it was. Does nothing after `commit`.
    public func abandon() {
        guard descriptor >= 0 else { return }
        close(descriptor)
        descriptor = -1
        unlink(temporaryPath)
    }
}

/// Writes a folder so that readers see the old folder or the whole new one, never a part: `body` fills a new
/// temporary folder next to `path` (its argument), which is then renamed to `path`. A folder already at `path`
/// is first renamed aside and removed after the new one is in place (a kill in between leaves no `path`, and
/// the old folder as a temporary that `removeStaleTemporaries` removes). On any failure the temporary folder
/// is removed and `path` is left as it was.
func writeFolderAtomically(to path: String, _ body: (_ temporaryFolder: String) throws -> Void) throws {
    let temporaryFolder = try createTemporaryFolder(besides: path)
    do {
        try body(temporaryFolder)
        var old: String?
        if isDirectory(path) {
            old = try createTemporaryFolder(besides: path)   // an empty folder, which the rename below replaces
            guard rename(path, old!) == 0 else {
                rmdir(old!)
                throw PEAError.invalidFile(path: path, reason: "cannot move the old folder aside: \(systemErrorMessage())")
            }
        }
        guard rename(temporaryFolder, path) == 0 else {
            let reason = "cannot rename \(temporaryFolder) to it: \(systemErrorMessage())"
            if let old { rename(old, path) }
            throw PEAError.invalidFile(path: path, reason: reason)
        }
        if let old { removeRecursively(old) }
    } catch {
        removeRecursively(temporaryFolder)
        throw error
    }
}

/// Removes the temporaries of `writeFileAtomically` and `writeFolderAtomically` that dead processes left in
/// `folder` and in its subfolders down to `levels` (1: the folder alone) — a process killed while writing, e.g.
/// by SIGKILL: names `NAME.tmp-PID-HEX` whose PID no longer exists. A live process's temporaries stay, and so do
/// those whose NAME `owned` says are not the caller's (a folder that processes on other machines share, whose
/// PIDs mean nothing here). Returns the removed paths.
@discardableResult
public func removeStaleTemporaries(in folder: String, levels: Int = 2, owned: (_ name: String) -> Bool = { _ in true }) -> [String] {
    var removed: [String] = []
    for name in listDirectory(folder) {
        let path = joinPath(folder, name)
        if let (target, pid) = temporaryOwner(name), owned(target), kill(pid, 0) != 0, errno == ESRCH {
            removeRecursively(path)
            removed.append(path)
        } else if levels > 1, isDirectory(path) {
            removed += removeStaleTemporaries(in: path, levels: levels - 1, owned: owned)
        }
    }
    return removed
}

/// What follows a path in its temporary's name: `PATH.tmp-PID-HEX`.
private let temporarySuffix = ".tmp"

/// The name a temporary stands for and the PID in its name (`NAME.tmp-PID-HEX`); nil for other names.
private func temporaryOwner(_ name: String) -> (target: String, pid: pid_t)? {
    let parts = name.split(separator: "-", omittingEmptySubsequences: false)
    guard parts.count >= 3, parts[parts.count - 3].hasSuffix(temporarySuffix), let pid = pid_t(parts[parts.count - 2]),
          pid > 0, UInt32(parts[parts.count - 1], radix: 16) != nil else { return nil }
    let withSuffix = parts[..<(parts.count - 2)].joined(separator: "-")
    return (String(withSuffix.dropLast(temporarySuffix.count)), pid)
}

/// Creates a new file next to `path` with a unique name.
private func createTemporaryFile(besides path: String) throws -> (String, Int32) {
    try createTemporary("file", besides: path) { candidate in open(candidate, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666) }
}

/// Creates a new empty folder next to `path` with a unique name.
private func createTemporaryFolder(besides path: String) throws -> String {
    try createTemporary("folder", besides: path) { candidate in mkdir(candidate, 0o755) == 0 ? 0 : -1 }.path
}

/// Creates a new `kind` ("file" or "folder") next to `path` with a unique name `PATH.tmp-PID-HEX`: `create` makes
/// it (failing with EEXIST when the name is taken) and returns its descriptor (0 for a folder), or -1.
private func createTemporary(_ kind: String, besides path: String, _ create: (String) -> Int32) throws
    -> (path: String, descriptor: Int32) {
    var time = timespec()
    clock_gettime(CLOCK_REALTIME, &time)
    var random = SplitMix64(seed: UInt64(UInt32(bitPattern: getpid())) << 32 ^ UInt64(time.tv_nsec) ^ UInt64(time.tv_sec) << 20)
    for _ in 0..<100 {
        let candidate = "\(path)\(temporarySuffix)-\(getpid())-\(String(random.next() & 0xFFFF_FFFF, radix: 16))"
        let descriptor = create(candidate)
        if descriptor >= 0 { return (candidate, descriptor) }
        if errno != EEXIST {
            throw PEAError.invalidFile(path: path, reason: "cannot create temporary \(kind) \(candidate): \(systemErrorMessage())")
        }
    }
    throw PEAError.invalidFile(path: path, reason: "cannot create a temporary \(kind) next to it: too many name collisions")
}

/// Writes every byte, retrying after partial writes and interruptions.
func writeAll(_ descriptor: Int32, _ bytes: [UInt8], path: String) throws {
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
