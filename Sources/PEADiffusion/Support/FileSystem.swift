#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// Small POSIX file-system helpers (no Foundation): paths, folders, whole-file reads.

/// Whether `path` is a regular file (following symlinks).
public func isRegularFile(_ path: String) -> Bool {
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

/// Whether `path` exists and is not a folder (following a symbolic link).
func existsAsFile(_ path: String) -> Bool {
    var status = stat()
    return stat(path, &status) == 0 && (status.st_mode & S_IFMT) != S_IFDIR
}

/// Where pea looks for one of its optional shared libraries (`make cuda`'s, `make mpi`'s), in order, without
/// duplicates: `file` beside the running executable; then, in the current directory and in each folder above the
/// executable that holds Package.swift (the repository of a `swift build`), `buildFolder/file` and `file`.
func librarySearchPaths(file: String, buildFolder: String) -> [String] {
    var paths: [String] = []
    func add(_ path: String) { if !paths.contains(path) { paths.append(path) } }
    if let executableDirectory = executablePath().map(parentFolder) { add(executableDirectory + "/" + file) }
    var roots: [String] = []
    if let cwd = currentDirectory() { roots.append(cwd) }
    for folder in foldersAboveExecutable() where existsAsFile(folder + "/Package.swift") && !roots.contains(folder) {
        roots.append(folder)
    }
    for root in roots {
        add(root + "/" + buildFolder + "/" + file)
        add(root + "/" + file)
    }
    return paths
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

/// The names in a folder (without . and ..), sorted; empty when it cannot be read.
func listDirectory(_ path: String) -> [String] {
    guard let directory = opendir(path) else { return [] }
    defer { closedir(directory) }
    var names: [String] = []
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}

/// `rm -rf`: removes a file or a folder with everything in it, as far as it can (errors are ignored).
func removeRecursively(_ path: String) {
    var status = stat()
    guard lstat(path, &status) == 0 else { return }
    if (status.st_mode & S_IFMT) == S_IFDIR {
        for name in listDirectory(path) { removeRecursively(path + "/" + name) }
        rmdir(path)
    } else {
        unlink(path)
    }
}

/// A user-named file opened for reading, refused unless it is a regular file: a FIFO would block the reader
/// (in `open`, or forever in `read`), a device would be read without end, and mmap of either fails obscurely.
/// Opened with O_NONBLOCK so that even a FIFO with no writer cannot block the open itself; the type is then
/// checked on the descriptor (fstat), so nothing can swap the file between the check and the use.
/// The caller closes `descriptor`. Throws `PEAError.invalidFile` naming the path and the file's type.
func openRegularFile(_ path: String) throws -> (descriptor: Int32, size: Int) {
    let descriptor = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
    guard descriptor >= 0 else {
        throw PEAError.invalidFile(path: path, reason: "cannot open: \(systemErrorMessage())")
    }
    var info = stat()
    guard fstat(descriptor, &info) == 0 else {
        let message = systemErrorMessage()
        close(descriptor)
        throw PEAError.invalidFile(path: path, reason: "cannot stat: \(message)")
    }
    guard (info.st_mode & S_IFMT) == S_IFREG else {
        close(descriptor)
        throw PEAError.invalidFile(path: path, reason: "not a regular file (\(fileTypeDescription(info.st_mode)))")
    }
    return (descriptor, Int(info.st_size))
}

/// "a FIFO", "a directory", … for the type bits of `mode`.
func fileTypeDescription(_ mode: mode_t) -> String {
    switch mode & S_IFMT {
    case S_IFREG: return "a regular file"
    case S_IFDIR: return "a directory"
    case S_IFIFO: return "a FIFO"
    case S_IFCHR: return "a character device"
    case S_IFBLK: return "a block device"
    case S_IFSOCK: return "a socket"
    case S_IFLNK: return "a symbolic link"
    default: return "an unknown kind of file"
    }
}

/// The whole contents of a (small) regular file, read with plain POSIX calls. Throws `PEAError.invalidFile`
/// naming the path and the system's reason.
public func readWholeFile(_ path: String) throws -> [UInt8] {
    let (descriptor, size) = try openRegularFile(path)
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    bytes.reserveCapacity(size)
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
