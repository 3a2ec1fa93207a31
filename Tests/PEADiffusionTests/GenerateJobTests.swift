#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import XCTest
@testable import PEADiffusion

/// Prompt files as jobs (`pea generate --prompts FILE --output-dir OUT`): reading the file, shards, batches, and
/// whole runs of the command on the tiny SD1 pipeline — each image the one a lone `--prompt` run makes, resume
/// after damage and after a signal, refusal of another job's folder, shards as separate processes, tar shards
/// that the training reader takes.
final class GenerateJobTests: XCTestCase {
    let sd1 = fixturesDirectory() + "/pipelines/sd1"
    let defaults = JobDefaults(negativePrompt: "ugly", baseSeed: 100, width: 32, height: 24, steps: 3, guidance: 6,
                               scheduler: nil, batch: 1)

    // MARK: - The prompt file

    func testTextAndJSONLinesItemsTakeTheDefaultsTheyDoNotSet() throws {
        let text = try PromptFile.parse("a fox\n\n  a cat  \r\n", path: "p.txt", jsonLines: false, defaults: defaults)
        XCTAssertEqual(text.map(\.prompt), ["a fox", "a cat"])
        XCTAssertEqual(text.map(\.seed), [100, 101], "item i without a seed gets --seed + i")
        XCTAssertEqual(text.map(\.line), [1, 3])
        XCTAssertEqual(text.map(\.key), ["000000", "000001"])

        let lines = """
            {"prompt": "a fox", "id": "fox_1", "seed": 7, "negative_prompt": null, "batch": 2}

            {"prompt": "一只猫", "width": 64, "height": 16, "steps": 5, "guidance": 1.5, "scheduler": "euler-a", "text": "一只猫"}
            {"prompt": "a dog", "negative_prompt": "cats"}
            """
        let items = try PromptFile.parse(lines, path: "p.jsonl", jsonLines: true, defaults: defaults)
        XCTAssertEqual(items.count, 3)
        XCTAssertEqual(items[0].id, "fox_1")
        XCTAssertEqual(items[0].seed, 7)
        XCTAssertNil(items[0].negativePrompt, "an explicit null is diffusers' negative_prompt=None")
        XCTAssertEqual(items[0].batch, 2)
        XCTAssertEqual([items[0].imageKey(1), items[0].imageKey(2)], ["fox_1-1", "fox_1-2"])
        XCTAssertEqual(items[1].seed, 101, "the index counts items, not lines")
        XCTAssertEqual([items[1].width, items[1].height, items[1].steps], [64, 16, 5])
        XCTAssertEqual(items[1].guidance, 1.5)
        XCTAssertEqual(items[1].scheduler, "euler-a")
        XCTAssertEqual(items[1].text, "一只猫")
        XCTAssertEqual(items[1].negativePrompt, "ugly")
        XCTAssertEqual(items[2].negativePrompt, "cats")
        XCTAssertEqual(items[2].line, 4)
    }

    /// The shipped examples stay valid prompt files (and use every field a .jsonl item may have).
    func testTheExamplePromptFilesAreValid() throws {
        let examples = parentFolder(parentFolder(fixturesDirectory())) + "/examples"
        XCTAssertEqual(try PromptFile.read(path: examples + "/prompts.txt", defaults: defaults).count, 5)
        let items = try PromptFile.read(path: examples + "/prompts.jsonl", defaults: defaults)
        // ControlNet items need the job's --controlnet, so they have a file of their own.
        let controlled = try PromptFile.read(path: examples + "/controlnet.jsonl", defaults: defaults)
        XCTAssertEqual(controlled.map(\.controlImages), [[examples + "/sketch.png"], [examples + "/sketch.png"]])
        let text = ["/prompts.jsonl", "/controlnet.jsonl"].map { String(decoding: readFileBytes(examples + $0) ?? [], as: UTF8.self) }.joined()
        for field in PromptFile.fields {
            XCTAssertTrue(text.contains("\"\(field)\""), "examples/prompts.jsonl and controlnet.jsonl never use '\(field)'")
        }
        XCTAssertEqual(items.count, 7)
        XCTAssertEqual(items[5].initImage, examples + "/sketch.png", "a relative init_image is read from the prompt file's folder")
        XCTAssertEqual(items[6].mask, examples + "/sketch_mask.png", "a relative mask is read from the prompt file's folder")
        XCTAssertEqual(items[6].strength, 1, "diffusers' inpainting default strength")
    }

    func testBadItemsNameTheFileAndLine() {
        let cases: [(String, String)] = [
            (#"{"prompt": "a", "steps": 3"#, "line 1: not JSON"),
            (#"["a"]"#, "expected a JSON object"),
            (#"{"prompt": "a", "negative": "b"}"#, "unknown field 'negative'"),
            (#"{"id": "x"}"#, "'prompt' is missing"),
            (#"{"prompt": ""}"#, "'prompt' is missing or empty"),
            (#"{"prompt": "a", "id": "../x"}"#, "'id' must be"),
            (#"{"prompt": "a", "id": "x"}"# + "\n" + #"{"prompt": "b", "id": "x"}"#, "line 2: id 'x' is already the id of line 1"),
            (#"{"prompt": "a", "seed": -1}"#, "'seed' must be an integer"),
            (#"{"prompt": "a", "seed": 1.5}"#, "'seed' must be an integer"),
            (#"{"prompt": "a", "seed": 1e300}"#, "'seed' must be an integer"),
            (#"{"prompt": "a", "guidance": 1e300}"#, "'guidance' must be a finite number"),
            (#"{"prompt": "a", "width": 0}"#, "'width' must be an integer in 8...16384"),
            (#"{"prompt": "a", "height": 1e300}"#, "'height' must be an integer in 8...16384"),
            (#"{"prompt": "a", "steps": -1}"#, "'steps' must be an integer in 1...1000"),
            (#"{"prompt": "a", "width": "64"}"#, "'width' must be an integer"),
            (#"{"prompt": "a", "width": 60}"#, "'width' must be a multiple of 8"),
            (#"{"prompt": "a", "steps": 0}"#, "'steps' must be an integer in 1...1000"),
            (#"{"prompt": "a", "batch": 65}"#, "'batch' must be an integer in 1...64"),
            (#"{"prompt": "a", "guidance": "high"}"#, "'guidance' must be a finite number"),
            (#"{"prompt": "a", "scheduler": "lms"}"#, "unknown scheduler 'lms'"),
            (#"{"prompt": 3}"#, "'prompt' must be a string"),
            ("\n \n", "no prompts"),
        ]
        for (text, message) in cases {
            assertThrowsError(containing: ["p.jsonl", message]) { try PromptFile.parse(text, path: "p.jsonl", jsonLines: true, defaults: defaults) }
        }
    }

    // MARK: - Shards and batches

    func testShardsPartitionTheJob() throws {
        let items = try PromptFile.parse((0..<11).map { "prompt \($0)" }.joined(separator: "\n"), path: "p.txt", jsonLines: false, defaults: defaults)
        for count in 1...5 {
            let shards = (0..<count).map { JobShard(index: $0, count: count) }
            let taken = shards.flatMap { shard in items.filter(shard.contains).map(\.index) }
            XCTAssertEqual(taken.sorted(), Array(0..<11), "\(count) shards take every item once")
        }
        XCTAssertEqual(try JobShard.parse("2/3"), JobShard(index: 2, count: 3))
        for bad in ["3/3", "-1/3", "1", "a/b", "1/0", "1/2/3"] {
            assertThrowsError(containing: ["--shard", bad]) { try JobShard.parse(bad) }
        }
        // Slurm job arrays (--array=4-6: ids 4, 5, 6) and Kubernetes Indexed Jobs.
        let slurm = ["SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"]
        XCTAssertEqual(try JobShard.automatic(environment: slurm, shards: nil), JobShard(index: 1, count: 3))
        XCTAssertEqual(try JobShard.automatic(environment: ["JOB_COMPLETION_INDEX": "2"], shards: 4), JobShard(index: 2, count: 4))
        assertThrowsError(containing: ["--shards N"]) { try JobShard.automatic(environment: ["JOB_COMPLETION_INDEX": "2"], shards: nil) }
        assertThrowsError(containing: ["outside --shards 2"]) { try JobShard.automatic(environment: ["JOB_COMPLETION_INDEX": "2"], shards: 2) }
        assertThrowsError(containing: ["disagrees"]) { try JobShard.automatic(environment: slurm, shards: 4) }
        assertThrowsError(containing: ["SLURM_ARRAY_TASK_COUNT"]) { try JobShard.automatic(environment: ["SLURM_ARRAY_TASK_ID": "1"], shards: nil) }
        assertThrowsError(containing: ["neither a Slurm job array"]) { try JobShard.automatic(environment: [:], shards: 2) }
        // A launcher's job (mpirun, MPICH, srun): its rank of its size, within a job array's task when there is one;
        // a one-process launch is no shard.
        let mpirun = ["OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"]
        XCTAssertEqual(try JobShard.automatic(environment: mpirun, shards: nil), JobShard(index: 3, count: 4))
        XCTAssertEqual(try JobShard.automatic(environment: ["PMI_SIZE": "2", "PMI_RANK": "1"], shards: nil), JobShard(index: 1, count: 2))
        let srun = ["SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"]
        XCTAssertEqual(try JobShard.automatic(environment: srun, shards: nil), JobShard(index: 9, count: 16))
        XCTAssertEqual(try JobShard.automatic(environment: srun.merging(slurm) { $1 }, shards: nil), JobShard(index: 1 * 16 + 9, count: 48))
        assertThrowsError(containing: ["neither a Slurm job array"]) {
            try JobShard.automatic(environment: ["OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"], shards: nil)
        }
        assertThrowsError(containing: ["OMPI_COMM_WORLD_RANK", "'4'"]) {
            try JobShard.automatic(environment: ["OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "4"], shards: nil)
        }
    }

    func testBatchesHoldCompatibleItemsUpToTheSize() throws {
        let lines = [#"{"prompt": "a"}"#, #"{"prompt": "b", "steps": 9}"#, #"{"prompt": "c", "batch": 2}"#, #"{"prompt": "d"}"#,
                     #"{"prompt": "e", "batch": 5}"#, #"{"prompt": "f", "scheduler": "ddim"}"#, #"{"prompt": "g"}"#]
        let items = try PromptFile.parse(lines.joined(separator: "\n"), path: "p.jsonl", jsonLines: true, defaults: defaults)
        let batches = JobBatches.plan(items, size: 3)
        XCTAssertEqual(batches.map { $0.map(\.prompt) }, [["a", "c"], ["d"], ["e"], ["g"], ["b"], ["f"]])
        for batch in batches {
            XCTAssertEqual(Set(batch.map(\.batchKey)).count, 1)
            XCTAssertTrue(batch.count == 1 || batch.reduce(0) { $0 + $1.batch } <= 3)
        }
        XCTAssertEqual(JobBatches.plan(items, size: 1).count, items.count)
    }

    func testTarMembersAreReadBack() throws {
        let scratch = ScratchDirectory("pea-tar")
        let members: [(String, [UInt8])] = [("a.json", Array(#"{"text": "x"}"#.utf8)), ("b.png", (0..<1500).map { UInt8($0 % 251) }),
                                             ("c.txt", []), (String(repeating: "n", count: 100), [1, 2, 3])]
        var bytes: [UInt8] = []
        for (name, data) in members { bytes += try TarWriter.member(name: name, data: data, modified: 1_700_000_000) }
        bytes += TarWriter.endOfArchive
        let path = scratch.write(bytes, to: "t.tar")
        let entries = try TarArchive(path: path).entries()
        XCTAssertEqual(entries.map(\.name), members.map(\.0))
        XCTAssertEqual(entries.map { Array($0.data) }, members.map(\.1))
        assertThrowsError(containing: ["1 to 100 bytes"]) { _ = try TarWriter.member(name: String(repeating: "n", count: 101), data: []) }
        // GNU tar, where the machine has it, lists the same members (its own header checks).
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/tar") || FileManager.default.isExecutableFile(atPath: "/bin/tar") {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: FileManager.default.isExecutableFile(atPath: "/usr/bin/tar") ? "/usr/bin/tar" : "/bin/tar")
            process.arguments = ["-tf", path]
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            let listing = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            XCTAssertEqual(process.terminationStatus, 0)
            XCTAssertEqual(listing.split(separator: "\n").map(String.init), members.map(\.0))
        }
    }

    // MARK: - Whole jobs through the command line

    private func job(_ prompts: String, _ out: String, _ extra: [String] = [], environment: [String: String?] = [:]) throws
        -> (status: Int32, stdout: String, stderr: String) {
        try runPea(["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--backend", "cpu", "--threads", "1"] + extra,
                   environment: environment)
    }

    private func resultLines(_ path: String) throws -> [[String: JSONValue]] {
        let bytes = try XCTUnwrap(readFileBytes(path), path)
        return try bytes.split(separator: 0x0A).map { try XCTUnwrap(JSONValue.parse(Array($0)).objectValue) }
    }

    private func pixels(_ path: String) throws -> [UInt8] { try PNGReader.read(path: path).pixels }

    private func assertClose(_ a: [UInt8], _ b: [UInt8], _ message: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, message, file: file, line: line)
        let worst = zip(a, b).map { abs(Int($0) - Int($1)) }.max() ?? 0
        XCTAssertLessThanOrEqual(worst, 1, "\(message): max |Δ| \(worst)/255", file: file, line: line)
    }

    func testEachImageIsTheOneALonePromptMakes() throws {
        let scratch = ScratchDirectory("pea-job")
        let prompts = scratch.write("""
            {"prompt": "a red fox in the snow, photo", "id": "fox", "negative_prompt": "blurry"}
            {"prompt": "an astronaut riding a horse", "seed": 7}
            {"prompt": "a red fox in the snow, photo", "batch": 2, "scheduler": "euler-a"}
            {"prompt": "mountains at dawn", "negative_prompt": null, "steps": 4}
            {"prompt": "a red fox in the snow, photo", "negative_prompt": ""}
            """, to: "p.jsonl")
        let out = scratch.file("out")
        let result = try job(prompts, out, ["--batch-size", "3", "--seed", "40", "--steps", "3", "--width", "32", "--height", "24"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let keys = ["fox", "000001", "000002-1", "000002-2", "000003", "000004"]
        XCTAssertEqual(Set(result.stdout.split(separator: "\n").map(String.init)), Set(keys.map { out + "/" + $0 + ".png" }))
        XCTAssertTrue(result.stderr.contains("job: 6/6 images"), result.stderr)

        // Each item alone, through the library (its own scheduler), and item 2 also through `pea generate --prompt`.
        let items = try PromptFile.read(path: prompts, defaults: JobDefaults(negativePrompt: nil, baseSeed: 40, width: 32, height: 24,
                                                                            steps: 3, guidance: 7.5, scheduler: nil, batch: 1))
        XCTAssertEqual(items.map(\.seed), [40, 7, 42, 43, 44])
        let backend = CPUBackend(threads: 1)
        for item in items {
            let pipeline = try StableDiffusionPipeline.load(folder: sd1, backend: backend, scheduler: item.scheduler)
            let alone = try pipeline.generate(item.request)
            for (n, image) in alone.enumerated() {
                assertClose(try pixels(out + "/" + item.imageKey(n + 1) + ".png"), image.pixels, "item \(item.index) image \(n + 1)")
            }
        }
        let single = scratch.file("single.png")
        let lone = try runPea(["generate", "--model", sd1, "--prompt", "a red fox in the snow, photo", "--seed", "42", "--batch", "2",
                               "--scheduler", "euler-a", "--steps", "3", "--width", "32", "--height", "24", "--output", single, "--backend", "cpu"])
        XCTAssertEqual(lone.status, 0, lone.stderr)
        for n in 1...2 {
            assertClose(try pixels(out + "/000002-\(n).png"), try pixels(scratch.file("single-\(n).png")), "pea generate --prompt image \(n)")
        }

        // results.jsonl: one line per image with what made it.
        let lines = try resultLines(out + "/results.jsonl")
        XCTAssertEqual(lines.compactMap { $0["key"]?.stringValue }.sorted(), keys.sorted())
        let second = try XCTUnwrap(lines.first { $0["key"]?.stringValue == "000002-2" })
        XCTAssertEqual(second["index"]?.intValue, 2)
        XCTAssertEqual(second["image"]?.intValue, 2)
        XCTAssertEqual(second["seed"]?.intValue, 42)
        XCTAssertEqual(second["file"]?.stringValue, "000002-2.png")
        XCTAssertEqual(second["prompt"]?.stringValue, "a red fox in the snow, photo")
        XCTAssertGreaterThan(try XCTUnwrap(second["seconds"]?.doubleValue), 0)
        let parameters = try XCTUnwrap(second["parameters"]?.stringValue)
        XCTAssertTrue(parameters.hasPrefix("a red fox in the snow, photo\nSteps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 32x24"), parameters)
        XCTAssertEqual(try PNGReader.read(path: out + "/000002-2.png").text("parameters"), parameters)
        XCTAssertEqual(lines.first { $0["key"]?.stringValue == "fox" }?["id"]?.stringValue, "fox")
    }

    func testRerunsResumeAndRepairWhatIsMissing() throws {
        let scratch = ScratchDirectory("pea-job")
        let prompts = scratch.write("a fox\na cat\na dog\n", to: "p.txt")
        let out = scratch.file("out"), settings = ["--steps", "2", "--width", "16", "--height", "16", "--seed", "3"]
        XCTAssertEqual(try job(prompts, out, settings).status, 0)
        let before = try pixels(out + "/000001.png")

        // A lost image and a results line cut short by a crash: only that item is made again.
        unlink(out + "/000001.png")
        let results = out + "/results.jsonl"
        writeFileBytes(try XCTUnwrap(readFileBytes(results)) + Array(#"{"index": 2, "ima"#.utf8), to: results)
        let again = try job(prompts, out, settings)
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertEqual(again.stdout, out + "/000001.png\n")
        XCTAssertTrue(again.stderr.contains("resuming: 2 of 3 images"), again.stderr)
        XCTAssertEqual(try pixels(out + "/000001.png"), before)
        XCTAssertEqual(try resultLines(results).compactMap { $0["index"]?.intValue }.sorted(), [0, 1, 2])

        // Done: nothing to do, and without --seed the folder's base seed is kept.
        let done = try job(prompts, out, Array(settings.dropLast(2)))
        XCTAssertEqual(done.status, 0, done.stderr)
        XCTAssertEqual(done.stdout, "")
        XCTAssertTrue(done.stderr.contains("nothing to do"), done.stderr)
        XCTAssertEqual(Set(scratch.entries()), ["p.txt", "out"])
        XCTAssertEqual(Set(listDirectory(out)), ["job.json", "results.jsonl", "000000.png", "000001.png", "000002.png"])
    }

    func testAnotherJobsFolderIsRefusedUnlessOverwrite() throws {
        let scratch = ScratchDirectory("pea-job")
        let prompts = scratch.write("a fox\na cat\n", to: "p.txt")
        let out = scratch.file("out"), settings = ["--steps", "2", "--width", "16", "--height", "16", "--seed", "3"]
        XCTAssertEqual(try job(prompts, out, settings).status, 0)
        let listing = Set(listDirectory(out)), results = readFileBytes(out + "/results.jsonl")

        let changedFile = scratch.write("a fox\na bird\n", to: "q.txt")
        for (file, extra, mention) in [(changedFile, settings, "prompt file's items"),
                                       (prompts, settings.map { $0 == "2" ? "3" : $0 }, "prompt file's items"),
                                       (prompts, settings + ["--clip-skip", "1"], "clip_skip was '0', now '1'"),
                                       (prompts, settings + ["--format", "tar"], "format was 'png', now 'tar'"),
                                       (prompts, settings + ["--weights", "bf16"], "weights was '', now 'bf16'"),
                                       (prompts, settings + ["--vae-tiling"], "vae_tiling was '', now 'yes'")] {
            let refused = try job(file, out, extra)
            XCTAssertEqual(refused.status, 1, "\(extra)")
            XCTAssertTrue(refused.stderr.contains("job.json: this folder holds another job") && refused.stderr.contains(mention), refused.stderr)
            XCTAssertEqual(Set(listDirectory(out)), listing)
            XCTAssertEqual(readFileBytes(out + "/results.jsonl"), results)
        }
        let fresh = try job(changedFile, out, settings + ["--overwrite"])
        XCTAssertEqual(fresh.status, 0, fresh.stderr)
        XCTAssertEqual(fresh.stdout.split(separator: "\n").count, 2, "--overwrite makes every image again")
        XCTAssertEqual(try resultLines(out + "/results.jsonl").compactMap { $0["prompt"]?.stringValue }, ["a fox", "a bird"])
    }

    func testASignalStopsAfterTheBatchAndTheJobGoesOn() throws {
        for format in ["png", "tar"] {
            let scratch = ScratchDirectory("pea-job")
            let prompts = scratch.write((0..<40).map { "prompt number \($0)" }.joined(separator: "\n"), to: "p.txt")
            let out = scratch.file("out"), log = scratch.file("log")
            let arguments = ["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--backend", "cpu", "--threads", "1",
                             "--steps", "8", "--width", "32", "--height", "32", "--seed", "1", "--format", format, "--batch-size", "2"]
            let process = try startPea(arguments, log: log)
            // Wait for the first finished batch: a PNG job's first results line; a tar job's shard being written.
            func started() -> Bool {
                format == "png" ? (readFileBytes(out + "/results.jsonl")?.count ?? 0) > 0
                                : listDirectory(out).contains { $0.hasPrefix("shard-000000.tar.tmp-") }
            }
            var waited = 0
            while !started(), process.isRunning, waited < 6000 {
                usleep(10_000)
                waited += 1
            }
            kill(process.processIdentifier, format == "png" ? SIGTERM : SIGINT)
            process.waitUntilExit()
            let stderr = String(decoding: readFileBytes(log) ?? [], as: UTF8.self)
            XCTAssertEqual(process.terminationStatus, 128 + (format == "png" ? SIGTERM : SIGINT), stderr)
            XCTAssertTrue(stderr.contains("stopped by SIG") && stderr.contains("of 40 images are in") && stderr.contains("run the same command again"), stderr)
            let entries = listDirectory(out)
            XCTAssertFalse(entries.contains { $0.contains(".tmp-") }, "\(format): partial files left: \(entries)")
            let recorded = try resultLines(out + "/results.jsonl")
            XCTAssertGreaterThan(recorded.count, 0)
            XCTAssertLessThan(recorded.count, 40, "\(format): the job was not stopped")
            if format == "tar" {
                XCTAssertEqual(try TarArchive(path: out + "/shard-000000.tar").entries().count, 2 * recorded.count, "the shard in progress was completed")
            }
            let rest = try runPea(arguments)
            XCTAssertEqual(rest.status, 0, rest.stderr)
            XCTAssertEqual(try resultLines(out + "/results.jsonl").compactMap { $0["index"]?.intValue }.sorted(), Array(0..<40))
        }
    }

    func testShardsRunAsSeparateProcessesMakeTheWholeJob() throws {
        let scratch = ScratchDirectory("pea-job")
        let prompts = scratch.write((0..<7).map { "item \($0)" }.joined(separator: "\n"), to: "p.txt")
        let settings = ["--steps", "2", "--width", "16", "--height", "16", "--seed", "9"]
        let whole = scratch.file("whole"), shared = scratch.file("shared")
        XCTAssertEqual(try job(prompts, whole, settings).status, 0)

        // Three shards at once into one folder: --shard K/N, a Slurm array task, a Kubernetes Indexed Job pod.
        let base = ["generate", "--model", sd1, "--prompts", prompts, "--output-dir", shared, "--backend", "cpu", "--threads", "1"] + settings
        let processes = try [
            startPea(base + ["--shard", "0/3"], log: scratch.file("log0")),
            startPeaWithEnvironment(base + ["--shard", "auto"], ["SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"],
                                    log: scratch.file("log1")),
            startPeaWithEnvironment(base + ["--shard", "auto", "--shards", "3"], ["JOB_COMPLETION_INDEX": "2"], log: scratch.file("log2")),
        ]
        for (k, process) in processes.enumerated() {
            process.waitUntilExit()
            XCTAssertEqual(process.terminationStatus, 0, String(decoding: readFileBytes(scratch.file("log\(k)")) ?? [], as: UTF8.self))
        }
        var indices: [Int] = []
        for k in 0..<3 {
            let lines = try resultLines(shared + "/results-\(k)-of-3.jsonl")
            XCTAssertTrue(lines.allSatisfy { $0["index"]!.intValue! % 3 == k })
            indices += lines.compactMap { $0["index"]?.intValue }
        }
        XCTAssertEqual(indices.sorted(), Array(0..<7), "the union of the shards is the job, no item twice")
        for i in 0..<7 {
            let name = "/" + JobItem.indexKey(i) + ".png"
            XCTAssertEqual(try pixels(shared + name), try pixels(whole + name), "item \(i)")
        }
        XCTAssertFalse(isRegularFile(shared + "/results.jsonl"))
    }

    /// Without --model, Chinese prompts go through the bundled toy world's Chinese encoder and PEA adapter, in a
    /// job as for a lone prompt.
    func testJobsTakeTheAdapterAsSinglePromptsDo() throws {
        let scratch = ScratchDirectory("pea-job")
        let prompts = scratch.write("一个红色的圆形\n一个蓝色的正方形\n", to: "p.txt")
        let out = scratch.file("out"), settings = ["--steps", "3", "--seed", "5", "--backend", "cpu"]
        let result = try runPea(["generate", "--prompts", prompts, "--output-dir", out, "--batch-size", "2"] + settings)
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stderr.contains("Chinese-CLIP encoder and PEA adapter"), result.stderr)
        let manifest = try XCTUnwrap(JobManifest.read(path: out + "/job.json"))
        XCTAssertTrue(manifest.settings["adapter"]?.hasSuffix("toyworld-zh/adapter.safetensors") ?? false, "\(manifest.settings)")
        let alone = try runPea(["generate", "--prompt", "一个蓝色的正方形", "--output", scratch.file("alone.png")]
                               + settings.map { $0 == "5" ? "6" : $0 })
        XCTAssertEqual(alone.status, 0, alone.stderr)
        assertClose(try pixels(out + "/000001.png"), try pixels(scratch.file("alone.png")), "item 1 beside the lone prompt")
    }

    func testTarShardsAreTrainingData() throws {
        let scratch = ScratchDirectory("pea-job")
        let prompts = scratch.write("""
            {"prompt": "a red circle", "text": "一个红色的圆形"}
            {"prompt": "a blue square", "batch": 2}
            """, to: "p.jsonl")
        let out = scratch.file("out")
        let result = try job(prompts, out, ["--format", "tar", "--steps", "2", "--width", "16", "--height", "16", "--batch-size", "4"])
        XCTAssertEqual(result.status, 0, result.stderr)
        XCTAssertEqual(result.stdout, out + "/shard-000000.tar\n")
        let names = try TarArchive(path: out + "/shard-000000.tar").entries().map(\.name)
        XCTAssertEqual(names, ["000000.png", "000000.json", "000001-1.png", "000001-1.json", "000001-2.png", "000001-2.json"])
        let lines = try resultLines(out + "/results.jsonl")
        XCTAssertEqual(lines.map { $0["file"]?.stringValue }, Array(repeating: "shard-000000.tar", count: 3))
        XCTAssertEqual(lines.map { $0["key"]?.stringValue }, ["000000", "000001-1", "000001-2"])

        let dataset = try TrainingDataset(source: TrainingDataSource.parse([out + "/shard-{000000..000000}.tar"]), resolution: 16, seed: 0, shuffle: false)
        let samples = try dataset.nextBatch(3)
        XCTAssertEqual(samples.map(\.text), ["一个红色的圆形", "a blue square", "a blue square"])
        XCTAssertEqual(samples.map(\.textEN), ["a red circle", "a blue square", "a blue square"])
        XCTAssertEqual(dataset.skipped, TrainingSkipCounts())
    }

    func testMistakesFailBeforeAnythingIsWritten() throws {
        let scratch = ScratchDirectory("pea-job")
        let prompts = scratch.write("a fox\n", to: "p.txt")
        let bad = scratch.write(#"{"prompt": "a fox"}"# + "\n" + #"{"prompt": "a cat", "width": 20}"#, to: "bad.jsonl")
        let out = scratch.file("out")
        let cases: [([String], Int32, String)] = [
            (["generate", "--model", sd1, "--prompts", prompts], 2, "give --output-dir OUT"),
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--output", "x.png"], 2, "--output is for a single --prompt"),
            (["generate", "--model", sd1, "--prompt", "x", "--batch-size", "2"], 2, "--batch-size is for prompt-file jobs"),
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--shard", "3/3"], 2, "--shard expects K/N"),
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--shard", "auto"], 2, "neither a Slurm job array"),
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--shard", "0/2", "--shards", "2"], 2, "--shards goes with --shard auto"),
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--format", "zip"], 2, "zip"),
            (["generate", "--model", sd1, "--prompts", bad, "--output-dir", out], 1, "bad.jsonl: line 2: 'width' must be a multiple of 8"),
            (["generate", "--model", sd1, "--prompts", scratch.file("none.txt"), "--output-dir", out], 1, "none.txt"),
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", prompts], 1, "is a file, not a folder"),
            // Refused before OUT is created: its job.json would name a model or settings that never ran.
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--batch-size", "0"], 2, "--batch-size' must be in 1...256"),
            (["generate", "--model", sd1, "--prompts", prompts, "--output-dir", out, "--device", "1"], 2, "--backend cpu has none"),
            (["generate", "--model", scratch.path, "--prompts", prompts, "--output-dir", out], 1, "not a diffusers pipeline folder"),
        ]
        for (arguments, status, mention) in cases {
            let result = try runPea(arguments + ["--backend", "cpu"], environment: ["SLURM_ARRAY_TASK_ID": nil, "JOB_COMPLETION_INDEX": nil])
            XCTAssertEqual(result.status, status, "\(arguments): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains("pea: error:") && result.stderr.contains(mention), "\(arguments): \(result.stderr)")
            XCTAssertEqual(Set(scratch.entries()), ["p.txt", "bad.jsonl"], "\(arguments) left files behind")
        }
    }
}

/// `startPea` with changes to the inherited environment.
private func startPeaWithEnvironment(_ arguments: [String], _ changes: [String: String], log: String) throws -> Process {
    for (key, value) in changes { setenv(key, value, 1) }
    defer { for key in changes.keys { unsetenv(key) } }
    return try startPea(arguments, log: log)
}
