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

    /// The `pea train` arguments of the signal tests: a tiny run of `steps` steps into `output`.
    private func signalRunArguments(_ data: String, steps: Int, output: String) -> [String] {
        ["train", "--model", pipeline, "--text-encoder", encoder, "--data", data, "--batch-size", "2", "--resolution", "32",
         "--adapter-hidden", "32", "--lr", "1e-3", "--backend", "cpu", "--threads", "1", "--steps", String(steps), "--output", output]
    }

    /// Polls (`every` µs apart, for up to 10 minutes: a bound, not a timing) until `condition` holds.
    private func waitFor(_ what: String, every interval: UInt32 = 10_000, _ condition: () -> Bool) throws {
        for _ in 0..<(600_000_000 / Int(interval)) {
            if condition() { return }
            usleep(interval)
        }
        struct GaveUp: Error { let what: String }
        throw GaveUp(what: what)
    }

    /// The steps logged in OUTPUT/metrics.jsonl so far.
    private func loggedSteps(_ output: String) -> Int {
        (readFileBytes(joinPath(output, "metrics.jsonl")) ?? []).filter { $0 == UInt8(ascii: "\n") }.count
    }

    /// SIGINT (and SIGTERM alike) stops `pea train` after the step in progress with a checkpoint, from which a
    /// resumed run ends with the uninterrupted run's adapter, bit for bit.
    func testSIGINTSavesACheckpointThatResumesExactly() throws {
        let scratch = ScratchDirectory("pea-train-sigint")
        let data = try Self.writeCorpus(in: scratch, count: 5, seed: 10)
        let steps = 40
        let whole = try runPea(signalRunArguments(data, steps: steps, output: scratch.file("whole")))
        XCTAssertEqual(whole.status, 0, whole.stderr)

        for (signal, name) in [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM")] {
            let output = scratch.file("stopped-by-\(name)"), log = output + ".log"
            let process = try startPea(signalRunArguments(data, steps: steps, output: output), log: log)
            try waitFor("the first step") { loggedSteps(output) >= 1 }
            kill(process.processIdentifier, signal)
            process.waitUntilExit()
            let stderr = String(decoding: readFileBytes(log) ?? [], as: UTF8.self)
            XCTAssertEqual(process.terminationReason, .exit, stderr)
            XCTAssertEqual(process.terminationStatus, 128 + signal, stderr)
            let stopped = loggedSteps(output)
            XCTAssertLessThan(stopped, steps, "the run ended before the signal: \(stderr)")
            let checkpoint = joinPath(output, "checkpoint-\(stopped)")
            XCTAssertTrue(stderr.contains("stopped by \(name) after step \(stopped) of \(steps); continue with --resume \(checkpoint)"), stderr)
            XCTAssertFalse(fileExists(joinPath(output, "adapter.safetensors")), "an interrupted run has no final adapter")

            let resumed = try runPea(signalRunArguments(data, steps: steps, output: output) + ["--resume", checkpoint])
            XCTAssertEqual(resumed.status, 0, resumed.stderr)
            XCTAssertTrue(resumed.stderr.contains("resumed at step \(stopped)"), resumed.stderr)
            XCTAssertEqual(readFileBytes(joinPath(output, "adapter.safetensors")), readFileBytes(scratch.file("whole/adapter.safetensors")),
                           "the run resumed after \(name) must give the uninterrupted run's adapter bit for bit")
        }
    }

    func testSIGKILLLeavesOnlyWholeCheckpoints() throws {
        let scratch = ScratchDirectory("pea-train-sigkill")
        let data = try Self.writeCorpus(in: scratch, count: 5, seed: 11)
        let steps = 8, output = scratch.file("run")
        let arguments = signalRunArguments(data, steps: steps, output: output) + ["--save-every", "1"]
        var options = TrainingOptions(steps: steps, batchSize: 2)
        options.resolution = 32
        let loader = try makeTrainer(data: data, options: options, backend: CPUBackend(threads: 1))

        /// Every checkpoint folder is whole: both files, from the same step, loadable for a resume.
        func assertWholeCheckpoints(_ context: String) throws {
            for name in listDirectory(output) where name.hasPrefix("checkpoint-") && !name.contains(".tmp-") {
                XCTAssertNoThrow(try loader.resume(from: joinPath(output, name)), "\(context): \(name)")
                XCTAssertEqual("checkpoint-\(loader.step)", name, context)
            }
        }
        var random = SplitMix64(seed: 16)
        var killed: [pid_t] = [], leftTemporaries = 0
        for round in 0..<6 {
            // Each run starts afresh in the same folder (the same seed: the same checkpoints); the whole checkpoints of
            // the last run are removed, so that the one this run is writing shows, its temporaries are not.
            for name in listDirectory(output) where !name.contains(".tmp-") { removeRecursively(joinPath(output, name)) }
            let process = try startPea(arguments, log: scratch.file("run-\(round).log"))
            let target = 1 + Int(random.uniform() * Float(steps - 2))
            // Kill it while it writes checkpoint `target`: soon after the first sign of that checkpoint.
            try waitFor("checkpoint \(target)", every: 100) {
                listDirectory(output).contains { $0.hasPrefix("checkpoint-\(target)") && !$0.contains(".tmp-\(killed.last ?? 0)-") }
            }
            // The killed runs' temporaries are gone once this run has started (a live run's own may be in flight).
            for path in temporaries(in: output) {
                XCTAssertFalse(killed.contains { path.contains(".tmp-\($0)-") }, "round \(round): \(path) was left behind")
            }
            usleep(UInt32(random.uniform() * 3000))
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            killed.append(process.processIdentifier)
            if !temporaries(in: output).isEmpty { leftTemporaries += 1 }
            try assertWholeCheckpoints("after the kill in round \(round) (at checkpoint \(target))")
        }
        print("SIGKILL: \(leftTemporaries) of \(killed.count) kills left temporaries")
        let last = try runPea(arguments)
        XCTAssertEqual(last.status, 0, last.stderr)
        XCTAssertEqual(temporaries(in: output), [])
        try assertWholeCheckpoints("after the last run")
        XCTAssertEqual(listDirectory(output).filter { $0.hasPrefix("checkpoint-") }.count, steps - 1)
    }
}
