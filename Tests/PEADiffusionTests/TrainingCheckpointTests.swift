import Foundation
import XCTest
@testable import PEADiffusion

/// Checkpoints that never lie (issue #16): every number of a checkpoint's metadata is checked on resume, a
/// checkpoint is one unit (its folder appears whole; its two files carry the same step), atomic writes leave
/// no temporaries behind, and a run stopped by SIGINT, SIGTERM or SIGKILL loses nothing it had saved.
extension TrainingTests {
    /// A trainer of the shape `pea train --adapter-hidden 32` gives, for `steps` steps on a fresh tiny corpus.
    private func checkpointTrainer(_ scratch: ScratchDirectory, steps: Int) throws -> PEATrainer {
        let data = try Self.writeCorpus(in: scratch, count: 5, seed: 8)
        var options = TrainingOptions(steps: steps, batchSize: 2)
        options.learningRate = 1e-3
        options.resolution = 32
        return try makeTrainer(data: data, options: options, backend: CPUBackend(threads: 2))
    }

    /// Rewrites a safetensors file with the same tensors and its metadata changed (nil removes a key).
    private func rewriteMetadata(_ path: String, _ changes: [String: String?]) throws {
        let file = try SafeTensorsFile(path: path)
        var metadata = file.metadata
        for (key, value) in changes { metadata[key] = value }
        try SafeTensorsWriter.write(try file.names.map { (name: $0, tensor: try file.tensor($0)) }, metadata: metadata, to: path)
    }

    /// Copies a folder's files (one level) into a new folder.
    private func copyFolder(_ source: String, to destination: String) throws {
        try makeDirectories(destination)
        for name in listDirectory(source) {
            scratchWrite(readFileBytes(joinPath(source, name))!, to: joinPath(destination, name))
        }
    }

    private func scratchWrite(_ bytes: [UInt8], to path: String) {
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
    }

    /// Every temporary name (`.tmp-`) under `folder`, recursively.
    private func temporaries(in folder: String) -> [String] {
        listDirectory(folder).flatMap { name -> [String] in
            let path = joinPath(folder, name)
            if name.contains(".tmp-") { return [path] }
            return isDirectory(path) ? temporaries(in: path) : []
        }
    }

    func testResumeChecksEveryNumberOfTheMetadata() throws {
        let scratch = ScratchDirectory("pea-checkpoint-metadata")
        let trainer = try checkpointTrainer(scratch, steps: 3)
        while trainer.step < 2 { _ = try trainer.trainStep() }
        let good = scratch.file("checkpoint-2")
        try trainer.saveCheckpoint(to: good)
        let cases: [(file: String, changes: [String: String?], fragments: [String])] = [
            ("optimizer", ["step": "-3"], ["optimizer.safetensors", "'step'", "-3"]),
            ("adapter", ["step": "-3"], ["adapter.safetensors", "'step'", "-3"]),
            ("optimizer", ["step": "9"], ["optimizer.safetensors", "'step'", "9", "0...3"]),
            ("optimizer", ["step": "2.5"], ["optimizer.safetensors", "'step'", "malformed"]),
            ("adapter", ["step": nil], ["adapter.safetensors", "'step'", "missing"]),
            ("optimizer", ["optimizer_step": "-1"], ["optimizer.safetensors", "'optimizer_step'"]),
            ("optimizer", ["optimizer_step": "3"], ["optimizer.safetensors", "'optimizer_step'", "0...2"]),
            ("optimizer", ["steps_since_overflow": "-5"], ["optimizer.safetensors", "'steps_since_overflow'"]),
            ("optimizer", ["loss_scale": "nan"], ["optimizer.safetensors", "'loss_scale'"]),
            ("optimizer", ["loss_scale": "inf"], ["optimizer.safetensors", "'loss_scale'"]),
            ("optimizer", ["loss_scale": "-1"], ["optimizer.safetensors", "'loss_scale'"]),
            ("optimizer", ["data_position": "{}"], ["optimizer.safetensors", "'data_position'"]),
        ]
        for (index, (file, changes, fragments)) in cases.enumerated() {
            let folder = scratch.file("bad-\(index)")
            try copyFolder(good, to: folder)
            try rewriteMetadata(joinPath(folder, file + ".safetensors"), changes)
            let fresh = try checkpointTrainer(scratch, steps: 3)
            assertThrowsError(containing: fragments) { try fresh.resume(from: folder) }
            XCTAssertEqual(fresh.step, 0, "a refused checkpoint must change nothing (\(changes))")
        }
        let fresh = try checkpointTrainer(scratch, steps: 3)
        try fresh.resume(from: good)
        XCTAssertEqual(fresh.step, 2)

        // `pea train --resume` reports it as an error (it trapped on a negative step).
        let negative = scratch.file("bad-0")
        let result = try runPea(["train", "--model", pipeline, "--text-encoder", encoder, "--data", scratch.file("corpus.jsonl"),
                                 "--batch-size", "2", "--resolution", "32", "--adapter-hidden", "32", "--backend", "cpu",
                                 "--output", scratch.file("out"), "--steps", "3", "--resume", negative])
        XCTAssertEqual(result.status, 1, result.stderr)
        XCTAssertTrue(result.stderr.contains("optimizer.safetensors") && result.stderr.contains("'step'"), result.stderr)
    }

    func testResumeRefusesFilesFromDifferentSteps() throws {
        let scratch = ScratchDirectory("pea-checkpoint-mismatch")
        let trainer = try checkpointTrainer(scratch, steps: 4)
        while trainer.step < 2 { _ = try trainer.trainStep() }
        try trainer.saveCheckpoint(to: scratch.file("checkpoint-2"))
        while trainer.step < 4 { _ = try trainer.trainStep() }
        try trainer.saveCheckpoint(to: scratch.file("checkpoint-4"))
        scratchWrite(readFileBytes(scratch.file("checkpoint-2/adapter.safetensors"))!, to: scratch.file("checkpoint-4/adapter.safetensors"))
        let fresh = try checkpointTrainer(scratch, steps: 4)
        assertThrowsError(containing: ["checkpoint-4", "adapter.safetensors is from step 2 but optimizer.safetensors from step 4"]) {
            try fresh.resume(from: scratch.file("checkpoint-4"))
        }
        XCTAssertEqual(fresh.step, 0)
    }

    func testCheckpointFolderAppearsWholeOrNotAtAll() throws {
        let scratch = ScratchDirectory("pea-checkpoint-folder")
        // A failure while the folder is written leaves nothing: no folder, no temporary.
        struct Failure: Error {}
        XCTAssertThrowsError(try writeFolderAtomically(to: scratch.file("unit")) { folder in
            scratchWrite([1, 2, 3], to: joinPath(folder, "first"))
            throw Failure()
        })
        XCTAssertEqual(listDirectory(scratch.path), [])

        // Saving over an existing checkpoint replaces it whole.
        let trainer = try checkpointTrainer(scratch, steps: 2)
        let folder = scratch.file("checkpoint")
        try trainer.saveCheckpoint(to: folder)
        _ = try trainer.trainStep()
        try trainer.saveCheckpoint(to: folder)
        XCTAssertEqual(try SafeTensorsFile(path: joinPath(folder, "adapter.safetensors")).metadata["step"], "1")
        XCTAssertEqual(try SafeTensorsFile(path: joinPath(folder, "optimizer.safetensors")).metadata["step"], "1")
        XCTAssertEqual(temporaries(in: scratch.path), [])
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
