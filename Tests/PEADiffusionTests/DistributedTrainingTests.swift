import Foundation
import XCTest
@testable import PEADiffusion

/// `pea train` as several processes under mpirun (issue #22): 2 ranks × batch B train the adapter that one process
/// × batch 2B trains, a resumed run may change the rank count, and a rank that fails or dies ends the whole job with
/// the last checkpoint whole. The runs are tiny (the fixtures' tiny SD1 pipeline and Chinese-CLIP encoder, 32²,
/// a 32-wide adapter, 4 steps). `make test` builds the MPI shim (`make mpi`) and installs Open MPI as root, so these
/// run in CI; elsewhere they are skipped, saying what is missing.
final class DistributedTrainingTests: XCTestCase {
    let pipeline = fixturesDirectory() + "/pipelines/sd1"
    let encoder = fixturesDirectory() + "/pea/zh_encoder"

    /// Where `make mpi` writes the shim in this repository.
    var shimPath: String { CUDABackendParityTests.repositoryRoot + "/.build-mpi/libpea_mpi.so" }

    /// `mpirun` on PATH and the shim; skips the test when either is missing.
    func launcher() throws -> String {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":")
            .map { "\($0)/mpirun" }.first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let path else { throw XCTSkip("mpirun is not installed (make test installs Open MPI when run as root: apt-get install openmpi-bin libopenmpi-dev)") }
        guard fileExists(shimPath) else { throw XCTSkip("the MPI shim is not built at \(shimPath) (run: make mpi)") }
        guard FileManager.default.isExecutableFile(atPath: peaExecutablePath) else {
            throw XCTSkip("the pea executable is not built at \(peaExecutablePath)")
        }
        return path
    }

    /// `pea train` over the corpus in `scratch` for `steps` steps with an lr of 1e-3, `--batch-size batch` per rank.
    func trainArguments(_ scratch: ScratchDirectory, output: String, batch: Int, steps: Int = 4,
                        backend: [String] = ["--backend", "cpu", "--threads", "1"]) -> [String] {
        ["train", "--model", pipeline, "--text-encoder", encoder, "--data", scratch.file("corpus.jsonl"), "--resolution", "32",
         "--adapter-hidden", "32", "--steps", String(steps), "--lr", "1e-3", "--batch-size", String(batch), "--save-every", "2",
         "--output", scratch.file(output)] + backend
    }

    /// `pea arguments` as `ranks` processes under mpirun, bounded by `timeout` (a hung collective fails the run
    /// instead of hanging the suite) and with the shim named by PEA_MPI_LIB.
    func runRanks(_ ranks: Int, _ arguments: [String], environment: [String: String?] = [:]) throws
        -> (status: Int32, stdout: String, stderr: String) {
        let mpirun = try launcher()
        var changes = environment
        changes["PEA_MPI_LIB"] = shimPath
        // Containers often forbid the cross-memory attach of Open MPI's shared-memory transport; copies work anywhere.
        changes["OMPI_MCA_btl_vader_single_copy_mechanism"] = "none"
        return try runProgram("/usr/bin/timeout", ["300", mpirun, "--oversubscribe", "--allow-run-as-root", "-np", String(ranks),
                                                   peaExecutablePath] + arguments, environment: changes)
    }

    func adapter(_ path: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: path)
        return Dictionary(uniqueKeysWithValues: try file.names.map { ($0, try file.tensor($0).converted(to: .f32).floats()) })
    }

    /// Two adapters agree within f32 round-off: every weight within 1e-6 (a thousandth of one step's AdamW update at
    /// lr 1e-3). The ranks' gradients are summed in another order than one batch's (two means of 2 samples against
    /// one of 4), so they differ by a few ulps, and AdamW keeps such differences at that scale.
    func assertSameAdapter(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let (x, y) = (try adapter(a), try adapter(b))
        XCTAssertEqual(Set(x.keys), Set(y.keys), file: file, line: line)
        for (name, values) in x {
            let difference = zip(values, y[name]!).map { abs($0 - $1) }.max()!
            XCTAssertLessThanOrEqual(difference, 1e-6, "\(name): \(a) against \(b)", file: file, line: line)
        }
    }

    func testTwoRanksTrainWhatOneProcessTrainsWithTheGlobalBatch() throws {
        _ = try launcher()
        let scratch = ScratchDirectory("pea-mpi-equivalence")
        _ = try TrainingTests.writeCorpus(in: scratch, count: 6, seed: 8)
        let one = try runPea(trainArguments(scratch, output: "one", batch: 4))
        XCTAssertEqual(one.status, 0, one.stderr)
        let two = try runRanks(2, trainArguments(scratch, output: "two", batch: 2))
        XCTAssertEqual(two.status, 0, two.stderr)
        XCTAssertTrue(two.stderr.contains("4 steps of 2 on each of 2 ranks (global batch 4)"), two.stderr)
        // Rank 0 alone reports and writes: one progress line per step, one final path.
        XCTAssertEqual(two.stderr.components(separatedBy: "step 4/4").count - 1, 1, two.stderr)
        XCTAssertEqual(two.stdout, scratch.file("two/adapter.safetensors") + "\n")
        try assertSameAdapter(scratch.file("one/adapter.safetensors"), scratch.file("two/adapter.safetensors"))
        try assertSameAdapter(scratch.file("one/checkpoint-2/adapter.safetensors"), scratch.file("two/checkpoint-2/adapter.safetensors"))
        // The logged losses are the global batch's (the mean of the ranks' means: f32 round-off apart).
        func losses(_ output: String) throws -> [[Double]] {
            try String(contentsOfFile: scratch.file("\(output)/metrics.jsonl"), encoding: .utf8).split(separator: "\n").map { line in
                let record = try JSONValue.parse(String(line)).objectValue ?? [:]
                return ["loss", "loss_task", "loss_logits", "loss_features"].map { record[$0]?.doubleValue ?? .nan }
            }
        }
        let (lossesOne, lossesTwo) = (try losses("one"), try losses("two"))
        XCTAssertEqual(lossesOne.count, 4)
        XCTAssertEqual(lossesTwo.count, 4)
        for (a, b) in zip(lossesOne.joined(), lossesTwo.joined()) {
            XCTAssertEqual(a, b, accuracy: 1e-5 * max(1, abs(a)), "metrics.jsonl: one process \(lossesOne), 2 ranks \(lossesTwo)")
        }

        // A run resumed with another rank count goes on as the same run: one process's checkpoint continued by
        // 2 ranks × 2, and 2 ranks' continued by one process × 4.
        var resumed = trainArguments(scratch, output: "one-then-two", batch: 2)
        resumed += ["--resume", scratch.file("one/checkpoint-2")]
        let continued = try runRanks(2, resumed)
        XCTAssertEqual(continued.status, 0, continued.stderr)
        try assertSameAdapter(scratch.file("one/adapter.safetensors"), scratch.file("one-then-two/adapter.safetensors"))
        let back = try runPea(trainArguments(scratch, output: "two-then-one", batch: 4) + ["--resume", scratch.file("two/checkpoint-2")])
        XCTAssertEqual(back.status, 0, back.stderr)
        try assertSameAdapter(scratch.file("one/adapter.safetensors"), scratch.file("two-then-one/adapter.safetensors"))
    }

    /// A rank that throws (PEA_TEST_FAULT, a hook for tests only) or is killed before step 4 ends the job: non-zero
    /// exit, the failing rank named, the checkpoint of step 2 whole (rank 0 wrote it before step 3's all-reduce,
    /// which the failing rank still took part in), and --resume finishes the run.
    func testAFailingOrKilledRankEndsTheJobAndTheRunResumes() throws {
        _ = try launcher()
        let scratch = ScratchDirectory("pea-mpi-faults")
        _ = try TrainingTests.writeCorpus(in: scratch, count: 6, seed: 8)
        for (mode, fragments) in [("throw", ["rank 1 of 2 failed", "PEA_TEST_FAULT: rank 1 fails before step 4"]),
                                  ("kill", ["rank 1", "signal 9"])] {
            let output = "out-\(mode)"
            let failed = try runRanks(2, trainArguments(scratch, output: output, batch: 2), environment: ["PEA_TEST_FAULT": "1:4:\(mode)"])
            XCTAssertNotEqual(failed.status, 0, failed.stderr)
            XCTAssertNotEqual(failed.status, 124, "mpirun hung until the timeout: \(failed.stderr)")
            for fragment in fragments {
                XCTAssertTrue((failed.stdout + failed.stderr).contains(fragment), "\(mode): '\(fragment)' not in \(failed.stdout + failed.stderr)")
            }
            XCTAssertFalse(fileExists(scratch.file("\(output)/adapter.safetensors")), "\(mode): a failed run wrote the final adapter")
            let checkpoint = scratch.file("\(output)/checkpoint-2")
            XCTAssertEqual(try SafeTensorsFile(path: joinPath(checkpoint, "adapter.safetensors")).metadata["step"], "2")
            XCTAssertEqual(try SafeTensorsFile(path: joinPath(checkpoint, "optimizer.safetensors")).metadata["step"], "2")
            let resumed = try runRanks(2, trainArguments(scratch, output: output, batch: 2) + ["--resume", checkpoint])
            XCTAssertEqual(resumed.status, 0, resumed.stderr)
            XCTAssertEqual(try SafeTensorsFile(path: scratch.file("\(output)/adapter.safetensors")).metadata["step"], "4")
        }
    }

    /// On the CUDA backend (the emulated library here): 2 ranks × 2 on device 0 (--device overrides the local rank:
    /// the emulator has one device) train what one process × 4 trains, with the gradients staged through the host
    /// for MPI (--collective auto falls back to it when NCCL does not load) and with NCCL summing them on the device
    /// (--collective nccl; the emulator's NCCL stand-in, libpea_nccl_emu.so, sums through the MPI shim), the two
    /// bit for bit the same. One step each: the emulator is slow.
    func testTwoRanksOnCUDASumTheirGradientsWithNCCLOrThroughTheHost() throws {
        _ = try launcher()
        _ = try CUDABackendParityTests.emulatedLibrary()
        let standIn = CUDABackendParityTests.repositoryRoot + "/libpea_nccl_emu.so"
        guard fileExists(standIn) else { return XCTFail("\(standIn) does not exist: run make cuda-emu first (make test does)") }
        let scratch = ScratchDirectory("pea-mpi-cuda")
        _ = try TrainingTests.writeCorpus(in: scratch, count: 6, seed: 8)
        func run(_ output: String, ranks: Int, collective: String, nccl: String) throws -> String {
            let arguments = trainArguments(scratch, output: output, batch: 4 / ranks, steps: 1,
                                           backend: ["--backend", "cuda", "--device", "0", "--collective", collective])
            let environment: [String: String?] = ["PEA_CUDA_LIB": CUDABackendParityTests.emulatedLibraryPath, "PEA_NCCL_LIB": nccl]
            let result = ranks == 1 ? try runPea(arguments, environment: environment) : try runRanks(ranks, arguments, environment: environment)
            XCTAssertEqual(result.status, 0, result.stderr)
            return result.stderr
        }
        _ = try run("one", ranks: 1, collective: "auto", nccl: standIn)
        let host = try run("host", ranks: 2, collective: "auto", nccl: scratch.file("no-nccl.so"))
        XCTAssertTrue(host.contains("no NCCL") && host.contains("no-nccl.so") && host.contains("summed by MPI through the host"), host)
        let device = try run("nccl", ranks: 2, collective: "nccl", nccl: standIn)
        XCTAssertTrue(device.contains("summed by NCCL on the GPUs"), device)
        try assertSameAdapter(scratch.file("one/adapter.safetensors"), scratch.file("host/adapter.safetensors"))
        XCTAssertEqual(try adapter(scratch.file("host/adapter.safetensors")), try adapter(scratch.file("nccl/adapter.safetensors")),
                       "NCCL's sum and MPI's, each divided by 2, are the same floats")

        // --collective nccl without NCCL is an error on every rank, not a silent fallback; on the CPU, a usage error.
        let arguments = trainArguments(scratch, output: "none", batch: 2, steps: 1, backend: ["--backend", "cuda", "--device", "0", "--collective", "nccl"])
        let missing = try runRanks(2, arguments, environment: ["PEA_CUDA_LIB": CUDABackendParityTests.emulatedLibraryPath,
                                                              "PEA_NCCL_LIB": scratch.file("no-nccl.so")])
        XCTAssertNotEqual(missing.status, 0)
        XCTAssertTrue(missing.stderr.contains("--collective nccl") && missing.stderr.contains("no-nccl.so"), missing.stderr)
        let cpu = try runRanks(2, trainArguments(scratch, output: "none", batch: 2, steps: 1) + ["--collective", "nccl"])
        XCTAssertNotEqual(cpu.status, 0)
        XCTAssertTrue(cpu.stderr.contains("--collective nccl needs the CUDA backend"), cpu.stderr)
        XCTAssertFalse(fileExists(scratch.file("none/adapter.safetensors")))
    }

    /// SIGTERM to rank 1 alone before step 3: the ranks agree on it in step 3's all-reduce, so both stop after step 3,
    /// rank 0 saves checkpoint-3, and a resumed run ends with the adapter of an uninterrupted one.
    func testASignalToOneRankStopsEveryRankAfterTheSameStep() throws {
        _ = try launcher()
        let scratch = ScratchDirectory("pea-mpi-signal")
        _ = try TrainingTests.writeCorpus(in: scratch, count: 6, seed: 8)
        let whole = try runRanks(2, trainArguments(scratch, output: "whole", batch: 2))
        XCTAssertEqual(whole.status, 0, whole.stderr)
        let stopped = try runRanks(2, trainArguments(scratch, output: "stopped", batch: 2), environment: ["PEA_TEST_FAULT": "1:3:term"])
        XCTAssertNotEqual(stopped.status, 0, stopped.stderr)
        XCTAssertNotEqual(stopped.status, 124, "mpirun hung until the timeout: \(stopped.stderr)")
        XCTAssertTrue(stopped.stderr.contains("stopped by SIGTERM after step 3 of 4"), stopped.stderr)
        XCTAssertFalse(stopped.stderr.contains("step 4/4"), stopped.stderr)
        XCTAssertFalse(fileExists(scratch.file("stopped/adapter.safetensors")))
        let resumed = try runRanks(2, trainArguments(scratch, output: "stopped", batch: 2) + ["--resume", scratch.file("stopped/checkpoint-3")])
        XCTAssertEqual(resumed.status, 0, resumed.stderr)
        try assertSameAdapter(scratch.file("whole/adapter.safetensors"), scratch.file("stopped/adapter.safetensors"))
    }

    /// `mpirun -np 2 pea generate --prompts … --shard auto`: each rank takes its share (no MPI involved), and the
    /// shares make the whole job.
    func testGenerateShardsAutoTakeTheRanksShare() throws {
        _ = try launcher()
        let scratch = ScratchDirectory("pea-mpi-generate")
        let prompts = scratch.write((0..<5).map { "item \($0)" }.joined(separator: "\n"), to: "p.txt")
        let base = ["generate", "--model", pipeline, "--prompts", prompts, "--backend", "cpu", "--threads", "1",
                    "--steps", "2", "--width", "16", "--height", "16", "--seed", "9"]
        let whole = try runPea(base + ["--output-dir", scratch.file("whole")])
        XCTAssertEqual(whole.status, 0, whole.stderr)
        let shared = try runRanks(2, base + ["--output-dir", scratch.file("shared"), "--shard", "auto"])
        XCTAssertEqual(shared.status, 0, shared.stderr)
        for k in 0..<2 {
            let lines = try String(contentsOfFile: scratch.file("shared/results-\(k)-of-2.jsonl"), encoding: .utf8).split(separator: "\n")
            XCTAssertEqual(lines.count, k == 0 ? 3 : 2, "rank \(k) takes items \(k), \(k + 2), …")
        }
        for i in 0..<5 {
            let name = "/" + JobItem.indexKey(i) + ".png"
            XCTAssertEqual(readFileBytes(scratch.file("shared") + name), readFileBytes(scratch.file("whole") + name), "item \(i)")
        }
    }

    /// Under a launcher without the shim, pea says to build it (no MPI is needed to say so).
    func testAMissingShimUnderALauncherSaysMakeMPI() throws {
        let scratch = ScratchDirectory("pea-mpi-missing")
        _ = try TrainingTests.writeCorpus(in: scratch, count: 2, seed: 8)
        let result = try runPea(trainArguments(scratch, output: "out", batch: 1),
                                environment: ["OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "PEA_MPI_LIB": scratch.file("none.so")])
        XCTAssertEqual(result.status, 1, result.stderr)
        for fragment in ["mpirun (Open MPI)", "libpea_mpi.so", "make mpi", scratch.file("none.so")] {
            XCTAssertTrue(result.stderr.contains(fragment), "'\(fragment)' not in \(result.stderr)")
        }
        XCTAssertFalse(fileExists(scratch.file("out")))
    }

    func testTheLaunchIsReadFromEachLaunchersVariables() throws {
        XCTAssertNil(try LaunchEnvironment.detect([:]))
        XCTAssertNil(try LaunchEnvironment.detect(["SLURM_NTASKS": "8", "SLURM_PROCID": "0"]), "a batch script is not a launch")
        XCTAssertEqual(try LaunchEnvironment.detect(["OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"]),
                       LaunchEnvironment(rank: 2, size: 4, localRank: 0, launcher: "mpirun (Open MPI)"))
        XCTAssertEqual(try LaunchEnvironment.detect(["PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALRANKID": "1"])?.localRank, 1)
        XCTAssertEqual(try LaunchEnvironment.detect(["SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"]),
                       LaunchEnvironment(rank: 9, size: 16, localRank: 1, launcher: "srun (Slurm)"))
        assertThrowsError(containing: ["OMPI_COMM_WORLD_RANK", "(unset)"]) { try LaunchEnvironment.detect(["OMPI_COMM_WORLD_SIZE": "2"]) }
        assertThrowsError(containing: ["SLURM_STEP_NUM_TASKS", "'x'"]) {
            try LaunchEnvironment.detect(["SLURM_STEP_NUM_TASKS": "x", "SLURM_PROCID": "0"])
        }
        // The GPU: the local rank, wrapped around the devices CUDA_VISIBLE_DEVICES leaves (one per task: device 0).
        let third = LaunchEnvironment(rank: 10, size: 16, localRank: 2, launcher: "srun (Slurm)")
        XCTAssertEqual(third.device(visibleDevices: nil), 2)
        XCTAssertEqual(third.device(visibleDevices: "0,1,2,3,4,5,6,7"), 2)
        XCTAssertEqual(third.device(visibleDevices: "5"), 0)
        XCTAssertEqual(third.device(visibleDevices: "GPU-0a1b,GPU-2c3d"), 0)
        // One process under a launcher needs no MPI.
        XCTAssertEqual(try ProcessGroup.join(environment: ["OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"]).size, 1)
    }
}
