import XCTest
@testable import PEADiffusion

/// The native torch.save reader against files torch wrote (tools/reference/make_multilingual_fixtures.py), every
/// refusal, and random damage that must never crash it.
final class TorchCheckpointTests: XCTestCase {
    let folder = fixturesDirectory() + "/multilingual/torch"

    // MARK: Real torch files

    func checkRoundTrip(_ file: String) throws {
        let checkpoint = try TorchCheckpointFile(path: "\(folder)/\(file)")
        let expected = try SafeTensorsFile(path: "\(folder)/roundtrip_expected.safetensors")
        XCTAssertEqual(checkpoint.names, expected.names, file)
        for name in expected.names {
            let actual = try checkpoint.tensor(name)
            let reference = try expected.tensor(name)
            XCTAssertEqual(actual.dtype, reference.dtype, "\(file) \(name)")
            XCTAssertEqual(actual.shape, reference.shape, "\(file) \(name)")
            XCTAssertEqual(actual.bytes, reference.bytes, "\(file) \(name): values differ from torch's")
        }
    }

    func testProtocol2FileMatchesTorch() throws { try checkRoundTrip("roundtrip.pt") }

    func testProtocol4FileMatchesTorch() throws { try checkRoundTrip("roundtrip_p4.pt") }

    func testZip64ArchiveMatchesTorch() throws { try checkRoundTrip("zip64.pt") }

    func testViewsKeepTheirStorageOffsetsAndStrides() throws {
        let checkpoint = try TorchCheckpointFile(path: "\(folder)/roundtrip.pt")
        XCTAssertEqual(checkpoint.archiveFolder, "roundtrip")
        let base = try checkpoint.info("f32"), transposed = try checkpoint.info("transposed")
        let sliced = try checkpoint.info("sliced"), expanded = try checkpoint.info("expanded")
        XCTAssertTrue(base.isContiguous)
        XCTAssertEqual(transposed.storageKey, base.storageKey)
        XCTAssertEqual(sliced.storageKey, base.storageKey)
        XCTAssertFalse(transposed.isContiguous)
        XCTAssertEqual(transposed.strides, [1, 4])
        XCTAssertEqual(sliced.storageOffset, 5)
        XCTAssertEqual(expanded.strides, [1, 0])
        XCTAssertEqual(try checkpoint.info("scalar").shape, [])
        XCTAssertEqual(try checkpoint.info("empty").shape, [0, 3])
        XCTAssertEqual(try checkpoint.info("bf16").dtype, .bf16)
        XCTAssertEqual(try checkpoint.info("i32").dtype, .i32)
    }

    func testReadReturnsEveryTensor() throws {
        let tensors = try TorchCheckpoint.read(path: "\(folder)/roundtrip.pt")
        XCTAssertEqual(tensors.keys.sorted(), try TorchCheckpointFile(path: "\(folder)/roundtrip.pt").names)
        XCTAssertEqual(tensors["param"]?.shape, [2, 2])
    }

    func testTrainingCheckpointUsesItsStateDict() throws {
        let checkpoint = try TorchCheckpointFile(path: "\(folder)/wrapped.pt")
        XCTAssertEqual(checkpoint.names, ["a.bias", "a.weight"])
        let expected = try SafeTensorsFile(path: "\(folder)/roundtrip_expected.safetensors")
        XCTAssertEqual(try checkpoint.tensor("a.weight").bytes, try expected.tensor("f32").bytes)
    }

    func testWeightSourceConvertsAndChecksShapes() throws {
        let source = try CheckpointWeights(path: "\(folder)/roundtrip.pt", backend: CPUBackend())
        let half = try source.tensor("f16", shape: [5])
        let expected = try SafeTensorsFile(path: "\(folder)/roundtrip_expected.safetensors").tensor("f16").floats()
        XCTAssertEqual(try half.backend.downloadFloats(half), expected)
        XCTAssertEqual(source.shape(of: "transposed"), [4, 3])
        assertThrowsError(containing: ["roundtrip.pt", "'f32'", "[3, 4]", "[4, 3]"]) { try source.tensor("f32", shape: [4, 3]) }
        assertThrowsError(containing: ["'i64'", "floating-point"]) { try source.tensor("i64", shape: [2, 3]) }
        assertThrowsError(containing: ["missing tensor 'nope'"]) { try source.tensor("nope", shape: [1]) }
        XCTAssertEqual(source.unusedNames.count, source.names.count - 1)
    }

    // MARK: Refusals

    func testRefusesWhatIsNotATensorStateDict() {
        let cases: [(String, [String])] = [
            ("list.pt", ["list.pt", "holds a list, not a state dict"]),
            ("tensor.pt", ["tensor.pt", "holds a tensor, not a state dict"]),
            ("non_tensor_value.pt", ["non_tensor_value.pt", "entry 'epoch'", "an int, not a tensor"]),
            ("double.pt", ["double.pt", "torch.DoubleStorage", "not supported"]),
            ("legacy.pt", ["legacy.pt", "legacy torch.save format", "torch >= 1.6"]),
            ("bare_pickle.pkl", ["bare_pickle.pkl", "bare pickle"]),
            ("compressed.bin", ["compressed.bin", "is compressed (deflate)", "re-save"]),
            ("truncated.bin", ["truncated.bin", "truncated"]),
        ]
        for (file, fragments) in cases {
            assertThrowsError(containing: fragments) { try TorchCheckpointFile(path: "\(folder)/\(file)") }
        }
    }

    func testRefusesCodeWithoutRunningIt() {
        let cases: [(String, [String])] = [
            ("evil_os_system.bin", ["GLOBAL 'os system' is not allowed"]),
            ("evil_stack_global.bin", ["STACK_GLOBAL 'builtins eval' is not allowed"]),
            ("evil_inst.bin", ["INST 'os system' is not allowed"]),
            ("evil_torch_global.bin", ["GLOBAL 'torch load' is not allowed"]),
            ("evil_build.bin", ["BUILD (setting object state) on a tensor is not allowed"]),
        ]
        for (file, fragments) in cases {
            assertThrowsError(containing: [file, "archive/data.pkl", "nothing from the file was executed"] + fragments) {
                try TorchCheckpointFile(path: "\(folder)/\(file)")
            }
            // The adapter loader goes through the same reader.
            assertThrowsError(containing: [file] + fragments) { try PEAAdapter.load(path: "\(folder)/\(file)", backend: CPUBackend()) }
        }
    }

    func testRefusesHandMadePickles() throws {
        let storage = pickleStorage(key: "0", count: 4)
        let cases: [([UInt8], [String])] = [
            (proto + [0x4B, 1, 0x2E], ["holds an int, not a state dict"]),
            (proto + [0x2E], ["stack underflow"]),
            (proto + [0x68, 7, 0x2E], ["memo entry 7 was never stored"]),
            (proto + [0x7D, 0x4B, 1, 0x75, 0x2E], ["no MARK"]),
            (proto + [0x7D, 0x28, 0x4B, 1, 0x75, 0x2E], ["odd number"]),
            (proto + Array(repeating: 0x29, count: 1) + Array(repeating: 0x85, count: 40) + [0x2E], ["nested more than 32 deep"]),
            (proto + [0x4B, 1, 0x4B, 2, 0x52, 0x2E], ["REDUCE calls an int"]),
            (proto + [0x49] + Array("1\n".utf8) + [0x2E], ["INT (0x49) is not allowed"]),
            (proto + [0x8A, 9] + Array(repeating: 0, count: 9) + [0x2E], ["LONG1 integer of 9 bytes"]),
            (proto + [0x58, 0xFF, 0xFF, 0xFF, 0x7F, 0x41], ["ends in the middle"]),
            (proto + Array("ctorch\nFloatStorage\n)R.".utf8), ["calling torch.FloatStorage is not allowed"]),
            (proto + Array("ccollections\nOrderedDict\n".utf8) + [0x4B, 1, 0x85, 0x52, 0x2E], ["OrderedDict with arguments"]),
            (proto + tensorPickle(storage: storage, offset: 2, size: [3], stride: [1]), ["reaches past its storage '0' of 4 elements"]),
            (proto + tensorPickle(storage: storage, offset: 0, size: [2, 2], stride: [2]), ["differ in rank"]),
        ]
        for (pickle, fragments) in cases {
            assertThrowsError(containing: ["memory.pt"] + fragments) {
                try TorchCheckpointFile(bytes: zipLikeTorch(pickle: pickle, storages: ["0": [UInt8](repeating: 0, count: 16)]), path: "memory.pt")
            }
        }
        // A container put inside another one can no longer change: x = {}; y = {0: x}; x[1] = y would be a cycle.
        let cycle = proto + [0x7D, 0x71, 0, 0x7D, 0x71, 1, 0x4B, 0, 0x68, 0, 0x73, 0x68, 0, 0x4B, 1, 0x68, 1, 0x73, 0x2E]
        assertThrowsError(containing: ["SETITEM on a container already inside another object is not allowed"]) {
            try TorchCheckpointFile(bytes: zipLikeTorch(pickle: cycle, storages: [:]), path: "memory.pt")
        }
        // Nor can a container be put inside itself: x = []; x.append(x).
        assertThrowsError(containing: ["APPEND on a container already inside another object is not allowed"]) {
            try TorchCheckpointFile(bytes: zipLikeTorch(pickle: proto + [0x5D, 0x71, 0, 0x68, 0, 0x61, 0x2E], storages: [:]), path: "memory.pt")
        }
        // A tensor whose storage record is missing, or shorter than declared.
        let valid = proto + [0x7D, 0x58] + le32(1) + Array("w".utf8) + tensorPickle(storage: storage, offset: 0, size: [4], stride: [1], stop: false) + [0x73, 0x2E]
        XCTAssertEqual(try TorchCheckpointFile(bytes: zipLikeTorch(pickle: valid, storages: ["0": [UInt8](repeating: 0, count: 16)]), path: "ok.pt").tensor("w").shape, [4])
        assertThrowsError(containing: ["tensor 'w'", "'archive/data/0' is missing"]) {
            try TorchCheckpointFile(bytes: zipLikeTorch(pickle: valid, storages: [:]), path: "memory.pt")
        }
        assertThrowsError(containing: ["tensor 'w'", "holds 8 bytes"]) {
            try TorchCheckpointFile(bytes: zipLikeTorch(pickle: valid, storages: ["0": [UInt8](repeating: 0, count: 8)]), path: "memory.pt")
        }
        // Damaged bytes are caught by the CRC the archive declares.
        var damaged = zipLikeTorch(pickle: valid, storages: ["0": [UInt8](repeating: 0, count: 16)])
        let at = (0..<(damaged.count - 2)).first { damaged[$0] == 0x80 && damaged[$0 + 1] == 0x02 && damaged[$0 + 2] == 0x7D }!
        damaged[at + 2] = 0x5D   // the pickle's EMPTY_DICT becomes EMPTY_LIST
        assertThrowsError(containing: ["'archive/data.pkl' is damaged", "CRC-32"]) { try TorchCheckpointFile(bytes: damaged, path: "memory.pt") }
        // Not a zip at all.
        assertThrowsError(containing: ["not a torch.save file"]) { try TorchCheckpointFile(bytes: Array("hello".utf8), path: "memory.pt") }
    }

    /// A storage declaring 2^60 elements (LONG1): its repeat limit, 64 × the element count, used to overflow
    /// and trap; now the file is refused, naming what overflowed.
    func testStorageOfTwoToTheSixtyElementsIsRefusedNotATrap() {
        let huge = [0x28] + unicode("storage") + Array("ctorch\nFloatStorage\n".utf8) + unicode("0") + unicode("cpu")
            + [0x8A, 8] + (0..<8).map { UInt8(truncatingIfNeeded: (1 << 60) >> (8 * $0)) } + [0x74, 0x51]
        let pickle = proto + [0x7D, 0x58] + le32(1) + Array("w".utf8) + tensorPickle(storage: huge, offset: 0, size: [4], stride: [1], stop: false) + [0x73, 0x2E]
        assertThrowsError(containing: ["memory.pt", "storage '0'", "overflows", "\(1 << 60)"]) {
            try TorchCheckpointFile(bytes: zipLikeTorch(pickle: pickle, storages: ["0": [UInt8](repeating: 0, count: 16)]), path: "memory.pt")
        }
    }

    // MARK: Fuzzing

    /// Random damage to real files — flipped bytes, truncation, insertions, overwritten runs, random files — must
    /// give an error or a result, never a crash.
    func testDamagedFilesNeverCrash() throws {
        var random = SplitMix64(seed: 0x5EED)
        let originals = [readFileBytes("\(folder)/roundtrip.pt")!, readFileBytes("\(folder)/roundtrip_p4.pt")!,
                         readFileBytes(fixturesDirectory() + "/multilingual/adapter_sdxl/pytorch_model.bin")!]
        var opened = 0
        for iteration in 0..<1500 {
            var bytes = originals[iteration % originals.count]
            mutate(&bytes, &random)
            if iteration % 100 == 0 { bytes = (0..<Int(random.next() % 600)).map { _ in UInt8(truncatingIfNeeded: random.next()) } }
            if let file = try? TorchCheckpointFile(bytes: bytes, path: "fuzz.pt") {
                opened += 1
                for name in file.names { _ = try? file.tensor(name) }
            }
        }
        XCTAssertGreaterThan(opened, 0, "some mutations (in unchecked bytes such as padding) should still open")
    }

    /// Random damage to the pickle itself, re-zipped with a correct CRC so it reaches the unpickler, and the
    /// tensors it may describe materialised from the real storages.
    func testDamagedPicklesNeverCrash() throws {
        var random = SplitMix64(seed: 0xBADC0DE)
        let bytes = readFileBytes("\(folder)/roundtrip.pt")!
        let records = try bytes.withUnsafeBytes { try ZipDirectory.read($0, fail: { PEAError.invalidFile(path: "x", reason: $0) }) }
        func contents(_ name: String) -> [UInt8] {
            let record = records[name]!
            return Array(bytes[record.dataOffset..<(record.dataOffset + record.size)])
        }
        let pickle = contents("roundtrip/data.pkl")
        var storages: [String: [UInt8]] = [:]
        for name in records.keys where name.hasPrefix("roundtrip/data/") {
            storages[String(name.dropFirst("roundtrip/data/".count))] = contents(name)
        }
        XCTAssertNoThrow(try TorchCheckpointFile(bytes: zipLikeTorch(pickle: pickle, storages: storages), path: "rezipped.pt"))
        var parsed = 0
        for _ in 0..<3000 {
            var mutated = pickle
            mutate(&mutated, &random)
            if let file = try? TorchCheckpointFile(bytes: zipLikeTorch(pickle: mutated, storages: storages), path: "fuzz.pt") {
                parsed += 1
                for name in file.names { _ = try? file.tensor(name) }
            }
        }
        XCTAssertGreaterThan(parsed, 0)
    }

    private func mutate(_ bytes: inout [UInt8], _ random: inout SplitMix64) {
        func index() -> Int { bytes.isEmpty ? 0 : Int(random.next() % UInt64(bytes.count)) }
        switch random.next() % 6 {
        case 0:  // flip a few bytes
            for _ in 0..<(1 + random.next() % 4) where !bytes.isEmpty { bytes[index()] ^= UInt8(truncatingIfNeeded: 1 + random.next() % 255) }
        case 1:  // truncate
            bytes.removeSubrange(index()...)
        case 2:  // insert random bytes
            let at = index()
            bytes.insert(contentsOf: (0..<(1 + random.next() % 8)).map { _ in UInt8(truncatingIfNeeded: random.next()) }, at: at)
        case 3:  // overwrite a run with an extreme value
            let at = index()
            let value: UInt8 = random.next() % 2 == 0 ? 0xFF : 0x00
            for i in at..<min(bytes.count, at + 1 + Int(random.next() % 8)) { bytes[i] = value }
        case 4:  // delete a run
            let at = index()
            bytes.removeSubrange(at..<min(bytes.count, at + 1 + Int(random.next() % 16)))
        default:  // duplicate a run
            let at = index()
            let run = Array(bytes[at..<min(bytes.count, at + 1 + Int(random.next() % 32))])
            bytes.insert(contentsOf: run, at: index())
        }
    }

    // MARK: Building pickles and zips

    private let proto: [UInt8] = [0x80, 0x02]

    private func le32(_ value: Int) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }
    private func le16(_ value: Int) -> [UInt8] { (0..<2).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }
    private func unicode(_ text: String) -> [UInt8] { [0x58] + le32(text.utf8.count) + Array(text.utf8) }

    /// The persistent id of a FloatStorage, then BINPERSID.
    private func pickleStorage(key: String, count: Int) -> [UInt8] {
        [0x28] + unicode("storage") + Array("ctorch\nFloatStorage\n".utf8) + unicode(key) + unicode("cpu") + [0x4B, UInt8(count), 0x74, 0x51]
    }

    private func tuple(_ values: [Int]) -> [UInt8] { [0x28] + values.flatMap { [0x4B, UInt8($0)] } + [0x74] }

    /// _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()).
    private func tensorPickle(storage: [UInt8], offset: Int, size: [Int], stride: [Int], stop: Bool = true) -> [UInt8] {
        Array("ctorch._utils\n_rebuild_tensor_v2\n".utf8) + [0x28] + storage + [0x4B, UInt8(offset)] + tuple(size) + tuple(stride)
            + [0x89] + Array("ccollections\nOrderedDict\n)R".utf8) + [0x74, 0x52] + (stop ? [0x2E] : [])
    }

    /// A stored zip laid out like torch.save's (archive/data.pkl, archive/data/<key>), with correct CRCs.
    private func zipLikeTorch(pickle: [UInt8], storages: [String: [UInt8]]) -> [UInt8] {
        var entries = [("archive/data.pkl", pickle)]
        for key in storages.keys.sorted() { entries.append(("archive/data/\(key)", storages[key]!)) }
        entries.append(("archive/byteorder", Array("little".utf8)))
        var out: [UInt8] = [], central: [UInt8] = []
        for (name, data) in entries {
            let offset = out.count, crc = crc32(data), nameBytes = Array(name.utf8)
            let sizes = le32(crc) + le32(data.count) + le32(data.count) + le16(nameBytes.count) + le16(0)
            out += le32(0x0403_4B50) + le16(20) + le16(0) + le16(0) + le16(0) + le16(0) + sizes + nameBytes + data
            central += le32(0x0201_4B50) + le16(20) + le16(20) + le16(0) + le16(0) + le16(0) + le16(0) + sizes
                + le16(0) + le16(0) + le16(0) + le32(0) + le32(offset) + nameBytes
        }
        let directoryOffset = out.count
        out += central
        out += le32(0x0605_4B50) + le16(0) + le16(0) + le16(entries.count) + le16(entries.count) + le32(central.count) + le32(directoryOffset) + le16(0)
        return out
    }

    private func crc32(_ data: [UInt8]) -> Int { Int(PNGTests.referenceCRC32(data)) }   // zip's CRC is PNG's
}
