#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import XCTest
@testable import PEADiffusion

/// A fresh directory under /tmp for one test (mkdtemp: unique per process and call), removed with its
/// contents by `remove()` or when the object goes away.
final class ScratchDirectory {
    let path: String

    init(_ label: String = "pea-test") {
        var template = Array("/tmp/\(label)-\(getpid())-XXXXXX".utf8CString)
        let created = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(created != nil, "mkdtemp failed: \(String(cString: strerror(errno)))")
        path = String(cString: created!)
    }

    deinit { remove() }

    /// The path of `name` inside the directory (nothing is created).
    func file(_ name: String) -> String { path + "/" + name }

    /// Writes `bytes` to `name` inside the directory and returns its path.
    @discardableResult
    func write(_ bytes: [UInt8], to name: String) -> String {
        let target = file(name)
        writeFileBytes(bytes, to: target)
        return target
    }

    @discardableResult
    func write(_ text: String, to name: String) -> String { write(Array(text.utf8), to: name) }

    /// Names of the entries in the directory (not "." or ".."), sorted.
    func entries() -> [String] { listDirectory(path) }

    func remove() { removeRecursively(path) }
}

/// Writes a whole file with POSIX calls (no FileManager), replacing what was there.
func writeFileBytes(_ bytes: [UInt8], to path: String) {
    let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    precondition(descriptor >= 0, "cannot create \(path): \(String(cString: strerror(errno)))")
    defer { close(descriptor) }
    bytes.withUnsafeBytes { buffer in
        var written = 0
        while written < buffer.count {
            let count = write(descriptor, buffer.baseAddress! + written, buffer.count - written)
            precondition(count > 0, "cannot write \(path)")
            written += count
        }
    }
}

/// The whole contents of a file, or nil when it cannot be read.
func readFileBytes(_ path: String) -> [UInt8]? {
    let descriptor = open(path, O_RDONLY)
    guard descriptor >= 0 else { return nil }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count <= 0 { break }
        bytes.append(contentsOf: chunk[0..<count])
    }
    return bytes
}

func fileExists(_ path: String) -> Bool {
    var status = stat()
    return stat(path, &status) == 0
}

/// Asserts that `body` throws an error whose description contains every fragment.
func assertThrowsError<T>(containing fragments: [String], file: StaticString = #filePath, line: UInt = #line,
                          _ body: () throws -> T) {
    do {
        _ = try body()
        XCTFail("expected an error mentioning \(fragments)", file: file, line: line)
    } catch {
        let description = "\(error)"
        for fragment in fragments where !description.contains(fragment) {
            XCTFail("'\(description)' does not mention '\(fragment)'", file: file, line: line)
        }
    }
}
