#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import XCTest
@testable import PEADiffusion

/// Issue #16, "never crash, never hang, never lie": hostile sizes in files, special files where a regular
/// file is expected, a truncated CUDA library, unbounded text and requests too large to allocate are refused
/// with errors naming the file and the problem (one regression test per finding).
final class RobustnessLimitsTests: XCTestCase {

    // MARK: - Integer overflow in sizes read from files

    /// A tar member (pax `size`) of Int.max bytes: `dataStart + size` used to overflow and trap.
    func testTarMemberOfIntMaxBytesIsTruncationNotATrap() {
        var tar = TarBuilder()
        let record = "size=\(Int.max)\n"
        let length = record.utf8.count + 3   // "NN " + record, NN itself two digits
        tar.add(name: "pax", data: Array("\(length) \(record)".utf8), type: "x")
        tar.add(name: "a.txt", data: Array("caption".utf8))
        assertThrowsError(containing: ["huge.tar", "truncated", "declares \(Int.max) bytes"]) {
            try TarArchive(bytes: tar.finish(), path: "huge.tar").entries()
        }
    }

    func testCheckedSizeNamesWhatOverflowed() {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: "f.bin", reason: reason) }
        XCTAssertEqual(try CheckedSize.product(6, 7, "x", fail: fail), 42)
        XCTAssertEqual(try CheckedSize.sum(6, 7, "x", fail: fail), 13)
        assertThrowsError(containing: ["f.bin", "the byte size overflows", "× 64"]) {
            try CheckedSize.product(1 << 60, 64, "the byte size", fail: fail)
        }
        assertThrowsError(containing: ["f.bin", "the end offset overflows"]) {
            try CheckedSize.sum(Int.max, 1, "the end offset", fail: fail)
        }
    }

    // MARK: - Special files where a regular file is expected

    /// A FIFO named as an input (`pea eval … --inputs FIFO`) used to block in open(); every reader refuses it,
    /// and a device, with the file's kind.
    func testReadersRefuseFIFOsAndDevicesWithoutBlocking() throws {
        let scratch = ScratchDirectory("pea-fifo")
        let fifo = scratch.file("inputs.safetensors")
        XCTAssertEqual(mkfifo(fifo, 0o644), 0, String(cString: strerror(errno)))
        let readers: [(String, (String) throws -> Void)] = [
            ("readWholeFile", { _ = try readWholeFile($0) }),
            ("MappedBytes", { _ = try MappedBytes(path: $0) }),
            ("SafeTensorsFile", { _ = try SafeTensorsFile(path: $0) }),
            ("InputTensors", { _ = try InputTensors(path: $0) }),
            ("TorchCheckpointFile", { _ = try TorchCheckpointFile(path: $0) }),
            ("PNGReader", { _ = try PNGReader.read(path: $0) }),
            ("PNGDecoder", { _ = try PNGDecoder.decode(path: $0) }),
            ("ImageDecoder", { _ = try ImageDecoder.decodeRGB(path: $0) }),
            ("TarArchive", { _ = try TarArchive(path: $0) }),
        ]
        for (_, read) in readers {
            assertThrowsError(containing: [fifo, "not a regular file (a FIFO)"]) { try read(fifo) }
        }
        XCTAssertFalse(TorchCheckpoint.looksLikeTorchSave(path: fifo))
        assertThrowsError(containing: ["/dev/zero", "not a regular file (a character device)"]) { try readWholeFile("/dev/zero") }
        assertThrowsError(containing: [scratch.path, "not a regular file (a directory)"]) { try readWholeFile(scratch.path) }
    }

    func testEvalRefusesAFIFOAsItsInputsAndWritesNothing() throws {
        let scratch = ScratchDirectory("pea-fifo-cli")
        let fifo = scratch.file("io.safetensors")
        XCTAssertEqual(mkfifo(fifo, 0o644), 0, String(cString: strerror(errno)))
        let vae = fixturesDirectory() + "/models/vae"
        let output = scratch.file("out.safetensors")
        let result = try runPea(["eval", "vae-decode", "--model", vae, "--inputs", fifo, "--output", output, "--backend", "cpu"])
        XCTAssertNotEqual(result.status, 0, result.stderr)
        XCTAssertTrue(result.stderr.contains(fifo) && result.stderr.contains("not a regular file (a FIFO)"), result.stderr)
        XCTAssertFalse(scratch.entries().contains("out.safetensors"), "no partial output")
    }

    // MARK: - A truncated CUDA library

    /// An ELF header whose section header table lies past the end of the file: refused before dlopen (which
    /// would die of SIGBUS mapping a truncated library).
    func testTruncatedSharedLibraryIsRefusedBeforeDlopen() throws {
        #if os(Linux)
        let scratch = ScratchDirectory("pea-elf")
        var header = [UInt8](repeating: 0, count: 64)
        header[0..<8] = [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0]
        func put(_ value: Int, at offset: Int, width: Int) {
            for byte in 0..<width { header[offset + byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
        }
        put(1 << 20, at: 40, width: 8)   // e_shoff: 1 MiB, in a 64-byte file
        put(64, at: 58, width: 2)        // e_shentsize
        put(30, at: 60, width: 2)        // e_shnum
        let truncated = scratch.write(header, to: "libpea_cuda.so")
        assertThrowsError(containing: [truncated, "is not a complete shared library (truncated?)", "section header table"]) {
            try CUDALibrary(path: truncated)
        }
        let short = scratch.write(Array(header.prefix(20)), to: "short.so")
        assertThrowsError(containing: [short, "is not a complete shared library (truncated?)"]) { try CUDALibrary(path: short) }
        let text = scratch.write(String(repeating: "not a library. ", count: 8), to: "text.so")
        assertThrowsError(containing: [text, "no ELF magic number"]) { try CUDALibrary(path: text) }
        #endif
    }

    /// The first 64 KiB of the emulated library named by PEA_CUDA_LIB: `--backend cuda` fails with a clear
    /// error, `--backend auto` falls back to the CPU (the process used to die of SIGBUS in the loader).
    func testTruncatedCUDALibraryFailsClearlyAndAutoFallsBack() throws {
        _ = try CUDABackendParityTests.emulatedLibrary()
        let scratch = ScratchDirectory("pea-cuda-truncated")
        let library = try XCTUnwrap(readFileBytes(CUDABackendParityTests.emulatedLibraryPath))
        let truncated = scratch.write(Array(library.prefix(64 << 10)), to: "libpea_cuda_emu.so")
        let vae = fixturesDirectory() + "/models/vae"
        let decode = ["eval", "vae-decode", "--model", vae, "--inputs", vae + "/io.safetensors"]
        let environment: [String: String?] = ["PEA_CUDA_LIB": truncated]

        let cuda = try runPea(decode + ["--output", scratch.file("cuda.safetensors"), "--backend", "cuda"], environment: environment)
        XCTAssertEqual(cuda.status, 1, cuda.stderr)
        XCTAssertTrue(cuda.stderr.contains(truncated) && cuda.stderr.contains("is not a complete shared library (truncated?)"), cuda.stderr)
        XCTAssertFalse(scratch.entries().contains("cuda.safetensors"))

        let auto = try runPea(decode + ["--output", scratch.file("auto.safetensors"), "--backend", "auto"], environment: environment)
        XCTAssertEqual(auto.status, 0, auto.stderr)
        XCTAssertTrue(auto.stderr.contains("CUDA unavailable") && auto.stderr.contains("using the CPU"), auto.stderr)
        XCTAssertTrue(scratch.entries().contains("auto.safetensors"))
    }

    // MARK: - Unbounded text

    /// Texts longer than the cap are cut before encoding, and the cut is reported; shorter ones are untouched.
    func testTextIsCappedBeforeTokenizing() {
        XCTAssertEqual(cappedForTokenizing("a photo of a cat").cutCount, 0)
        let exact = String(repeating: "é", count: maximumTokenizedTextLength)
        XCTAssertEqual(cappedForTokenizing(exact).kept, exact)
        let (kept, cut) = cappedForTokenizing(String(repeating: "ab ", count: 1_000_000))
        XCTAssertEqual(kept.unicodeScalars.count, maximumTokenizedTextLength)
        XCTAssertEqual(cut, 3_000_000 - maximumTokenizedTextLength)
    }

    /// A 300 000-character word (BPE was quadratic in a word's length: 100k characters took ~40 s, 300k hung)
    /// and a 2M-character caption tokenise; the first 77 ids are those of the text's start, and the cut is said.
    func testHugeWordsAndCaptionsTokenizeWithTheSameLeadingIds() throws {
        let directory = fixturesDirectory() + "/tokenizers"
        let clip = try CLIPTokenizer(folder: directory + "/clip_small")
        let word = String(repeating: "abcdefghij", count: 30_000)
        let wordResult = clip(word, maxLength: 77)
        XCTAssertEqual(wordResult.ids.count, 77)
        XCTAssertNotNil(wordResult.truncatedText)
        XCTAssertTrue(wordResult.truncatedText!.hasSuffix("(\(300_000 - maximumTokenizedTextLength) more characters, not tokenized)"))
        // BPE itself on the whole word (encode does not cap): merging is O(n log n), no longer quadratic.
        let wordIDs = clip.encode(word)
        XCTAssertEqual(Array(wordIDs.prefix(76)), Array(wordResult.ids.prefix(76)))
        // The leading ids of a long word are those of its first 10 000 characters (BPE merges stay local here).
        XCTAssertEqual(Array(wordResult.ids.prefix(40)), Array(clip(String(word.prefix(10_000)), maxLength: 77).ids.prefix(40)))

        let sentence = "a photo of an astronaut riding a horse on the moon, "
        let caption = String(repeating: sentence, count: 2_000_000 / sentence.count + 1)
        let short = String(repeating: sentence, count: 20)
        let tokenizers: [(String, any FixedLengthTokenizer)] = [
            ("clip", clip),
            ("wordpiece", try WordPieceTokenizer(folder: directory + "/cn_clip")),
            ("unigram", try SentencePieceUnigramTokenizer(folder: directory + "/xlmr_small")),
        ]
        for (name, tokenizer) in tokenizers {
            let long = tokenizer(caption, maxLength: 77), reference = tokenizer(short, maxLength: 77)
            XCTAssertEqual(long.ids, reference.ids, name)
            XCTAssertEqual(long.attentionMask, reference.attentionMask, name)
            XCTAssertTrue(long.truncatedText?.hasSuffix("more characters, not tokenized)") ?? false, name)
            XCTAssertNil(tokenizer("a cat", maxLength: 77).truncatedText?.contains("not tokenized"), name)
        }
    }

    // MARK: - Sizes from user numbers, checked before allocating

    func testHugeScheduleIsRefusedBeforeAllocating() {
        let config = ConfigFile(path: "huge/scheduler_config.json", values: ["num_train_timesteps": .number(1e12)])
        assertThrowsError(containing: ["huge/scheduler_config.json", "num_train_timesteps", "the schedule of 1000000000000 timesteps needs 64000 GB"]) {
            try makeScheduler(name: "ddim", config: config)
        }
    }

    /// A config's block_out_channels [100000, 200000] for `pea bench unet`: the random weights are refused
    /// before their array is allocated.
    func testHugeRandomParameterIsRefusedBeforeAllocating() {
        let weights = RandomWeights(backend: CPUBackend())
        assertThrowsError(containing: ["random parameter 'conv.weight' of shape [200000, 100000, 3, 3]", "needs 1440 GB"]) {
            try weights.tensor("conv.weight", shape: [200_000, 100_000, 3, 3])
        }
        XCTAssertEqual(weights.parameterCount, 0)
    }

    func testHugeImagesAreRefusedBeforeAllocating() throws {
        let scratch = ScratchDirectory("pea-huge-image")
        let output = scratch.file("huge.png")
        let result = try runPea(["generate", "--model", fixturesDirectory() + "/pipelines/sd1", "--prompt", "a cat", "--steps", "1",
                                 "--width", "100000", "--height", "100000", "--output", output, "--backend", "cpu"])
        XCTAssertEqual(result.status, 2, result.stderr)
        XCTAssertTrue(result.stderr.contains("1 image(s) of 100000×100000 needs") && result.stderr.contains("GB, more than this machine's"), result.stderr)
        XCTAssertEqual(scratch.entries(), [])
    }

    func testHugeAdapterIsRefusedBeforeAllocating() throws {
        let scratch = ScratchDirectory("pea-huge-adapter")
        let data = try TrainingTests.writeCorpus(in: scratch, count: 2, seed: 5)
        let result = try runPea(["train", "--model", fixturesDirectory() + "/pipelines/sd1", "--text-encoder", fixturesDirectory() + "/pea/zh_encoder",
                                 "--data", data, "--steps", "1", "--adapter-hidden", "65536", "--adapter-layers", "64",
                                 "--output", scratch.file("out"), "--backend", "cpu"])
        XCTAssertEqual(result.status, 2, result.stderr)
        XCTAssertTrue(result.stderr.contains("an adapter of widths") && result.stderr.contains("needs")
                      && result.stderr.contains("lower --adapter-hidden or --adapter-layers"), result.stderr)
        XCTAssertFalse(scratch.entries().contains("out"))
    }
}
