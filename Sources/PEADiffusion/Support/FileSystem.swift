#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// Small POSIX file-system helpers (no Foundation): paths, folders, whole-file reads.

func isRegularFile(_ path: String) -> Bool {
    var status = stat()
    return stat(path, &status) == 0 && (status.st_mode & S_IFMT) == S_IFREG
}

/// `folder/name`, with one slash.
public func joinPath(_ folder: String, _ name: String) -> String {
    if folder.isEmpty { return name }
    return folder.hasSuffix("/") ? folder + name : folder + "/" + name
}

/// The folder part of a path ("." for a bare file name).
public func parentFolder(_ path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    if slash == path.startIndex { return "/" }
    return String(path[..<slash])
}

/// The running executable's path (`/proc/self/exe`), nil where it cannot be read.
func executablePath() -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { return nil }
    buffer[length] = 0
    return String(cString: buffer)
}

/// The folders above the running executable's, nearest first, up to `levels` of them (`.build/release/pea` →
/// `.build`, then the repository, …): where a build finds the repository it was built in.
func foldersAboveExecutable(levels: Int = 6) -> [String] {
    guard var folder = executablePath().map(parentFolder) else { return [] }
    var folders: [String] = []
    for _ in 0..<levels where folder != "/" && !folder.isEmpty {
        folder = parentFolder(folder)
        folders.append(folder)
    }
    return folders
}

/// The working directory, nil where it cannot be read.
func currentDirectory() -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    guard getcwd(&buffer, buffer.count) != nil else { return nil }
    return String(cString: buffer)
}

/// Whether `path` is a directory (following a symbolic link).
public func isDirectory(_ path: String) -> Bool {
    var status = stat()
    return stat(path, &status) == 0 && (status.st_mode & S_IFMT) == S_IFDIR
}

/// `mkdir -p`: creates `path` and any missing parent folders; an existing non-folder is an error naming it.
func makeDirectories(_ path: String) throws {
    guard !path.isEmpty else { return }
    var status = stat()
    if stat(path, &status) == 0 {
        guard (status.st_mode & S_IFMT) == S_IFDIR else {
            throw PEAError.invalidFile(path: path, reason: "exists and is not a folder")
        }
        return
    }
    if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
        try makeDirectories(String(path[..<slash]))
    }
    guard mkdir(path, 0o755) == 0 || errno == EEXIST else {
        throw PEAError.invalidFile(path: path, reason: "cannot create the folder: \(systemErrorMessage())")
    }
}

/// The whole contents of a (small) file, read with plain POSIX calls. Throws `PEAError.invalidFile`
/// naming the path and the system's reason.
func readWholeFile(_ path: String) throws -> [UInt8] {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC)
    guard descriptor >= 0 else {
        throw PEAError.invalidFile(path: path, reason: "cannot open: \(systemErrorMessage())")
    }
    defer { close(descriptor) }
    var info = stat()
    guard fstat(descriptor, &info) == 0 else {
        throw PEAError.invalidFile(path: path, reason: "cannot stat: \(systemErrorMessage())")
    }
    guard (info.st_mode & S_IFMT) == S_IFREG else {
        throw PEAError.invalidFile(path: path, reason: "not a regular file")
    }
    var bytes: [UInt8] = []
    bytes.reserveCapacity(Int(info.st_size))
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count < 0 {
            if errno == EINTR { continue }
            throw PEAError.invalidFile(path: path, reason: "cannot read: \(systemErrorMessage())")
        }
        if count == 0 { break }
        bytes.append(contentsOf: chunk[0..<count])
    }
    return bytes
}

/// `strerror(errno)` as a String.
func systemErrorMessage(_ code: Int32 = errno) -> String {
    guard let message = strerror(code) else { return "error \(code)" }
    return String(cString: message)
}
