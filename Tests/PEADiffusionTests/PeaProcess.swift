import Foundation
import XCTest

/// The `pea` executable built beside the test bundle (`swift build --build-tests` builds both).
var peaExecutablePath: String {
    URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("pea").path
}

/// Runs `pea` with `arguments` and returns its exit status and output; `environment` changes the inherited
/// environment (nil removes a variable), `directory` is the working directory.
func runPea(_ arguments: [String], environment changes: [String: String?] = [:], directory: String? = nil) throws
    -> (status: Int32, stdout: String, stderr: String) {
    guard FileManager.default.isExecutableFile(atPath: peaExecutablePath) else {
        throw XCTSkip("the pea executable is not built at \(peaExecutablePath)")
    }
    return try runProgram(peaExecutablePath, arguments, environment: changes, directory: directory)
}

/// Runs the program at `executable` as `runPea` runs pea (a launcher such as mpirun in front of it, say).
func runProgram(_ executable: String, _ arguments: [String], environment changes: [String: String?] = [:], directory: String? = nil) throws
    -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var environment = ProcessInfo.processInfo.environment
    for (key, value) in changes { environment[key] = value }
    process.environment = environment
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile(), stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
}

/// Runs command lines that must fail: each exits with its status, says each of its fragments on stderr, and leaves
/// no file at `leavesNo`.
func assertPeaFails(_ cases: [(arguments: [String], status: Int32, fragments: [String])], leavesNo path: String,
                    file: StaticString = #filePath, line: UInt = #line) throws {
    for (arguments, status, fragments) in cases {
        let result = try runPea(arguments)
        XCTAssertEqual(result.status, status, "\(arguments): \(result.stderr)", file: file, line: line)
        for fragment in fragments {
            XCTAssertTrue(result.stderr.contains(fragment), "\(arguments): '\(fragment)' not in \(result.stderr)", file: file, line: line)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path), "\(arguments) left \(path)", file: file, line: line)
    }
}

/// Starts `pea` with `arguments` in the background, its stdout and stderr going to the file `log` (a pipe nobody
/// reads could fill and stall it): for tests that signal the process while it runs.
func startPea(_ arguments: [String], log: String, environment changes: [String: String?] = [:]) throws -> Process {
    guard FileManager.default.isExecutableFile(atPath: peaExecutablePath) else {
        throw XCTSkip("the pea executable is not built at \(peaExecutablePath)")
    }
    _ = FileManager.default.createFile(atPath: log, contents: nil)
    let output = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
    let process = Process()
    process.executableURL = URL(fileURLWithPath: peaExecutablePath)
    process.arguments = arguments
    var environment = ProcessInfo.processInfo.environment
    for (key, value) in changes { environment[key] = value }
    process.environment = environment
    process.standardOutput = output
    process.standardError = output
    try process.run()
    return process
}
