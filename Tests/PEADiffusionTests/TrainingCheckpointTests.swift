import Foundation
import XCTest
@testable import PEADiffusion

/// Checkpoints that never lie (issue #16): every number of a checkpoint's metadata is checked on resume, a
/// checkpoint is one unit (its folder appears whole; its two files carry the same step), atomic writes leave
/// no temporaries behind, and a run stopped by SIGINT, SIGTERM or SIGKILL loses nothing it had saved.
extension TrainingTests {
    /// Every temporary name (`.tmp-`) under `folder`, recursively.
    private func temporaries(in folder: String) -> [String] {
        listDirectory(folder).flatMap { name -> [String] in
            let path = joinPath(folder, name)
            if name.contains(".tmp-") { return [path] }
            return isDirectory(path) ? temporaries(in: path) : []
        }
    }

    func testAtomicWriteRemovesItsTemporaryOnError() throws {
        let scratch = ScratchDirectory("pea-atomic-error")
        let path = scratch.write("old", to: "file")
        struct Failure: Error {}
        XCTAssertThrowsError(try writeFileAtomically(to: path) { append in
            try append(Array("new".utf8))
            throw Failure()
        })
        XCTAssertEqual(readFileBytes(path), Array("old".utf8))
        XCTAssertEqual(listDirectory(scratch.path), ["file"])

        // A write past the file-size limit is an error (EFBIG; SIGXFSZ is ignored), not a kill that leaves the
        // temporary behind. /bin/sh's `ulimit -f` counts 512- or 1024-byte blocks: 8 of them hold the metrics
        // line of one step, not the 32 KiB adapter.
        let output = scratch.file("out")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "ulimit -f 8; exec \"$0\" \"$@\"", peaExecutablePath, "train", "--model", pipeline,
                             "--text-encoder", encoder, "--data", try Self.writeCorpus(in: scratch, count: 2, seed: 9),
                             "--batch-size", "1", "--resolution", "32", "--adapter-hidden", "64", "--backend", "cpu",
                             "--output", output, "--steps", "1"]
        let log = Pipe()
        process.standardError = log
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let stderr = String(decoding: log.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationReason, .exit, "pea must not be killed by SIGXFSZ: \(stderr)")
        XCTAssertEqual(process.terminationStatus, 1, stderr)
        XCTAssertTrue(stderr.contains("adapter.safetensors") && stderr.contains(String(cString: strerror(EFBIG))), stderr)
        XCTAssertEqual(temporaries(in: output), [])
        XCTAssertFalse(fileExists(joinPath(output, "adapter.safetensors")))
    }

    func testStaleTemporariesOfDeadProcessesAreRemoved() throws {
        let scratch = ScratchDirectory("pea-stale-temporaries")
        let finished = Process()
        finished.executableURL = URL(fileURLWithPath: "/bin/true")
        try finished.run()
        finished.waitUntilExit()
        let dead = finished.processIdentifier, live = getpid()
        scratch.write("x", to: "adapter.safetensors.tmp-\(dead)-1a2b")
        try makeDirectories(scratch.file("checkpoint-3.tmp-\(dead)-ff/inner"))
        try makeDirectories(scratch.file("validation"))
        scratch.write("x", to: "validation/step-000001.png.tmp-\(dead)-0")
        scratch.write("x", to: "optimizer.safetensors.tmp-\(live)-c0ffee")
        scratch.write("x", to: "notes.tmp-1-x")   // not a temporary's name (the suffix is not hexadecimal)
        scratch.write("x", to: "checkpoint-3")
        let removed = removeStaleTemporaries(in: scratch.path)
        XCTAssertEqual(Set(removed), [scratch.file("adapter.safetensors.tmp-\(dead)-1a2b"), scratch.file("checkpoint-3.tmp-\(dead)-ff"),
                                      scratch.file("validation/step-000001.png.tmp-\(dead)-0")])
        XCTAssertEqual(listDirectory(scratch.path), ["checkpoint-3", "notes.tmp-1-x", "optimizer.safetensors.tmp-\(live)-c0ffee", "validation"])
        XCTAssertEqual(listDirectory(scratch.file("validation")), [])
    }
}
